"""The edge's HTTP client of the cloud service (``cloud_api``), one implementation of the cloud port.

Every call takes ``timeout_s``, the time left in the request's budget, as
its connect and read timeout. Failures are the exceptions of
:mod:`popex.edge.cloud_types`, never ``None``. A connection error is retried
at most once, and only while budget is left
(:func:`popex.edge.cloud_http.retry_connection_error_once`).

The data plane (offloads and probes) goes through one persistent
``http.client`` connection per thread
(:class:`popex.edge.cloud_http.KeepAliveConnections`); control calls (model
upload, profile, health) use a ``requests.Session``.

With a :class:`~popex.link.emulation.LinkEmulator`, offloads and
probes first wait for the emulated uplink (model uploads, profiles and
health checks are control traffic and are not delayed).
"""

from __future__ import annotations

from collections.abc import Mapping

import http.client
import math
import time
from typing import Any
from urllib.parse import quote, urlsplit

import requests

from popex.edge.cloud_http import (
    ConnectionFailed,
    KeepAliveConnections,
    Reply,
    checked,
    json_body,
    retry_connection_error_once,
    time_left_s,
)
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
from popex.errors import ConfigError
from popex.link.emulation import LinkEmulator
from popex.wire import OffloadReply, WireError, replies_from_dict

__all__ = ["API_PREFIX", "CloudClient"]

API_PREFIX = "/api/v1"
_OCTET_STREAM = "application/octet-stream"


