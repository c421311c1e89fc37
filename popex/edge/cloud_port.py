"""The edge's client of the cloud service (``cloud_api``): the seam for a fake.

Every call takes ``timeout_s``, the time left in the request's budget, as
its connect and read timeout. Failures are exceptions, never ``None``:

- :class:`CloudTimeout`: the budget ran out (connect or read timeout, or the
  emulated link alone would exceed it);
- :class:`CloudUnavailable`: connection refused or reset, a 5xx, or a reply
  that is not the expected JSON;
- :class:`CloudRejected`: a 4xx; it carries the cloud's error code and
  message and is never retried.

A connection error is retried at most once, and only while budget is left
(:func:`_retry_connection_error_once`, the one HTTP helper's policy). None of
these is a :class:`~popex.errors.PopexError`: a cloud failure is not the end
user's fault, and the edge answers with its best local exit instead.

The data plane (offloads and probes) goes through one persistent
``http.client`` connection per thread: ``requests`` costs 0.6-0.9 ms more
per call on a 2-core VM, a third of an offload's overhead O on loopback.
Control calls (model upload, profile, health) use a ``requests.Session``.

With a :class:`~popex.link.emulation.LinkEmulator`, offloads and
probes first wait for the emulated uplink (model uploads, profiles and
health checks are control traffic and are not delayed).
"""

from __future__ import annotations

import functools
import http.client
import json
import math
import socket
import threading
import time
from urllib.parse import quote, urlsplit
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import requests

from popex.errors import ConfigError
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
    "CloudClient",
]

API_PREFIX = "/api/v1"
_OCTET_STREAM = "application/octet-stream"
_MIN_RETRY_BUDGET_S = 0.001  # below this a retry could not even connect
F = TypeVar("F", bound=Callable[..., Any])


class CloudError(Exception):
    """The cloud could not serve a request."""


class CloudUnavailable(CloudError):
    """The cloud is unreachable, reset the connection, failed (5xx) or answered garbage."""


class CloudTimeout(CloudError):
    """The request's time budget ran out before the cloud answered."""


