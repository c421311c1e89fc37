"""The gunicorn worker both services run: gthread, except that no thread waits for a slow client's headers.

Stock gthread hands a connection to a request thread as soon as its first
bytes arrive; the thread then blocks until the headers are complete. Four
connections that sent half their headers held all four threads (the audit:
0 of 5 good requests answered in 150 s, and on the cloud without the token,
since headers are read before any route checks it).

:class:`BufferingThreadWorker` reads a new connection's headers without
blocking, on whichever thread the pool gives it, and returns it to gunicorn's
poller (``_DEFER``) until the blank line that ends them has arrived; only then
does a request thread parse it, from memory. A connection whose headers are
not complete within ``HEADER_TIMEOUT_S`` of its first byte is closed (one
that sends nothing is closed by gunicorn after ``--keep-alive`` seconds).
Once the headers are in, every socket read of the request (the body, a
kept-alive connection's next request) times out after ``READ_TIMEOUT_S``.

Run with ``--worker-class api_common.gunicorn_worker.BufferingThreadWorker``
(``run_edge.sh``, ``run_cloud.sh``).
"""

from __future__ import annotations

import time
from typing import Any

from gunicorn.workers import gthread

__all__ = ["HEADER_TIMEOUT_S", "READ_TIMEOUT_S", "BufferingThreadWorker"]

#: Longest a client may take from its first byte to the end of its headers, s.
HEADER_TIMEOUT_S = 10.0
#: Longest one socket read may wait once the headers are in (body, next request), s.
READ_TIMEOUT_S = 10.0
_END_OF_HEADERS = b"\r\n\r\n"
_CHUNK_BYTES = 65536


class _TimedSocket:
    """The parser's view of a client socket: every read waits at most ``READ_TIMEOUT_S``.

    gunicorn puts the socket back into blocking mode (no timeout) before each
    request, so the timeout is set again on every read.
    """

    def __init__(self, sock: Any) -> None:
        self._sock = sock

    def recv(self, n_bytes: int, *flags: int) -> bytes:
        self._sock.settimeout(READ_TIMEOUT_S)
        return self._sock.recv(n_bytes, *flags)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class BufferingThreadWorker(gthread.ThreadWorker):
    """gthread with headers buffered off the request threads (see the module docstring)."""

    def _headers_arrived(self, conn: Any) -> bool | None:
        """Read what the socket holds now; True once the headers are complete, None if the client is gone."""
        buffer = conn.__dict__.setdefault("popex_buffer", bytearray())
        limit = self.cfg.limit_request_line + self.cfg.limit_request_fields * (self.cfg.limit_request_field_size + 2)
        conn.sock.setblocking(False)
        try:
            while _END_OF_HEADERS not in buffer and len(buffer) <= limit:
                chunk = conn.sock.recv(_CHUNK_BYTES)
                if not chunk:
                    return None
                buffer += chunk
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            return None
        # Over the limit: let gunicorn's parser answer it (431/400) as it would.
        return _END_OF_HEADERS in buffer or len(buffer) > limit

    def handle(self, conn: Any) -> Any:
        """Buffer a new connection's headers on the poller; hand it to gunicorn's handler once they are in."""
        if not conn.initialized and not conn.__dict__.get("popex_headers_in", False):
            now_s = time.monotonic()
            deadline_s = conn.__dict__.setdefault("popex_header_deadline_s", now_s + HEADER_TIMEOUT_S)
            arrived = self._headers_arrived(conn)
            if arrived is None or (not arrived and now_s > deadline_s):
                return False  # gone, or too slow: gunicorn closes it
            if not arrived:
                return gthread._DEFER  # back to the poller; no thread waits for the rest
            conn.popex_headers_in = True
            conn.init()
            conn.parser.unreader.unread(bytes(conn.popex_buffer))
            conn.parser.unreader.sock = _TimedSocket(conn.sock)
            conn.popex_buffer = bytearray()
            conn.data_ready = True
        return super().handle(conn)
