"""The edge's port to the next tier: what the edge calls on "the cloud", and nothing more.

The request pipeline offloads through it (``infer``, ``infer_batch``), the preparation of a
model pushes and profiles through it (``has_model``, ``put_model``,
``profile``, ``health``), a deletion removes it (``delete_model``), the uplink monitor probes through it (``probe``,
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

from collections.abc import Mapping

from typing import Protocol, runtime_checkable

from popex.edge.cloud_client import API_PREFIX, CloudClient
from popex.edge.cloud_types import (
    CloudBatchInference,
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
    "CloudBatchInference",
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
            How ``payload`` is encoded ("deflate") or None.

        Returns
        -------
        CloudInference
            The final exit's answer and where the time went.

        Raises
        ------
        CloudTimeout, CloudUnavailable, CloudRejected
            The budget ran out; the cloud is unreachable or failed; it refused the payload.
        """
        ...

    def infer_batch(self, payload: bytes, *, request_ids: tuple[str, ...], timeout_s: float,
                    content_encoding: str | None = None) -> CloudBatchInference:
        """Finish a batched offload (one payload, ``request_ids`` in its metadata): one answer per sample.

        Parameters
        ----------
        payload : bytes
        request_ids : tuple of str
            The payload's ids in batch order; the replies echo them.
        timeout_s : float
            The tightest budget in the batch, s.
        content_encoding : str, optional

        Returns
        -------
        CloudBatchInference

        Raises
        ------
        CloudTimeout, CloudUnavailable, CloudRejected
            As :meth:`infer`; the whole batch falls back.
        """
        ...

    def probe(self, n_bytes: int, *, timeout_s: float) -> ProbeResult:
        """Upload ``n_bytes`` of padding and time it (the uplink monitor's active sample).

        Parameters
        ----------
        n_bytes : int
            Padding to upload; 0 times the round trip alone.
        timeout_s : float
            The monitor's timeout of one probe, s.

        Returns
        -------
        ProbeResult
            Raw timings, for the monitor to turn into an estimate.

        Raises
        ------
        CloudTimeout, CloudUnavailable, CloudRejected
            The probe is lost: no sample this round.
        """
        ...

    def has_model(self, model_id: str, *, timeout_s: float) -> bool:
        """Whether the cloud holds model ``model_id``.

        Parameters
        ----------
        model_id : str
            The edge's id of the model (sha256 of spec and weights).
        timeout_s : float
            Timeout of this control call, s.

        Returns
        -------
        bool
            True when the upload can be skipped.

        Raises
        ------
        CloudTimeout, CloudUnavailable, CloudRejected
            The cloud could not answer; the preparation assumes the cloud's times.
        """
        ...

    def put_model(self, model_id: str, files: Mapping[str, bytes], *,
                  timeout_s: float) -> RegisteredModel:
        """Give the cloud a model in the form it was registered in; harmless if it has it.

        Parameters
        ----------
        model_id : str
            The id the cloud must find again from the files.
        files : mapping of str to bytes
            Path in the model directory -> content: model.json and its ONNX
            graphs, or spec.json and weights.safetensors.
        timeout_s : float
            Timeout of this control call, s.

        Returns
        -------
        RegisteredModel
            The id, its stage count, and whether it was new.

        Raises
        ------
        CloudTimeout, CloudUnavailable, CloudRejected
            Rejected: the cloud found the files or the id wrong.
        """
        ...

    def delete_model(self, model_id: str, *, timeout_s: float) -> bool:
        """Remove model ``model_id`` from the cloud (``DELETE /api/v1/models/<id>`` on the edge).

        Parameters
        ----------
        model_id : str
        timeout_s : float
            Timeout of this control call, s.

        Returns
        -------
        bool
            False when the cloud did not hold it.

        Raises
        ------
        CloudTimeout, CloudUnavailable, CloudRejected
            The cloud could not answer; the edge has removed the model anyway.
        """
        ...

    def profile(self, model_id: str, *, n_repeats: int, timeout_s: float) -> list[float]:
        """The cloud's time of each stage of ``model_id``, ms, measured now.

        Parameters
        ----------
        model_id : str
            A model the cloud holds.
        n_repeats : int
            Timed runs per stage.
        timeout_s : float
            Timeout of this control call, s.

        Returns
        -------
        list of float
            ``t^c_i`` of DESIGN.md §3, one per stage, ms.

        Raises
        ------
        CloudTimeout, CloudUnavailable, CloudRejected
            The preparation then assumes cloud = edge / speedup.
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
