"""What crosses the edge's cloud port: the replies and the failures.

Both sides of the port speak these: the HTTP client
(:class:`popex.edge.cloud_client.CloudClient`), the in-process
:class:`popex.edge.fake_cloud.FakeCloud`, and the edge code that calls
either through :class:`popex.edge.cloud_port.CloudPort`.

Failures are exceptions, never ``None``:

- :class:`CloudTimeout`: the budget ran out (connect or read timeout, or the
  emulated link alone would exceed it);
- :class:`CloudUnavailable`: connection refused or reset, a 5xx, or a reply
  that is not the expected JSON;
- :class:`CloudRejected`: a 4xx; it carries the cloud's error code and
  message and is never retried.

None of these is a :class:`~popex.errors.PopexError`: a cloud failure is not
the end user's fault, and the edge answers with its best local exit instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from popex.wire import OffloadReply

__all__ = [
    "CloudError",
    "CloudUnavailable",
    "CloudTimeout",
    "CloudRejected",
    "CloudInference",
    "CloudBatchInference",
    "ProbeResult",
    "RegisteredModel",
]


class CloudError(Exception):
    """The cloud could not serve a request."""


class CloudUnavailable(CloudError):
    """The cloud is unreachable, reset the connection, failed (5xx) or answered garbage."""


class CloudTimeout(CloudError):
    """The request's time budget ran out before the cloud answered."""


class CloudRejected(CloudError):
    """The cloud refused the request as bad input (4xx).

    Parameters
    ----------
    status : int
        HTTP status.
    code, message : str
        The cloud's DESIGN.md §6 error code and message.

    Examples
    --------
    >>> CloudRejected(404, "unknown_model", "no such model").code
    'unknown_model'
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"cloud rejected the request ({status} {code}): {message}")
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class CloudInference:
    """The cloud's answer to one offload, with where the time went (ms).

    ``round_trip_ms`` runs from the call (emulated link delay included) to
    the parsed reply; ``cloud_ms`` is the cloud's decode + compute time;
    ``transfer_ms = round_trip_ms - cloud_ms`` (clamped at 0) is what the
    uplink monitor uses; ``n_bytes`` is the payload size.
    """

    label: int
    class_name: str
    confidence: float
    cloud_ms: float
    transfer_ms: float
    round_trip_ms: float
    n_bytes: int


@dataclass(frozen=True)
class CloudBatchInference:
    """The cloud's answer to a batched offload: one reply per sample, in batch order, and the call's times (ms).

    ``cloud_ms`` is the cloud's time for the whole batch, ``transfer_ms = round_trip_ms - cloud_ms``.
    """

    replies: tuple[OffloadReply, ...]
    cloud_ms: float
    transfer_ms: float
    round_trip_ms: float
    n_bytes: int


@dataclass(frozen=True)
class ProbeResult:
    """Raw timings of one uplink probe; the uplink monitor turns them into an estimate.

    ``round_trip_ms`` includes any emulated link delay; ``server_ms`` is the
    time the cloud spent reading the body.
    """

    n_bytes: int
    round_trip_ms: float
    server_ms: float


@dataclass(frozen=True)
class RegisteredModel:
    """A model known to the cloud; ``created`` is False when it was there already."""

    model_id: str
    n_stages: int
    created: bool