class CloudRejected(CloudError):
    """The cloud refused the request as bad input (4xx).

    Attributes
    ----------
    status : int
        HTTP status.
    code, message : str
        The cloud's DESIGN.md §6 error code and message.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"cloud rejected the request ({status} {code}): {message}")
        self.status = status
        self.code = code
        self.message = message


class _ConnectionFailed(CloudUnavailable):
    """A connection-level failure (the only retried kind); never escapes the client."""


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


def _check_timeout_s(timeout_s: float) -> float:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not math.isfinite(timeout_s) \
            or timeout_s <= 0:
        raise ConfigError(f"timeout_s must be a positive finite number of seconds, got {timeout_s!r}")
    return float(timeout_s)


def _retry_connection_error_once(send: F) -> F:
    """Retry a failed connection once, if the deadline leaves time; nothing else is retried.

    A refused or reset connection is usually a restarting server or a stale
    keep-alive socket, worth one more try; timeouts, 4xx and 5xx are not.
    What escapes is a plain :class:`CloudUnavailable`.
    """

    @functools.wraps(send)
    def wrapped(self: CloudClient, method: str, url: str, *, deadline_s: float, **kwargs: Any) -> requests.Response:
        try:
            return send(self, method, url, deadline_s=deadline_s, **kwargs)
        except _ConnectionFailed as err:
            if deadline_s - time.perf_counter() < _MIN_RETRY_BUDGET_S:
                raise CloudUnavailable(str(err)) from err.__cause__
        try:
            return send(self, method, url, deadline_s=deadline_s, **kwargs)
        except _ConnectionFailed as err:
            raise CloudUnavailable(str(err)) from err.__cause__

    return wrapped  # type: ignore[return-value]


@dataclass(frozen=True)
class _Reply:
    """The parts of a ``requests.Response`` the helpers below read, for http.client replies."""

    status_code: int
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
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


class _KeepAliveConnections:
    """One persistent ``http.client`` connection per calling thread to one cloud.

    A connection that failed in any way is dropped, so the next call (or
    the one retry) opens a fresh one; a stale keep-alive socket the server
    closed shows up as a reset, which the retry policy covers.
    """

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self._connection_class = _NoDelayHTTPSConnection if parts.scheme == "https" else _NoDelayHTTPConnection
        self._host = parts.hostname or ""
        self._port = parts.port
        self._local = threading.local()
        self._open: set[http.client.HTTPConnection] = set()
        self._lock = threading.Lock()

    def request(self, method: str, path: str, *, body: bytes, headers: dict[str, str], timeout_s: float) -> _Reply:
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
        return _Reply(response.status, content)

    def _drop(self, connection: http.client.HTTPConnection) -> None:
        connection.close()
        self._local.connection = None
        with self._lock:
            self._open.discard(connection)

    def close(self) -> None:
        with self._lock:
            connections, self._open = list(self._open), set()
        for connection in connections:
            connection.close()


def _time_left_s(method: str, url: str, deadline_s: float) -> float:
    timeout_s = deadline_s - time.perf_counter()
    if timeout_s <= 0:
        raise CloudTimeout(f"no time left in the budget for {method} {url}")
    return timeout_s


def _checked(method: str, url: str, response: requests.Response | _Reply) -> requests.Response | _Reply:
    """The response if it is 2xx/3xx; a 5xx is CloudUnavailable, a 4xx CloudRejected."""
    if response.status_code >= 500:
        raise CloudUnavailable(f"{method} {url}: cloud failed with {response.status_code}: {response.text[:200]}")
    if response.status_code >= 400:
        raise _rejected(response)
    return response


def _json(response: requests.Response | _Reply, keys: tuple[str, ...]) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError as err:
        raise CloudUnavailable(f"cloud answered {response.status_code} with a body that is not JSON") from err
    if not isinstance(body, dict) or any(key not in body for key in keys):
        raise CloudUnavailable(f"cloud answered {response.status_code} without the keys {list(keys)}")
    return body


def _rejected(response: requests.Response | _Reply) -> CloudRejected:
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", response.text[:200]
    return CloudRejected(response.status_code, code, message)


class CloudClient:
    """A keep-alive HTTP client of one cloud service.

    Parameters
    ----------
    base_url : str
        ``http://host:port`` of the cloud (no path).
    token : str
        The shared token, sent as ``Authorization: Bearer <token>``.
    link : LinkEmulator, optional
        Emulated uplink that offloads and probes wait for (demo and tests).
    session : requests.Session, optional
        Injected session (tests); by default one is created and owned here,
        which ignores proxy and .netrc settings from the environment
        (``trust_env = False``: they cost 1-2 ms per request).

    Raises
    ------
    ConfigError
        If the URL is not http(s) or the token is empty.

    Examples
    --------
    >>> CloudClient("http://127.0.0.1:8001/", token="secret-token").base_url
    'http://127.0.0.1:8001'
    """

    def __init__(self, base_url: str, *, token: str, link: LinkEmulator | None = None,
                 session: requests.Session | None = None) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"cloud base_url must start with http:// or https://, got {base_url!r}")
        if not isinstance(token, str) or not token:
            raise ConfigError("the cloud client needs the shared token (POPEX_TOKEN)")
        self.base_url = base_url.rstrip("/")
        self.link = link
        self._owns_session = session is None
        if session is None:
            session = requests.Session()
            # Proxy and .netrc lookups from the environment cost 1-2 ms per request; the
            # cloud is addressed directly. An injected session keeps its own settings.
            session.trust_env = False
        self._session = session
        # An injected session (tests) carries the data plane too.
        self._connections = _KeepAliveConnections(self.base_url) if self._owns_session else None
        self._headers = {"Authorization": f"Bearer {token}"}
        api = self.base_url + API_PREFIX
        self._infer_url = f"{api}/infer"
        self._probe_url = f"{api}/probe"
        self._models_url = f"{api}/models"
        self._health_url = f"{self.base_url}/healthz"

    def _model_url(self, model_id: str) -> str:
        return f"{self._models_url}/{quote(str(model_id), safe='')}"

    def __repr__(self) -> str:
        return f"CloudClient({self.base_url!r}, link={self.link!r})"

    def close(self) -> None:
        """Close the session and the data-plane connections if this client created them."""
        if self._owns_session:
            self._session.close()
        if self._connections is not None:
            self._connections.close()

    def __enter__(self) -> CloudClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the one HTTP helper -------------------------------------------------------

    def _send_once(self, method: str, url: str, *, deadline_s: float, content_type: str | None = None,
                   **kwargs: Any) -> requests.Response:
        """One request through the session with the time left until ``deadline_s``; 2xx or an exception."""
        timeout_s = _time_left_s(method, url, deadline_s)
        headers = self._headers if content_type is None else {**self._headers, "Content-Type": content_type}
        if "headers" in kwargs:
            headers = {**headers, **kwargs.pop("headers")}
        try:
            response = self._session.request(method, url, headers=headers, timeout=timeout_s, **kwargs)
        except requests.Timeout as err:  # ConnectTimeout included: the budget ran out while connecting
            raise CloudTimeout(f"{method} {url}: no answer within {timeout_s * 1000:.0f} ms") from err
        except requests.ConnectionError as err:
            raise _ConnectionFailed(f"{method} {url}: cannot reach the cloud ({err})") from err
        except requests.RequestException as err:
            raise CloudUnavailable(f"{method} {url}: {err}") from err
        return _checked(method, url, response)

    _send = _retry_connection_error_once(_send_once)

    @_retry_connection_error_once
    def _post_data(self, method: str, url: str, *, deadline_s: float, data: bytes,
                   headers: dict[str, str] | None = None) -> requests.Response | _Reply:
        """A data-plane POST (offload, probe): the keep-alive connection, or the injected session."""
        if self._connections is None:
            return self._send_once(method, url, deadline_s=deadline_s, data=data, content_type=_OCTET_STREAM,
                                   headers=headers or {})
        timeout_s = _time_left_s(method, url, deadline_s)
        all_headers = {**self._headers, "Content-Type": _OCTET_STREAM, **(headers or {})}
        try:
            response = self._connections.request(method, urlsplit(url).path, body=data, headers=all_headers,
                                                 timeout_s=timeout_s)
        except TimeoutError as err:  # socket.timeout: connecting or waiting for the answer
            raise CloudTimeout(f"{method} {url}: no answer within {timeout_s * 1000:.0f} ms") from err
        except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine) as err:
            raise _ConnectionFailed(f"{method} {url}: cannot reach the cloud ({err})") from err
        except (OSError, http.client.HTTPException) as err:
            raise CloudUnavailable(f"{method} {url}: {err}") from err
        return _checked(method, url, response)

    # -- data plane ----------------------------------------------------------------

    def _wait_for_link(self, n_bytes: int, deadline_s: float) -> None:
        """Wait for the emulated uplink; if it cannot carry the bytes in time, wait out the budget and time out."""
        if self.link is None:
            return
        left_ms = (deadline_s - time.perf_counter()) * 1000.0
        if self.link.delay_ms(n_bytes) > left_ms:
            time.sleep(max(0.0, left_ms) / 1000.0)  # a real link would have held the request this long
            raise CloudTimeout(f"the emulated link ({self.link}) cannot carry {n_bytes} bytes "
                               f"within the {left_ms:.0f} ms left")
        self.link.transmit(n_bytes)

    def infer(self, payload: bytes, *, timeout_s: float, content_encoding: str | None = None) -> CloudInference:
        """Send a wire payload (:func:`popex.wire.encode_offload`) and get the final exit.

        Parameters
        ----------
        payload : bytes
            The safetensors offload payload, or its deflated form
            (:func:`popex.wire.compress_payload`) with
            ``content_encoding="deflate"``.
        timeout_s : float
            Time budget in seconds, emulated link delay included.
        content_encoding : str, optional
            Sent as the Content-Encoding header.

        Returns
        -------
        CloudInference

        Raises
        ------
        CloudTimeout, CloudUnavailable, CloudRejected
        """
        start_s = time.perf_counter()
        deadline_s = start_s + _check_timeout_s(timeout_s)
        self._wait_for_link(len(payload), deadline_s)
        headers = {} if content_encoding is None else {"Content-Encoding": content_encoding}
        response = self._post_data("POST", self._infer_url, deadline_s=deadline_s, data=payload, headers=headers)
        body = _json(response, ("label", "class_name", "confidence", "cloud_ms"))
        round_trip_ms = (time.perf_counter() - start_s) * 1000.0
        cloud_ms = float(body["cloud_ms"])
        return CloudInference(
            label=int(body["label"]),
            class_name=str(body["class_name"]),
            confidence=float(body["confidence"]),
            cloud_ms=cloud_ms,
            transfer_ms=max(0.0, round_trip_ms - cloud_ms),
            round_trip_ms=round_trip_ms,
            n_bytes=len(payload),
        )

    def probe(self, n_bytes: int, *, timeout_s: float) -> ProbeResult:
        """Upload ``n_bytes`` to the probe sink and time it (for the uplink monitor).

        Raises
        ------
        CloudTimeout, CloudUnavailable, CloudRejected
        ConfigError
            If ``n_bytes`` is not a non-negative int.
        """
        if isinstance(n_bytes, bool) or not isinstance(n_bytes, int) or n_bytes < 0:
            raise ConfigError(f"n_bytes must be a non-negative int, got {n_bytes!r}")
        body = bytes(n_bytes)
        start_s = time.perf_counter()
        deadline_s = start_s + _check_timeout_s(timeout_s)
        self._wait_for_link(n_bytes, deadline_s)
        response = self._post_data("POST", self._probe_url, deadline_s=deadline_s, data=body)
        reply = _json(response, ("n_bytes", "server_ms"))
        return ProbeResult(
            n_bytes=int(reply["n_bytes"]),
            round_trip_ms=(time.perf_counter() - start_s) * 1000.0,
            server_ms=float(reply["server_ms"]),
        )

    # -- control plane -------------------------------------------------------------

    def put_model(self, model_id: str, spec_bytes: bytes, weights_bytes: bytes, *,
                  timeout_s: float) -> RegisteredModel:
        """Upload a model (spec JSON + safetensors weights); harmless if already there.

        Raises
        ------
        CloudRejected
            If the cloud finds the spec, the weights or the id wrong (its
            message says which).
        CloudTimeout, CloudUnavailable
        """
        deadline_s = time.perf_counter() + _check_timeout_s(timeout_s)
        files = {"spec": ("spec.json", spec_bytes, "application/json"),
                 "weights": ("weights.safetensors", weights_bytes, "application/octet-stream")}
        response = self._send("PUT", self._model_url(model_id), deadline_s=deadline_s, files=files)
        body = _json(response, ("model_id", "n_stages"))
        return RegisteredModel(model_id=str(body["model_id"]), n_stages=int(body["n_stages"]),
                               created=response.status_code == 201)

    def has_model(self, model_id: str, *, timeout_s: float) -> bool:
        """Whether the cloud has model ``model_id`` (so the edge can skip an upload).

        Raises
        ------
        CloudTimeout, CloudUnavailable, CloudRejected
            A 404 is the answer False, not an error.
        """
        deadline_s = time.perf_counter() + _check_timeout_s(timeout_s)
        try:
            self._send("GET", self._model_url(model_id), deadline_s=deadline_s)
        except CloudRejected as err:
            if err.status == 404:
                return False
            raise
        return True

    def profile(self, model_id: str, *, n_repeats: int, timeout_s: float) -> list[float]:
        """Median cloud time of each stage in ms (``t^c_i`` of DESIGN.md §3), measured on the cloud now.

        Raises
        ------
        CloudTimeout, CloudUnavailable, CloudRejected
        """
        deadline_s = time.perf_counter() + _check_timeout_s(timeout_s)
        response = self._send("POST", f"{self._model_url(model_id)}/profile", deadline_s=deadline_s,
                              json={"n_repeats": n_repeats})
        stages = _json(response, ("stages",))["stages"]
        try:
            return [float(stage["cloud_ms"]) for stage in stages]
        except (TypeError, KeyError, ValueError) as err:
            raise CloudUnavailable("cloud answered a profile without cloud_ms per stage") from err

    def health(self, *, timeout_s: float) -> bool:
        """True if the cloud answers ``/healthz`` with status ok in time; False otherwise (never raises CloudError)."""
        deadline_s = time.perf_counter() + _check_timeout_s(timeout_s)
        try:
            response = self._send("GET", self._health_url, deadline_s=deadline_s)
            return _json(response, ("status",))["status"] == "ok"
        except CloudError:
            return False
