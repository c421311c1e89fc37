"""The experiments' testbed: a real cloud and a real edge joined by a shaped (or emulated) link.

Two ways to make the link, picked once per run and reported with every result:

- ``netns`` (root, the default where it works): the cloud runs in its own
  network namespace behind a veth pair whose edge -> cloud direction is
  rate-limited by the kernel (tc tbf, :func:`popex.testbed.netns.shaped_link`).
  Where the kernel has no netem (this machine) the RTT is added by the
  edge's client-side link emulation at a rate so high that it adds nothing
  else; the RTT is changed through the edge's admin endpoint.
- ``emulation`` (no root, or asked for): cloud and edge on loopback, rate
  and RTT both emulated by the edge's cloud client; both are changed
  through the edge's admin endpoint (``PUT /api/v1/admin/link``).

The edge is started at a fast link so that pushing the model to the cloud
and measuring the per-offload overhead O do not wait for a slow one; each
experiment then sets its own link. The edge device is emulated
``edge_slowdown`` times slower than this machine (on a server-class CPU the
edge would otherwise always win). Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests
from tqdm import tqdm

from popex.data import default_test_set, encode_png
from popex.decision.latency import Profile
from popex.decision.policies import DEFAULT_HEADROOM_FRACTION
from popex.errors import ConfigError
from popex.link.emulation import EMULATED_RATE_MBPS
from popex.testbed.netns import HarnessUnavailable, ShapedLink, shaped_link
from popex.testbed.services import REPO_ROOT, ServiceError, ServiceProcess, start_cloud, start_edge

__all__ = [
    "MODES",
    "TestbedConfig",
    "ImageSet",
    "Testbed",
    "load_images",
    "strategy_text",
]

#: How the link is made: kernel tbf in a namespace, or the edge's client-side emulation.
MODES = ("netns", "emulation")
_ADMIN_PATH = "/api/v1/admin/link"
_HTTP_TIMEOUT_S = 30.0
_MODEL_READY_TIMEOUT_S = 240.0
_STARTUP_UPLINK_MBPS = 100.0
_MIN_RTT_SAMPLES = 5
_RTT_WINDOW_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class TestbedConfig:
    """What the testbed starts.

    Attributes
    ----------
    rtt_ms : float
        Round-trip time of the link, ms.
    edge_slowdown : float
        Emulated edge device: this many times slower than this machine.
    objective : {"mean", "tail"}
        What the edge's decisions bound: E[T] or the per-sample worst case.
    default_deadline_ms : float
        Requirement of a request that names none, ms.
    probe_interval_s : float
        Seconds between two rounds of the edge's uplink monitor.
    probe_n_bytes : int
        The most bytes of one active probe (the edge sizes each from the RTT and its estimate).
    uplink_window_n : int
        Samples in the monitor's sliding median.
    mode : {"netns", "emulation"} or None
        None: ``netns`` where it works (root), else ``emulation``.
    model_dir : Path
        The model the edge serves.
    plan_headroom_fraction : float
        The edge's ``plan_headroom_fraction`` (its default); predictions
        made offline must use the same (``Predictor(headroom_fraction=)``).
    wire_compression : {"none", "deflate"}
        The edge's ``wire_compression``. "none" by default here: tc tbf
        forwards a message that fits its bucket (>= one 1514-byte frame) at
        line speed, and deflated payloads (0.6-6 KB for the default model)
        mostly would, so the shaped link would not delay them the way a real
        link of that rate does. Uncompressed payloads (2.3-12.8 KB) keep the
        emulation close to a real link; the service default is "deflate".
    edge_overrides : mapping
        Further keys of ``configs/edge.yaml``.
    """

    __test__ = False  # not a pytest test class, whatever its name

    rtt_ms: float = 20.0
    edge_slowdown: float = 30.0
    objective: str = "mean"
    default_deadline_ms: float = 100.0
    probe_interval_s: float = 1.0
    probe_n_bytes: int = 1048576
    uplink_window_n: int = 5
    mode: str | None = None
    model_dir: Path = REPO_ROOT / "models" / "b-alexnet"
    plan_headroom_fraction: float = DEFAULT_HEADROOM_FRACTION
    wire_compression: str = "none"
    edge_overrides: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageSet:
    """Encoded test images and their labels (the stream every policy gets)."""

    images_png: list[bytes]
    labels: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.images_png)

    def head(self, n_images: int) -> ImageSet:
        """The first ``n_images`` images (warm-ups)."""
        return ImageSet(images_png=self.images_png[:n_images], labels=self.labels[:n_images], source=self.source)


class Testbed:
    """A cloud and an edge over one link; use as a context manager.

    Parameters
    ----------
    config : TestbedConfig
    work_dir : Path
        Logs and service state (emptied first).

    Attributes
    ----------
    mode : str
        "netns" or "emulation".
    link_note : str
        One line saying how rate and RTT are applied.
    edge_url : str
    model_id : str
        The default model's id, once ready.
    uplink_mbps, rtt_ms : float
        The link in force.
    """

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self, config: TestbedConfig, work_dir: Path) -> None:
        if config.mode not in (None, *MODES):
            raise ConfigError(f"mode must be one of {MODES} or None, got {config.mode!r}")
        self.config = config
        self.work_dir = Path(work_dir)
        self.token = secrets.token_hex(16)
        self.mode = ""
        self.link_note = ""
        self.edge_url = ""
        self.model_id = ""
        self.uplink_mbps = _STARTUP_UPLINK_MBPS
        self.rtt_ms = float(config.rtt_ms)
        self._stack = contextlib.ExitStack()
        self._link: ShapedLink | None = None
        self._edge: ServiceProcess | None = None
        self._session = requests.Session()
        self._session_lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Testbed:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._session.close()
        self._stack.close()

    def _start(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config = self.config
        mode = config.mode
        if mode in (None, "netns"):
            try:
                self._link = self._stack.enter_context(
                    shaped_link(uplink_mbps=_STARTUP_UPLINK_MBPS, rtt_ms=config.rtt_ms, name_prefix="pxexp"))
                mode = "netns"
            except HarnessUnavailable as err:
                if config.mode == "netns":
                    raise
                print(f"testbed: no kernel-shaped link here ({err}); using the edge's link emulation",
                      file=sys.stderr)
                mode = "emulation"
        self.mode = mode
        if self._link is not None:
            link = self._link
            cloud = start_cloud(token=self.token, state_dir=self.work_dir / "cloud", log_path=self.work_dir /
                                "cloud.log", host=link.cloud_ip, prefix=["ip", "netns", "exec", link.netns])
            # The RTT is always emulated at the edge (set through the admin endpoint), also where netem
            # exists, so that one knob changes it; the rate is the kernel's.
            emulate_link = f"{EMULATED_RATE_MBPS},{config.rtt_ms:g}"
            self.link_note = ("rate: tc tbf on a veth pair (cloud in its own network namespace); RTT: added by "
                              "the edge's client-side link emulation")
        else:
            cloud = start_cloud(token=self.token, state_dir=self.work_dir / "cloud",
                                log_path=self.work_dir / "cloud.log")
            emulate_link = f"{_STARTUP_UPLINK_MBPS:g},{config.rtt_ms:g}"
            self.link_note = "rate and RTT: the edge's client-side link emulation (no root: no kernel shaping)"
        self._stack.callback(cloud.stop)
        cloud.wait_ready()
        edge_config = {
            "objective": config.objective,
            "default_deadline_ms": config.default_deadline_ms,
            "probe_interval_s": config.probe_interval_s,
            "probe_n_bytes": config.probe_n_bytes,
            "uplink_window_n": config.uplink_window_n,
            "default_model_dir": str(config.model_dir),
            "wire_compression": config.wire_compression,
            "plan_headroom_fraction": config.plan_headroom_fraction,
            **config.edge_overrides,
        }
        self._edge = start_edge(token=self.token, cloud_url=cloud.url, state_dir=self.work_dir / "edge",
                                log_path=self.work_dir / "edge.log", emulate_link=emulate_link,
                                edge_slowdown=config.edge_slowdown, config=edge_config)
        self._stack.callback(self._edge.stop)
        self._edge.wait_ready()
        self.edge_url = self._edge.url
        self.model_id = self._wait_model_ready()

    def _wait_model_ready(self) -> str:
        deadline_s = time.monotonic() + _MODEL_READY_TIMEOUT_S
        while time.monotonic() < deadline_s:
            models = self.get("/api/v1/models")["models"]
            if models and models[0]["state"] == "ready":
                return str(models[0]["model_id"])
            if models and models[0]["state"] == "failed":
                raise ServiceError(f"the edge could not prepare its model: {models[0]}")
            time.sleep(0.5)
        raise ServiceError(f"the default model was not ready after {_MODEL_READY_TIMEOUT_S:.0f} s:\n"
                           f"{self._edge.log_tail() if self._edge else ''}")

    # -- HTTP ----------------------------------------------------------------------------------

    def get(self, path: str, **params: Any) -> dict[str, Any]:
        """GET a JSON document from the edge."""
        with self._session_lock:
            response = self._session.get(self.edge_url + path, params=params or None, timeout=_HTTP_TIMEOUT_S)
        if response.status_code != 200:
            raise ServiceError(f"GET {path} answered {response.status_code}: {response.text[:300]}")
        return response.json()

    def status(self) -> dict[str, Any]:
        """``GET /api/v1/status``."""
        return self.get("/api/v1/status")

    def model(self) -> dict[str, Any]:
        """``GET /api/v1/models/<id>`` of the served model (its profile, link and strategy)."""
        return self.get(f"/api/v1/models/{self.model_id}")

    def profile(self) -> Profile:
        """The profile the edge plans with now (scaled edge times, measured cloud times, O, fixed time),
        with O made whole for predictions at a *true* link.

        An edge that measures R as a zero-byte HTTP round trip keeps one
        request's HTTP cost in R and out of O. A prediction at the link in
        force (R = its RTT) needs that cost back in O: the edge's R estimate
        minus the RTT in force, once the estimate holds a full window of
        round trips. Call it while the link is steady.
        """
        profile = Profile.from_dict(self.model()["profile"])
        uplink = self.status()["uplink"]
        # The first round trips after a start run cold (10 ms more here): wait for a full window.
        deadline_s = time.monotonic() + _RTT_WINDOW_TIMEOUT_S
        n_wanted = min(_MIN_RTT_SAMPLES, self.config.uplink_window_n)
        while uplink.get("n_rtt_samples", 0) < n_wanted and time.monotonic() < deadline_s:
            time.sleep(0.5)
            uplink = self.status()["uplink"]
        if uplink.get("rtt_source") != "http":
            return profile
        http_ms = max(0.0, float(uplink["rtt_ms"]) - self.rtt_ms)
        return dataclasses.replace(profile, offload_overhead_ms=profile.offload_overhead_ms + http_ms)

    def _put_admin_link(self, uplink_mbps: float, rtt_ms: float) -> dict[str, Any]:
        with self._session_lock:
            response = self._session.put(self.edge_url + _ADMIN_PATH, json={"uplink_mbps": uplink_mbps,
                                                                             "rtt_ms": rtt_ms},
                                         headers=self._edge.admin_headers(),
                                         timeout=_HTTP_TIMEOUT_S)
        if response.status_code != 200:
            raise ServiceError(f"PUT {_ADMIN_PATH} answered {response.status_code}: {response.text[:300]}")
        return response.json()

    # -- the link --------------------------------------------------------------------------------

    def set_link(self, *, uplink_mbps: float, rtt_ms: float | None = None) -> float:
        """Put a link in force now; returns ``time.time()`` right after the change.

        netns: the tbf rate (``tc qdisc replace``), and the RTT through the
        admin endpoint when it changes; emulation: both through the admin
        endpoint.

        Raises
        ------
        ConfigError
            On values out of range.
        ServiceError, ShapingError
            If the change fails.
        """
        rtt_ms = self.rtt_ms if rtt_ms is None else float(rtt_ms)
        if self._link is not None:
            self._link.set_rate(uplink_mbps)
            if rtt_ms != self.rtt_ms:
                self._put_admin_link(EMULATED_RATE_MBPS, rtt_ms)
        else:
            self._put_admin_link(uplink_mbps, rtt_ms)
        self.uplink_mbps, self.rtt_ms = float(uplink_mbps), rtt_ms
        return time.time()

    def wait_estimate(self, *, tolerance_fraction: float = 0.25, timeout_s: float = 30.0,
                      rtt_slack_ms: float = 10.0) -> dict[str, Any]:
        """Wait until the edge plans with (about) the link in force; returns the status's ``uplink``.

        The planned uplink must be within ``tolerance_fraction`` of the rate
        and the planned RTT within that fraction or ``rtt_slack_ms`` of the
        RTT (the monitor's RTT is a zero-byte HTTP round trip, a few ms above
        the link's). Returns after ``timeout_s`` in any case (the caller records how
        far off the estimate was).
        """
        deadline_s = time.monotonic() + timeout_s
        uplink: dict[str, Any] = {}
        while time.monotonic() < deadline_s:
            uplink = self.status()["uplink"]
            planned = uplink.get("planned", uplink)
            rate_ok = abs(planned["uplink_mbps"] - self.uplink_mbps) <= tolerance_fraction * self.uplink_mbps
            rtt_ok = abs(planned["rtt_ms"] - self.rtt_ms) <= max(tolerance_fraction * self.rtt_ms, rtt_slack_ms)
            if rate_ok and rtt_ok:
                break
            time.sleep(0.25)
        return uplink

    # -- classify ----------------------------------------------------------------------------------

    def classify(self, session: requests.Session, image_png: bytes, label: int, *, policy: str,
                 deadline_ms: float) -> dict[str, Any]:
        """Send one image to the edge; one flat record of what happened (latencies in ms).

        Raises
        ------
        ServiceError
            On a non-200 answer.
        """
        sent_s = time.time()
        started = time.perf_counter()
        response = session.post(f"{self.edge_url}/api/v1/classify", params={"policy": policy,
                                                                            "deadline_ms": deadline_ms},
                                data=image_png, headers={"Content-Type": "image/png"}, timeout=_HTTP_TIMEOUT_S)
        client_ms = (time.perf_counter() - started) * 1000.0
        body = response.json()
        if response.status_code != 200:
            raise ServiceError(f"classify answered {response.status_code}: {body}")
        return {
            "sent_s": sent_s,
            "policy": policy,
            "deadline_ms": deadline_ms,
            "label": int(label),
            "predicted_label": int(body["label"]),
            "correct": int(body["label"]) == int(label),
            "split": int(body["split"]),
            "thresholds": tuple(body["thresholds"]),
            "strategy": strategy_text(body["split"], body["thresholds"]),
            "exit": body["exit"],
            "where": body["where"],
            "fallback": bool(body["fallback"]),
            "feasible": bool(body["feasible"]),
            "latency_ms": float(body["latency_ms"]["total"]),
            "edge_ms": float(body["latency_ms"]["edge"]),
            "transfer_ms": float(body["latency_ms"]["transfer"]),
            "cloud_ms": float(body["latency_ms"]["cloud"]),
            "client_ms": client_ms,
            "edge_predicted_ms": float(body["predicted_latency_ms"]),
        }

    def stream(self, images: ImageSet, *, policy: str, deadline_ms: float, desc: str,
               progress: bool = True) -> list[dict[str, Any]]:
        """Send every image once, one after the other; one record per image (see :meth:`classify`)."""
        records = []
        with requests.Session() as session:
            for index in tqdm(range(len(images)), desc=desc, leave=False, file=sys.stderr, disable=not progress):
                records.append(self.classify(session, images.images_png[index], int(images.labels[index]),
                                             policy=policy, deadline_ms=deadline_ms))
        return records


def strategy_text(split: int, thresholds: Any) -> str:
    """``"s=2 θ=[0.80,off]"``: one strategy as text (CSV key and plot label).

    Examples
    --------
    >>> strategy_text(2, [0.8, None])
    's=2 θ=[0.80,off]'
    """
    shown = ",".join("off" if t is None or (isinstance(t, float) and np.isnan(t)) else f"{t:.2f}"
                     for t in thresholds)
    return f"s={int(split)} θ=[{shown}]"


def load_images(n_images: int, *, seed: int = 0) -> ImageSet:
    """``n_images`` Fashion-MNIST test images, drawn without replacement with ``seed``, as PNG bytes.

    Raises
    ------
    ConfigError
        If ``n_images`` < 1.
    """
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise ConfigError(f"n_images must be an int >= 1, got {n_images!r}")
    test = default_test_set()
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(test.dataset), size=min(n_images, len(test.dataset)), replace=False)
    source = "full test split" if test.source == "debian" else "shipped 1,000-image test subset"
    return ImageSet(images_png=[encode_png(test.dataset.images[i]) for i in chosen],
                    labels=np.asarray(test.dataset.labels[chosen]), source=source)