def _check_timeout_s(timeout_s: float) -> float:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not math.isfinite(timeout_s) \
            or timeout_s <= 0:
        raise ConfigError(f"timeout_s must be a positive finite number of seconds, got {timeout_s!r}")
    return float(timeout_s)


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
        self._connections = KeepAliveConnections(self.base_url) if self._owns_session else None
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
        timeout_s = time_left_s(method, url, deadline_s)
        headers = self._headers if content_type is None else {**self._headers, "Content-Type": content_type}
        if "headers" in kwargs:
            headers = {**headers, **kwargs.pop("headers")}
        try:
            response = self._session.request(method, url, headers=headers, timeout=timeout_s, **kwargs)
        except requests.Timeout as err:  # ConnectTimeout included: the budget ran out while connecting
            raise CloudTimeout(f"{method} {url}: no answer within {timeout_s * 1000:.0f} ms") from err
        except requests.ConnectionError as err:
            raise ConnectionFailed(f"{method} {url}: cannot reach the cloud ({err})") from err
        except requests.RequestException as err:
            raise CloudUnavailable(f"{method} {url}: {err}") from err
        return checked(method, url, response)

    _send = retry_connection_error_once(_send_once)

    @retry_connection_error_once
    def _post_data(self, method: str, url: str, *, deadline_s: float, data: bytes,
                   headers: dict[str, str] | None = None) -> requests.Response | Reply:
        """A data-plane POST (offload, probe): the keep-alive connection, or the injected session."""
        if self._connections is None:
            return self._send_once(method, url, deadline_s=deadline_s, data=data, content_type=_OCTET_STREAM,
                                   headers=headers or {})
        timeout_s = time_left_s(method, url, deadline_s)
        all_headers = {**self._headers, "Content-Type": _OCTET_STREAM, **(headers or {})}
        try:
            response = self._connections.request(method, urlsplit(url).path, body=data, headers=all_headers,
                                                 timeout_s=timeout_s)
        except TimeoutError as err:  # socket.timeout: connecting or waiting for the answer
            raise CloudTimeout(f"{method} {url}: no answer within {timeout_s * 1000:.0f} ms") from err
        except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine) as err:
            raise ConnectionFailed(f"{method} {url}: cannot reach the cloud ({err})") from err
        except (OSError, http.client.HTTPException) as err:
            raise CloudUnavailable(f"{method} {url}: {err}") from err
        return checked(method, url, response)

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
        ConfigError
            If ``timeout_s`` is not a positive finite number.
        """
        start_s = time.perf_counter()
        response = self._offload(self._infer_url, payload, timeout_s=timeout_s, content_encoding=content_encoding)
        try:  # the one contract the cloud answers with (popex.wire)
            reply = OffloadReply.from_dict(json_body(response, ()))
        except WireError as err:
            raise CloudUnavailable(f"cloud answered {response.status_code} with a malformed reply: {err}") from err
        round_trip_ms = (time.perf_counter() - start_s) * 1000.0
        cloud_ms = reply.cloud_ms
        return CloudInference(
            label=reply.label,
            class_name=reply.class_name,
            confidence=reply.confidence,
            cloud_ms=cloud_ms,
            transfer_ms=max(0.0, round_trip_ms - cloud_ms),
            round_trip_ms=round_trip_ms,
            n_bytes=len(payload),
        )

    def infer_batch(self, payload: bytes, *, request_ids: tuple[str, ...], timeout_s: float,
                    content_encoding: str | None = None) -> CloudBatchInference:
        """Send a batched payload (``request_ids`` in its metadata) and get one final exit per sample.

        Parameters
        ----------
        payload : bytes
            :func:`popex.wire.encode_offload` with ``request_ids``, maybe deflated.
        request_ids : tuple of str
            The ids in the payload, in batch order: the reply must echo them.
        timeout_s : float
            The tightest budget in the batch, s.
        content_encoding : str, optional

        Returns
        -------
        CloudBatchInference

        Raises
        ------
        CloudTimeout, CloudUnavailable, CloudRejected
        """
        start_s = time.perf_counter()
        response = self._offload(self._infer_url + "/batch", payload, timeout_s=timeout_s,
                                 content_encoding=content_encoding)
        try:
            replies = replies_from_dict(json_body(response, ()), request_ids=request_ids)
        except WireError as err:
            raise CloudUnavailable(f"cloud answered {response.status_code} with a malformed reply: {err}") from err
        round_trip_ms = (time.perf_counter() - start_s) * 1000.0
        cloud_ms = max(reply.cloud_ms for reply in replies)
        return CloudBatchInference(replies=tuple(replies), cloud_ms=cloud_ms, round_trip_ms=round_trip_ms,
                                   transfer_ms=max(0.0, round_trip_ms - cloud_ms), n_bytes=len(payload))

    def _offload(self, url: str, payload: bytes, *, timeout_s: float,
                 content_encoding: str | None) -> requests.Response | Reply:
        deadline_s = time.perf_counter() + _check_timeout_s(timeout_s)
        self._wait_for_link(len(payload), deadline_s)
        headers = {} if content_encoding is None else {"Content-Encoding": content_encoding}
        return self._post_data("POST", url, deadline_s=deadline_s, data=payload, headers=headers)

    def probe(self, n_bytes: int, *, timeout_s: float) -> ProbeResult:
        """Upload ``n_bytes`` to the probe sink and time it (for the uplink monitor).

        Parameters
        ----------
        n_bytes : int
            Zero bytes measure the round trip alone.
        timeout_s : float
            Time budget in seconds, emulated link delay included.

        Returns
        -------
        ProbeResult

        Raises
        ------
        CloudTimeout, CloudUnavailable, CloudRejected
        ConfigError
            If ``n_bytes`` is not a non-negative int or ``timeout_s`` not a positive number.
        """
        if isinstance(n_bytes, bool) or not isinstance(n_bytes, int) or n_bytes < 0:
            raise ConfigError(f"n_bytes must be a non-negative int, got {n_bytes!r}")
        body = bytes(n_bytes)
        start_s = time.perf_counter()
        deadline_s = start_s + _check_timeout_s(timeout_s)
        self._wait_for_link(n_bytes, deadline_s)
        response = self._post_data("POST", self._probe_url, deadline_s=deadline_s, data=body)
        reply = json_body(response, ("n_bytes", "server_ms"))
        return ProbeResult(
            n_bytes=int(reply["n_bytes"]),
            round_trip_ms=(time.perf_counter() - start_s) * 1000.0,
            server_ms=float(reply["server_ms"]),
        )

    # -- control plane -------------------------------------------------------------

    def put_model(self, model_id: str, files: Mapping[str, bytes], *,
                  timeout_s: float) -> RegisteredModel:
        """Upload a model in the form it was registered in; harmless if already there.

        Parameters
        ----------
        model_id : str
            The hash of the files (the cloud checks it).
        files : mapping of str to bytes
            Path in the model directory -> content: model.json and its ONNX
            graphs, or spec.json and weights.safetensors.
        timeout_s : float

        Returns
        -------
        RegisteredModel

        Raises
        ------
        CloudRejected
            If the cloud finds a file or the id wrong (its message says which).
        CloudTimeout, CloudUnavailable
        """
        deadline_s = time.perf_counter() + _check_timeout_s(timeout_s)
        parts = [("files", (path, data, "application/octet-stream")) for path, data in sorted(files.items())]
        response = self._send("PUT", self._model_url(model_id), deadline_s=deadline_s, files=parts)
        body = json_body(response, ("model_id", "n_stages"))
        return RegisteredModel(model_id=str(body["model_id"]), n_stages=int(body["n_stages"]),
                               created=response.status_code == 201)

    def has_model(self, model_id: str, *, timeout_s: float) -> bool:
        """Whether the cloud has model ``model_id`` (so the edge can skip an upload).

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

    def delete_model(self, model_id: str, *, timeout_s: float) -> bool:
        """Remove model ``model_id`` from the cloud.

        Parameters
        ----------
        model_id : str
        timeout_s : float

        Returns
        -------
        bool
            False when the cloud did not have it (a 404 is an answer, not an error).

        Raises
        ------
        CloudTimeout, CloudUnavailable, CloudRejected
        """
        deadline_s = time.perf_counter() + _check_timeout_s(timeout_s)
        try:
            self._send("DELETE", self._model_url(model_id), deadline_s=deadline_s)
        except CloudRejected as err:
            if err.status == 404:
                return False
            raise
        return True

    def profile(self, model_id: str, *, n_repeats: int, timeout_s: float) -> list[float]:
        """Median cloud time of each stage in ms (``t^c_i`` of DESIGN.md §3), measured on the cloud now.

        Parameters
        ----------
        model_id : str
        n_repeats : int
            Timed runs per stage.
        timeout_s : float

        Returns
        -------
        list of float
            One time per stage, ms.

        Raises
        ------
        CloudTimeout, CloudUnavailable, CloudRejected
        """
        deadline_s = time.perf_counter() + _check_timeout_s(timeout_s)
        response = self._send("POST", f"{self._model_url(model_id)}/profile", deadline_s=deadline_s,
                              json={"n_repeats": n_repeats})
        stages = json_body(response, ("stages",))["stages"]
        try:
            return [float(stage["cloud_ms"]) for stage in stages]
        except (TypeError, KeyError, ValueError) as err:
            raise CloudUnavailable("cloud answered a profile without cloud_ms per stage") from err

    def health(self, *, timeout_s: float) -> bool:
        """Whether the cloud answers ``/healthz`` with status ok in time.

        Parameters
        ----------
        timeout_s : float

        Returns
        -------
        bool
            False on any cloud failure (never raises CloudError).

        Raises
        ------
        ConfigError
            If ``timeout_s`` is not a positive finite number.
        """
        deadline_s = time.perf_counter() + _check_timeout_s(timeout_s)
        try:
            response = self._send("GET", self._health_url, deadline_s=deadline_s)
            return json_body(response, ("status",))["status"] == "ok"
        except CloudError:
            return False
