"""The edge's port to the next tier: what the edge calls on "the cloud", and nothing more.

The request pipeline offloads through it (``infer``), the preparation of a
model pushes and profiles through it (``has_model``, ``put_model``,
``profile``, ``health``), the uplink monitor probes through it (``probe``,
and ``link`` tells whether the link is emulated in the client), and the
factory that built it closes it. Two implementations ship:
:class:`~popex.edge.cloud_client.CloudClient` (HTTP to ``cloud_api``) and
:class:`~popex.edge.fake_cloud.FakeCloud` (in-process, for tests).

Every call takes ``timeout_s``, the time left in the caller's budget, and
fails with the exceptions of :mod:`popex.edge.cloud_types` (re-exported
here with the replies and the HTTP client, so the edge imports the cloud
from one place).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from popex.edge.cloud_client import API_PREFIX, CloudClient
from popex.edge.cloud_types import (
    CloudError,
    CloudInference,
    CloudRejected,
    CloudTimeout,
    CloudUnavailable,
    ProbeResult,
    RegisteredModel,
)
from popex.link.emulation import LinkEmulator

__all__ = [
    "API_PREFIX",
    "CloudError",
    "CloudUnavailable",
    "CloudTimeout",
    "CloudRejected",
    "CloudInference",
    "ProbeResult",
    "RegisteredModel",
    "CloudPort",
    "CloudClient",
]


@runtime_checkable
class CloudPort(Protocol):
    """What the edge needs of the cloud tier.

    Attributes
    ----------
    link : LinkEmulator or None
        The uplink emulated in the port (offloads and probes wait for it),
        or None when the network is real; the edge plans with it and the
        uplink monitor measures through it.

    Examples
    --------
    >>> isinstance(CloudClient("http://127.0.0.1:8001", token="secret-token"), CloudPort)
    True
    """

    link: LinkEmulator | None

    def infer(self, payload: bytes, *, timeout_s: float, content_encoding: str | None = None) -> CloudInference:
        """Finish one offloaded inference (:func:`popex.wire.encode_offload` payload).

        Parameters
        ----------
        payload : bytes
            The offload payload, deflated when ``content_encoding="deflate"``.
        timeout_s : float
            Time left in the request's budget, s.
        content_encoding : str, optional

        Returns
        -------
        CloudInference

        Raises
        ------
        CloudTimeout, CloudUnavailable, CloudRejected
        """
        ...

    def probe(self, n_bytes: int, *, timeout_s: float) -> ProbeResult:
        """Upload ``n_bytes`` of padding and time it (the uplink monitor's active sample).

        Parameters
        ----------
        n_bytes : int
        timeout_s : float

        Returns
        -------
        ProbeResult

        Raises
        ------
        CloudTimeout, CloudUnavailable, CloudRejected
        """
        ...

    def has_model(self, model_id: str, *, timeout_s: float) -> bool:
        """Whether the cloud holds model ``model_id``.

        Parameters
        ----------
        model_id : str
        timeout_s : float

        Returns
        -------
        bool

        Raises
        ------
        CloudTimeout, CloudUnavailable, CloudRejected
        """
        ...

    def put_model(self, model_id: str, spec_bytes: bytes, weights_bytes: bytes, *,
                  timeout_s: float) -> RegisteredModel:
        """Give the cloud a model (spec JSON + safetensors weights); harmless if it has it.

        Parameters
        ----------
        model_id : str
        spec_bytes, weights_bytes : bytes
        timeout_s : float

        Returns
        -------
        RegisteredModel

        Raises
        ------
        CloudTimeout, CloudUnavailable, CloudRejected
        """
        ...

    def profile(self, model_id: str, *, n_repeats: int, timeout_s: float) -> list[float]:
        """The cloud's time of each stage of ``model_id``, ms, measured now.

        Parameters
        ----------
        model_id : str
        n_repeats : int
        timeout_s : float

        Returns
        -------
        list of float

        Raises
        ------
        CloudTimeout, CloudUnavailable, CloudRejected
        """
        ...

    def health(self, *, timeout_s: float) -> bool:
        """Whether the cloud answers in time (False on any failure, never raises CloudError).

        Parameters
        ----------
        timeout_s : float

        Returns
        -------
        bool
        """
        ...

    def close(self) -> None:
        """Release what the port holds (connections); the owner calls it once at shutdown."""
        ...
