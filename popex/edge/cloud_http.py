"""The HTTP mechanics under the cloud client: keep-alive connections, reply checks, the retry policy.

The data plane (offloads and probes) goes through one persistent
``http.client`` connection per thread (:class:`KeepAliveConnections`):
``requests`` costs 0.6-0.9 ms more per call on a 2-core VM, a third of an
offload's overhead O on loopback. A connection error is retried at most
once, and only while budget is left (:func:`retry_connection_error_once`,
the one HTTP helper's policy). Replies of either transport are mapped to
the port's failures (:mod:`popex.edge.cloud_types`) by :func:`checked` and
:func:`json_body`.
"""

from __future__ import annotations

import functools
import http.client
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, TypeVar
from urllib.parse import urlsplit

from popex.edge.cloud_types import CloudRejected, CloudTimeout, CloudUnavailable
from popex.errors import PopexError
from popex.untrusted import loads_json

__all__ = [
    "ConnectionFailed",
    "HTTPReply",
    "Reply",
    "KeepAliveConnections",
    "retry_connection_error_once",
    "time_left_s",
    "checked",
    "json_body",
]

_MAX_REPLY_BYTES = 1 * 2**20  # the cloud answers a few hundred bytes of JSON
_MIN_RETRY_BUDGET_S = 0.001  # below this a retry could not even connect
F = TypeVar("F", bound=Callable[..., Any])
R = TypeVar("R", bound="HTTPReply")


def _rejected(response: HTTPReply) -> CloudRejected:
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError, PopexError):
        code, message = "http_error", response.text[:200]
    return CloudRejected(response.status_code, code, message)


class ConnectionFailed(CloudUnavailable):
    """A connection-level failure (the only retried kind); never escapes the client."""


class HTTPReply(Protocol):
    """What the checks read of a reply: a ``requests.Response`` or a :class:`Reply`."""

    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        """The body as text (error messages quote it)."""

    def json(self) -> Any:
        """The body parsed as JSON.

        Returns
        -------
        object
            Whatever the JSON holds; the checks validate its shape.
        """


@dataclass(frozen=True)
class Reply:
    """The parts of a ``requests.Response`` the checks read, for http.client replies."""

    status_code: int
    content: bytes

    def json(self) -> Any:
        """The body parsed as JSON.

        Returns
        -------
        object

        Raises
        ------
        DataError
            If the body is not JSON, or nests too deep (:func:`popex.untrusted.loads_json`).
        """
        return loads_json(self.content, name="the cloud's answer", max_bytes=_MAX_REPLY_BYTES)

    @property
    def text(self) -> str:
        """The body as text (undecodable bytes replaced)."""
        return self.content.decode("utf-8", errors="replace")


class _NoDelay:
    """TCP_NODELAY, as urllib3 sets it: the headers and the body go out as two
    writes, and Nagle's algorithm would hold the body until the server's
    delayed ACK of the headers (up to 40 ms)."""

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]


class _NoDelayHTTPConnection(_NoDelay, http.client.HTTPConnection):
    pass


class _NoDelayHTTPSConnection(_NoDelay, http.client.HTTPSConnection):
    pass


class KeepAliveConnections:
    """One persistent ``http.client`` connection per calling thread to one cloud.

    A connection that failed in any way is dropped, so the next call (or
    the one retry) opens a fresh one; a stale keep-alive socket the server
    closed shows up as a reset, which the retry policy covers.

    Parameters
    ----------
    base_url : str
        ``http(s)://host:port`` of the cloud.
    """

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self._connection_class = _NoDelayHTTPSConnection if parts.scheme == "https" else _NoDelayHTTPConnection
        self._host = parts.hostname or ""
        self._port = parts.port
        self._local = threading.local()
        self._open: set[http.client.HTTPConnection] = set()
        self._lock = threading.Lock()

    def request(self, method: str, path: str, *, body: bytes, headers: dict[str, str], timeout_s: float) -> Reply:
        """Send one request on this thread's connection and read the whole reply.

        Parameters
        ----------
        method, path : str
            HTTP method and the URL's path.
        body : bytes
        headers : dict of str to str
        timeout_s : float
            Connect and read timeout, s.

        Returns
        -------
        Reply
            Whatever the status.

        Raises
        ------
        OSError, http.client.HTTPException
            As ``http.client`` raises them (the connection is dropped first).
        """
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._connection_class(self._host, self._port, timeout=timeout_s)
            self._local.connection = connection
            with self._lock:
                self._open.add(connection)
        else:
            connection.timeout = timeout_s  # used when it (re)connects
            if connection.sock is not None:
                connection.sock.settimeout(timeout_s)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            content = response.read()
        except BaseException:
            self._drop(connection)
            raise
        if response.will_close:
            self._drop(connection)
        return Reply(response.status, content)

    def _drop(self, connection: http.client.HTTPConnection) -> None:
        connection.close()
        self._local.connection = None
        with self._lock:
            self._open.discard(connection)

    def close(self) -> None:
        """Close every thread's connection (a later request opens a fresh one)."""
        with self._lock:
            connections, self._open = list(self._open), set()
        for connection in connections:
            connection.close()


