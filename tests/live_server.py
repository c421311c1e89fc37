"""A Flask app served over real HTTP on 127.0.0.1 in a background thread, for browser and fuzzing tests."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from werkzeug.serving import make_server

__all__ = ["serve"]

_JOIN_TIMEOUT_S = 10.0


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """Serve ``app`` on a free loopback port (threaded); yield its base URL; shut it down on exit."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="live-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(_JOIN_TIMEOUT_S)
        server.server_close()
