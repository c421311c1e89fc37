"""An in-process cloud behind the cloud port, for tests: scripted or real, recorded, failing on demand.

:class:`FakeCloud` satisfies :class:`popex.edge.cloud_port.CloudPort`, so the
edge (request pipeline, preparation, uplink monitor, Flask factory) runs
against it unchanged. It answers from a script (the default) or by a real
:class:`popex.cloud.runner.CloudRunner` on ``state_dir``, which stores, times
and runs models as the cloud service does, without HTTP.
"""

from __future__ import annotations

import os
import threading
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from popex.checks import check_finite
from popex.cloud.runner import CloudRunner
from popex.decision.latency import Link
from popex.edge.cloud_types import (
    CloudError,
    CloudInference,
    CloudRejected,
    CloudTimeout,
    CloudUnavailable,
    ProbeResult,
    RegisteredModel,
)
from popex.errors import ConfigError, PopexError
from popex.link.emulation import LinkEmulator
from popex.errors import SpecError
from popex.runtime.model_files import SPEC_FILE
from popex.runtime.onnx_model import MANIFEST_FILE, read_manifest
from popex.edge.fake_cloud_batch import BatchOffloads
from popex.wire import OffloadRequest, decode_offload, decompress_payload

__all__ = ["PORT_METHODS", "SCRIPTED_STAGE_MS", "Offload", "FakeCloud"]

#: The port's calls, the names :meth:`FakeCloud.fail` and ``calls`` use.
PORT_METHODS = ("infer", "infer_batch", "probe", "has_model", "put_model", "delete_model", "profile", "health")
#: The scripted cloud time of each stage, ms (a cloud faster than any edge).
SCRIPTED_STAGE_MS = 0.05
_GATED = ("has_model", "put_model", "profile")  # the preparation's calls; offloads are never held


def _rejected(err: PopexError) -> CloudRejected:
    """What the cloud service answers to a bad upload or payload: its 4xx."""
    return CloudRejected(err.http_status, err.code, str(err))


@dataclass(frozen=True)
class Offload:
    """One offload received: the decoded request, the edge's budget, the bytes on the wire (maybe deflated)."""

    request: OffloadRequest
    timeout_s: float
    n_bytes: int
    content_encoding: str | None


def _n_stages(files: Mapping[str, bytes]) -> int:
    """Stage count of a model given as files, read from model.json or spec.json (scripted mode)."""
    if MANIFEST_FILE in files:
        return len(read_manifest(files[MANIFEST_FILE])["stages"])
    try:
        return len(json.loads(files[SPEC_FILE])["stages"])
    except (KeyError, TypeError, ValueError) as err:
        raise SpecError(f"the files hold neither {MANIFEST_FILE} nor a {SPEC_FILE} with stages") from err