def retry_connection_error_once(send: F) -> F:
    """Retry a failed connection once, if the deadline leaves time; nothing else is retried.

    A refused or reset connection is usually a restarting server or a stale
    keep-alive socket, worth one more try; timeouts, 4xx and 5xx are not.
    What escapes is a plain :class:`~popex.edge.cloud_types.CloudUnavailable`.

    Parameters
    ----------
    send : callable(self, method, url, *, deadline_s, **kwargs)
        A method that raises :class:`ConnectionFailed` for a connection-level failure.

    Returns
    -------
    callable
        ``send`` with the policy; same signature.
    """

    @functools.wraps(send)
    def wrapped(self: Any, method: str, url: str, *, deadline_s: float, **kwargs: Any) -> Any:
        try:
            return send(self, method, url, deadline_s=deadline_s, **kwargs)
        except ConnectionFailed as err:
            if deadline_s - time.perf_counter() < _MIN_RETRY_BUDGET_S:
                raise CloudUnavailable(str(err)) from err.__cause__
        try:
            return send(self, method, url, deadline_s=deadline_s, **kwargs)
        except ConnectionFailed as err:
            raise CloudUnavailable(str(err)) from err.__cause__

    return wrapped  # type: ignore[return-value]


def time_left_s(method: str, url: str, deadline_s: float) -> float:
    """Seconds left until ``deadline_s`` (a ``time.perf_counter`` instant).

    Parameters
    ----------
    method, url : str
        Named in the message.
    deadline_s : float

    Returns
    -------
    float
        Positive.

    Raises
    ------
    CloudTimeout
        If the deadline has passed.
    """
    timeout_s = deadline_s - time.perf_counter()
    if timeout_s <= 0:
        raise CloudTimeout(f"no time left in the budget for {method} {url}")
    return timeout_s


def checked(method: str, url: str, response: R) -> R:
    """The response if it is 2xx/3xx.

    Parameters
    ----------
    method, url : str
        Named in the message.
    response : HTTPReply

    Returns
    -------
    HTTPReply
        ``response`` itself.

    Raises
    ------
    CloudUnavailable
        On a 5xx.
    CloudRejected
        On a 4xx, with the cloud's error code and message.
    """
    if response.status_code >= 500:
        raise CloudUnavailable(f"{method} {url}: cloud failed with {response.status_code}: {response.text[:200]}")
    if response.status_code >= 400:
        raise _rejected(response)
    return response


def json_body(response: HTTPReply, keys: tuple[str, ...]) -> dict[str, Any]:
    """The reply's JSON object, which must hold ``keys``.

    Parameters
    ----------
    response : HTTPReply
    keys : tuple of str

    Returns
    -------
    dict

    Raises
    ------
    CloudUnavailable
        If the body is not a JSON object with those keys.
    """
    try:
        body = loads_json(response.content, name="the cloud's answer", max_bytes=_MAX_REPLY_BYTES)
    except PopexError as err:
        raise CloudUnavailable(f"cloud answered {response.status_code} with a body that is not JSON") from err
    if not isinstance(body, dict) or any(key not in body for key in keys):
        raise CloudUnavailable(f"cloud answered {response.status_code} without the keys {list(keys)}")
    return body
