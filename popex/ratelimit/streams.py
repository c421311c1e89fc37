"""Per request-stream token buckets: one :class:`popex.ratelimit.live.RateLimiter` per stream id.

An operator may limit one client's stream (a camera, a tenant) apart from
the edge's own bucket: ``PUT /api/v1/admin/rate-limit`` (admin token) puts
a bucket on a stream id, and a request carrying that id (``?stream=`` or
the ``X-Popex-Stream`` header) consults it instead of the edge's. The id
travels from the view to :func:`popex.edge.rate_limit.refused_offload` in a
context variable, so the pipeline's signatures stay as they are. A request
without an id, or with an id no bucket was put on, uses the edge's bucket
(none: unlimited). Each stream's limiter has its own thread (tables,
thresholds re-solved for that stream's measured rate).
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from popex.checks import check_finite
from popex.errors import ConfigError
from popex.ratelimit.live import RateLimiter

__all__ = ["MAX_STREAMS", "StreamLimiters", "current_stream", "request_stream"]

#: Streams one edge keeps a bucket for: each costs a thread.
MAX_STREAMS = 64
_MAX_ID_CHARS = 64
_STREAM: contextvars.ContextVar[str | None] = contextvars.ContextVar("popex_stream", default=None)


def check_stream_id(stream: object) -> str:
    """A stream id: 1 to 64 characters of letters, digits, '-', '_' or '.'.

    Raises
    ------
    ConfigError
    """
    if not isinstance(stream, str) or not 0 < len(stream) <= _MAX_ID_CHARS or not all(
            c.isascii() and (c.isalnum() or c in "-_.") for c in stream):
        raise ConfigError(f"stream must be 1 to {_MAX_ID_CHARS} characters of letters, digits, '-', '_', '.', "
                          f"got {stream!r}")
    return stream


@contextmanager
def request_stream(stream: str | None) -> Iterator[None]:
    """Within the block, the request belongs to ``stream`` (None: no stream; checked)."""
    token = _STREAM.set(None if stream is None else check_stream_id(stream))
    try:
        yield
    finally:
        _STREAM.reset(token)


def current_stream() -> str | None:
    """The stream id of the request being run on this thread, if any."""
    return _STREAM.get()


class StreamLimiters:
    """The edge's bucket (optional) and one per stream; the runner's ``rate_limiter`` when streams are put.

    Parameters
    ----------
    default : RateLimiter or None
        The edge's own (config ``offload_rate_per_s``).
    """

    def __init__(self, default: RateLimiter | None) -> None:
        self.default = default
        self._streams: dict[str, RateLimiter] = {}
        self._lock = threading.Lock()

    def for_request(self) -> RateLimiter | None:
        """The limiter of the current request's stream, else the edge's."""
        stream = current_stream()
        return self._streams.get(stream, self.default) if stream is not None else self.default

    def consult(self, *args, **kwargs):
        """:meth:`RateLimiter.consult` on the current request's limiter (always one: see ``refused_offload``)."""
        return self.for_request().consult(*args, **kwargs)

    def put(self, stream: str, *, rate_per_s: float, depth: float, policy: str = "mdp") -> RateLimiter:
        """Put (or replace) a stream's bucket, full, and start its thread.

        Raises
        ------
        ConfigError
            On a bad id, r <= 0, b < 1, an unknown policy, or more than :data:`MAX_STREAMS` streams.
        """
        stream = check_stream_id(stream)
        limiter = RateLimiter(rate_per_s=check_finite(rate_per_s, name="offload_rate_per_s", low=0.0,
                                                      low_open=True), depth=depth, policy=policy)
        with self._lock:
            if stream not in self._streams and len(self._streams) >= MAX_STREAMS:
                raise ConfigError(f"at most {MAX_STREAMS} streams have a bucket: delete one first")
            old, self._streams[stream] = self._streams.get(stream), limiter
        limiter.start()
        if old is not None:
            old.close()
        return limiter

    def delete(self, stream: str) -> bool:
        """Remove a stream's bucket (its requests use the edge's again); False if it had none."""
        with self._lock:
            old = self._streams.pop(check_stream_id(stream), None)
        if old is not None:
            old.close()
        return old is not None

    def start(self) -> None:
        """Start the edge's limiter's thread (the streams' start when put)."""
        if self.default is not None:
            self.default.start()

    def close(self) -> None:
        """Stop every thread."""
        with self._lock:
            limiters = list(self._streams.values())
        for limiter in ([self.default] if self.default is not None else []) + limiters:
            limiter.close()

    def status(self) -> dict[str, object]:
        """The edge's block (its keys at the top, as without streams) plus ``streams``: id -> block."""
        with self._lock:
            streams = dict(self._streams)
        block: dict[str, object] = {} if self.default is None else self.default.status()
        block["streams"] = {stream: limiter.status() for stream, limiter in sorted(streams.items())}
        return block