class FakeCloud(BatchOffloads):
    """A cloud port answered in this process.

    Parameters
    ----------
    state_dir : str or path-like, optional
        Run the cloud's half for real on this directory (created if
        missing); without it the answers are scripted.
    link : LinkEmulator, optional
        Emulated "in the client": offloads and probes wait for it, and the
        edge plans with it, as with ``CloudClient(link=...)``.
    uplink : Link, optional
        Without ``link``: probes answer as if they crossed this link (no
        waiting). With neither, a probe raises CloudTimeout.
    label, class_name, confidence : int, str, float
        The scripted answer to every offload.
    cloud_ms : float, optional
        Reported per offload; default 1.0 scripted, the measured time when real.
    transfer_ms : float
        Reported per offload on top of any emulated link, ms.
    stage_cloud_ms : sequence of float, optional
        The scripted profile, ms per stage; by default ``SCRIPTED_STAGE_MS``
        for each stage of the model as it was put here.
    probe_overhead_ms : float
        Added to a probe's link time (HTTP and timer overhead).
    gate_timeout_s : float
        Longest a preparation call waits while ``gate`` is cleared.

    Attributes
    ----------
    down : bool
        While True every call raises CloudUnavailable and ``health`` is False.
    gate : threading.Event
        Clear it to hold ``has_model``, ``put_model`` and ``profile`` (a
        model's preparation) until it is set again or the wait times out.
    calls : list of str
        Every call's name, in order (``PORT_METHODS`` and "close").
    offloads : list of Offload
        Every decodable offload, also those made to fail.
    models : set of str
        Ids of the models put here.
    runner : CloudRunner or None
        The real cloud half (with ``state_dir``).

    Raises
    ------
    ConfigError
        On a negative time or a bad ``link`` / ``uplink``.

    Examples
    --------
    >>> from popex.edge.cloud_port import CloudPort
    >>> cloud = FakeCloud()
    >>> isinstance(cloud, CloudPort), cloud.health(timeout_s=1.0)
    (True, True)
    >>> cloud.fail("health", CloudTimeout("late"))
    >>> cloud.health(timeout_s=1.0), cloud.calls
    (False, ['health', 'health'])
    """

    def __init__(self, *, state_dir: str | os.PathLike[str] | None = None, link: LinkEmulator | None = None,
                 uplink: Link | None = None, label: int = 4, class_name: str = "class4", confidence: float = 0.9,
                 cloud_ms: float | None = None, transfer_ms: float = 0.0,
                 stage_cloud_ms: Sequence[float] | None = None, probe_overhead_ms: float = 0.5,
                 gate_timeout_s: float = 10.0) -> None:
        if link is not None and not isinstance(link, LinkEmulator):
            raise ConfigError(f"link must be a LinkEmulator, got {type(link).__name__}")
        if uplink is not None and not isinstance(uplink, Link):
            raise ConfigError(f"uplink must be a Link, got {type(uplink).__name__}")
        self.runner = None if state_dir is None else CloudRunner(state_dir)
        self.link = link
        self.uplink = uplink
        self.label, self.class_name, self.confidence = int(label), str(class_name), float(confidence)
        self.cloud_ms = None if cloud_ms is None else check_finite(cloud_ms, name="cloud_ms", low=0.0)
        self.transfer_ms = check_finite(transfer_ms, name="transfer_ms", low=0.0)
        self.stage_cloud_ms = None if stage_cloud_ms is None else \
            [check_finite(ms, name="stage_cloud_ms", low=0.0) for ms in stage_cloud_ms]
        self.probe_overhead_ms = check_finite(probe_overhead_ms, name="probe_overhead_ms", low=0.0)
        self.gate_timeout_s = check_finite(gate_timeout_s, name="gate_timeout_s", low=0.0)
        self.down = False
        self.gate = threading.Event()
        self.gate.set()
        self.calls: list[str] = []
        self.offloads: list[Offload] = []
        self.models: set[str] = set()
        self._n_stages: dict[str, int] = {}
        self._failures: dict[str, CloudError] = {}
        self._lock = threading.Lock()

    def fail(self, method: str, error: CloudError) -> None:
        """Make every call of ``method`` raise ``error`` (``health`` answers False) until :meth:`recover`.

        Parameters
        ----------
        method : str
            One of :data:`PORT_METHODS`.
        error : CloudError
            e.g. ``CloudTimeout("late")`` or ``CloudRejected(404, "unknown_model", "...")``.

        Raises
        ------
        ConfigError
            On an unknown method or an error that is no CloudError.
        """
        if method not in PORT_METHODS:
            raise ConfigError(f"method must be one of {PORT_METHODS}, got {method!r}")
        if not isinstance(error, CloudError):
            raise ConfigError(f"error must be a CloudError, got {type(error).__name__}")
        with self._lock:
            self._failures[method] = error

    def recover(self, method: str | None = None) -> None:
        """Answer ``method`` again (every method when None); ``down`` is left as it is.

        Parameters
        ----------
        method : str, optional
        """
        with self._lock:
            if method is None:
                self._failures.clear()
            else:
                self._failures.pop(method, None)

    def _enter(self, method: str, timeout_s: float) -> None:
        """Record the call, check its budget, hold it at the gate, fail it if down."""
        with self._lock:
            self.calls.append(method)
        check_finite(timeout_s, name="timeout_s", low=0.0, low_open=True)
        if method in _GATED:
            self.gate.wait(self.gate_timeout_s)
        if self.down:
            raise CloudUnavailable("connection refused")

    def _receive(self, method: str, payload: bytes, timeout_s: float,
                 content_encoding: str | None) -> tuple[OffloadRequest, float]:
        """An offload's common start: record it, decode it (4xx if bad), fail as scripted, wait for the link."""
        self._enter(method, timeout_s)
        try:
            request = decode_offload(decompress_payload(payload, encoding=content_encoding))
        except PopexError as err:
            raise _rejected(err) from err
        with self._lock:
            self.offloads.append(Offload(request, float(timeout_s), len(payload), content_encoding))
        self._raise_failure(method)
        return request, self._link_ms(len(payload), timeout_s)

    def _raise_failure(self, method: str) -> None:
        error = self._failures.get(method)
        if error is not None:
            raise error

    def _holds(self, model_id: str) -> bool:
        return model_id in self.models or (self.runner is not None and self.runner.has(model_id))

    def _link_ms(self, n_bytes: int, timeout_s: float) -> float:
        if self.link is None:
            return 0.0
        if self.link.delay_ms(n_bytes) > timeout_s * 1000.0:
            raise CloudTimeout(f"the emulated link ({self.link}) cannot carry {n_bytes} bytes "
                               f"within {timeout_s * 1000.0:.0f} ms")
        return self.link.transmit(n_bytes)

    # -- the port ------------------------------------------------------------------

    def infer(self, payload: bytes, *, timeout_s: float, content_encoding: str | None = None) -> CloudInference:
        """Finish one offload: scripted, or by the real cloud half.

        Parameters
        ----------
        payload : bytes
        timeout_s : float
        content_encoding : str, optional

        Returns
        -------
        CloudInference
            ``round_trip_ms = cloud_ms + transfer_ms`` (emulated link included).

        Raises
        ------
        CloudUnavailable, CloudRejected, CloudError
            While ``down``; if the payload does not decode or the real cloud
            refuses it (its status and code); as set by :meth:`fail`.
        """
        request, link_ms = self._receive("infer", payload, timeout_s, content_encoding)
        label, class_name, confidence, cloud_ms = self.label, self.class_name, self.confidence, 1.0
        if self.runner is not None:
            try:
                reply = self.runner.infer_payload(payload, content_encoding=content_encoding)
            except PopexError as err:
                raise _rejected(err) from err
            label, class_name, confidence, cloud_ms = reply.label, reply.class_name, reply.confidence, \
                reply.cloud_ms
        cloud_ms = cloud_ms if self.cloud_ms is None else self.cloud_ms
        transfer_ms = link_ms + self.transfer_ms
        return CloudInference(label=label, class_name=class_name, confidence=confidence, cloud_ms=cloud_ms,
                              transfer_ms=transfer_ms, round_trip_ms=cloud_ms + transfer_ms, n_bytes=len(payload))

    def probe(self, n_bytes: int, *, timeout_s: float) -> ProbeResult:
        """Time a probe across ``link`` (waiting) or ``uplink`` (computed).

        Parameters
        ----------
        n_bytes : int
        timeout_s : float

        Returns
        -------
        ProbeResult
            Round trip = link time + ``probe_overhead_ms``; ``server_ms`` 0.1.

        Raises
        ------
        CloudUnavailable, CloudTimeout, CloudError
            While ``down``; without ``link`` and ``uplink`` or when the
            emulated link is too slow; as set by :meth:`fail`.
        ConfigError
            If ``n_bytes`` is not a non-negative int.
        """
        self._enter("probe", timeout_s)
        if isinstance(n_bytes, bool) or not isinstance(n_bytes, int) or n_bytes < 0:
            raise ConfigError(f"n_bytes must be a non-negative int, got {n_bytes!r}")
        self._raise_failure("probe")
        if self.link is not None:
            link_ms = self._link_ms(n_bytes, timeout_s)
        elif self.uplink is not None:
            link_ms = self.uplink.rtt_ms + 8.0 * n_bytes / (1000.0 * self.uplink.uplink_mbps)
        else:
            raise CloudTimeout("this FakeCloud has no link to probe (give it link= or uplink=)")
        return ProbeResult(n_bytes=n_bytes, round_trip_ms=link_ms + self.probe_overhead_ms, server_ms=0.1)

    def has_model(self, model_id: str, *, timeout_s: float) -> bool:
        """Whether ``model_id`` was put here (or is on the real cloud half's disk).

        Parameters
        ----------
        model_id : str
            Looked up in ``models``, then on the real half's disk.
        timeout_s : float
            Checked like the client's (positive, finite).

        Returns
        -------
        bool

        Raises
        ------
        CloudUnavailable, CloudError
            While ``down``; as set by :meth:`fail`.
        """
        self._enter("has_model", timeout_s)
        self._raise_failure("has_model")
        return self._holds(model_id)

    def put_model(self, model_id: str, files: Mapping[str, bytes], *,
                  timeout_s: float) -> RegisteredModel:
        """Keep the model (the real cloud half checks, stores and loads it).

        Parameters
        ----------
        model_id : str
        files : mapping of str to bytes
        timeout_s : float

        Returns
        -------
        RegisteredModel

        Raises
        ------
        CloudRejected
            If the files name no model (or, when real, a file or the id is wrong).
        CloudUnavailable, CloudError
            While ``down``; as set by :meth:`fail`.
        """
        self._enter("put_model", timeout_s)
        self._raise_failure("put_model")
        created = not self._holds(model_id)
        try:
            if self.runner is not None:
                n_stages = self.runner.register(model_id, files).net.n_stages
            else:
                n_stages = _n_stages(files)
        except PopexError as err:
            raise _rejected(err) from err
        with self._lock:
            self.models.add(model_id)
            self._n_stages[model_id] = n_stages
        return RegisteredModel(model_id=model_id, n_stages=n_stages, created=created)

    def delete_model(self, model_id: str, *, timeout_s: float) -> bool:
        """Forget the model (the real cloud half deletes its files); False if it was not here.

        >>> FakeCloud().delete_model("m" * 64, timeout_s=1.0)
        False
        """
        self._enter("delete_model", timeout_s)
        self._raise_failure("delete_model")
        held = self._holds(model_id)
        if self.runner is not None:
            self.runner.remove(model_id)
        with self._lock:
            self.models.discard(model_id)
            self._n_stages.pop(model_id, None)
        return held

    def profile(self, model_id: str, *, n_repeats: int, timeout_s: float) -> list[float]:
        """The scripted stage times, or the real cloud half's measurement.

        Parameters
        ----------
        model_id : str
        n_repeats : int
        timeout_s : float

        Returns
        -------
        list of float
            ms per stage.

        Raises
        ------
        CloudRejected
            If the model is unknown (404) and there is no scripted profile.
        CloudUnavailable, CloudError
            While ``down``; as set by :meth:`fail`.
        """
        self._enter("profile", timeout_s)
        self._raise_failure("profile")
        if self.runner is None and self.stage_cloud_ms is not None:
            return list(self.stage_cloud_ms)
        if self.runner is None:
            if model_id not in self._n_stages:
                raise CloudRejected(404, "unknown_model", f"no model {model_id!r} was put on this FakeCloud")
            return [SCRIPTED_STAGE_MS] * self._n_stages[model_id]
        try:
            return self.runner.profile(model_id, n_repeats=n_repeats)
        except PopexError as err:
            raise _rejected(err) from err

    def health(self, *, timeout_s: float) -> bool:
        """True unless ``down`` or made to fail.

        Parameters
        ----------
        timeout_s : float

        Returns
        -------
        bool
        """
        try:
            self._enter("health", timeout_s)
            self._raise_failure("health")
        except CloudError:
            return False
        return True

    def close(self) -> None:
        """Record the close (the fake holds no connection); calls keep working."""
        with self._lock:
            self.calls.append("close")
