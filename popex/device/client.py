"""The device tier's client: ask the edge, and answer locally when the edge is late or unreachable.

A device holds the model (the same files the edge registered, run with ONNX
Runtime) so that it can always answer: it sends the image to the edge
(``POST /api/v1/classify``, the edge runs its plan and may offload to the
cloud) with a timeout taken from the request's deadline, and on a
connection failure, a timeout, a 5xx or an edge that does not (yet) hold
the model, it runs the network itself and answers its best local exit (the
final one), marked ``fallback``. A 4xx about the request itself is the
caller's error and is raised, not hidden. ``slowdown`` emulates a slower
device (a Raspberry-Pi-class factor from ``configs/devices.yaml``) by
sleeping for the extra compute time.

Runs stages 1..x on the device are part of issue 12's three-tier runtime and
not built yet: today the device sends the image (x = 0) or computes
everything (x = N, the fallback).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import requests

from popex.checks import check_deadline_ms, check_finite
from popex.data.images import decode_image
from popex.data.preprocess import Preprocessing, preprocess
from popex.decision.calibration import CALIBRATION_FILE, load_calibration
from popex.errors import PopexError
from popex.runtime.exits import exit_confidence
from popex.runtime.model_files import load_model_dir

__all__ = ["DEFAULT_TIMEOUT_MS", "DeviceAnswer", "DeviceClient", "DeviceError"]

#: The edge's answer is awaited this long when no deadline is given.
DEFAULT_TIMEOUT_MS = 10_000.0
_FALLBACK_STATUSES = {404, 409, 503}  # the edge lacks the model or is not ready: answer here


class DeviceError(PopexError):
    """The edge refused the request itself (a 4xx): falling back would hide the caller's error."""

    code = "device_error"


@dataclass(frozen=True)
class DeviceAnswer:
    """One image's answer: label, the exit and the tier that gave it, the cuts, the latency, whether a fallback."""

    label: int
    class_name: str
    exit: int | str
    where: str
    cuts: tuple[int, int]
    latency_ms: float
    fallback: bool
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON line of ``popex device classify --json``.

        Returns
        -------
        dict
        """
        body = {"label": self.label, "class_name": self.class_name, "exit": self.exit, "where": self.where,
                "cuts": list(self.cuts), "latency_ms": self.latency_ms, "fallback": self.fallback}
        if self.reason:
            body["reason"] = self.reason
        return body


class DeviceClient:
    """A device: the model here, the edge at ``edge_url``.

    Parameters
    ----------
    edge_url : str
        e.g. ``http://127.0.0.1:8000``.
    model_dir : path
        The model's directory (either form); its id names it to the edge.
    slowdown : float
        Emulated device: local compute takes this many times longer (>= 1).
    n_threads : int
        ONNX Runtime threads for local compute.
    """

    def __init__(self, *, edge_url: str, model_dir: str | os.PathLike[str], slowdown: float = 1.0,
                 n_threads: int = 1) -> None:
        self.edge_url = edge_url.rstrip("/")
        self.slowdown = check_finite(slowdown, name="slowdown", low=1.0)
        loaded = load_model_dir(model_dir, n_threads=n_threads)
        self.model_id = loaded.model_id
        self.net = loaded.net
        self.preprocessing = Preprocessing.from_spec_dict(loaded.spec)
        path = Path(model_dir) / CALIBRATION_FILE
        self._final_temperature = float(load_calibration(path).temperature[-1]) if path.is_file() else 1.0
        self._session = requests.Session()

    def close(self) -> None:
        """Close the HTTP session."""
        self._session.close()

    def _local(self, image_bytes: bytes, started_s: float, reason: str) -> DeviceAnswer:
        compute_started_s = time.perf_counter()
        x = preprocess(decode_image(image_bytes), self.preprocessing)
        logits = self.net.run_stages(x[None] if x.ndim == len(self.net.input_shape) else x)
        if self.slowdown > 1.0:  # an emulated device is slower by this factor
            time.sleep((time.perf_counter() - compute_started_s) * (self.slowdown - 1.0))
        confidence, predicted = exit_confidence(np.asarray(logits), temperature=self._final_temperature)
        label = int(predicted[0])
        n_stages = self.net.n_stages
        return DeviceAnswer(label=label, class_name=self.net.class_names[label], exit="final", where="device",
                            cuts=(n_stages, n_stages), latency_ms=(time.perf_counter() - started_s) * 1000.0,
                            fallback=True, reason=reason)

    def classify(self, image_bytes: bytes, *, deadline_ms: float | None = None) -> DeviceAnswer:
        """Classify one image: the edge's answer, or the device's own if the edge is late or unreachable.

        Parameters
        ----------
        image_bytes : bytes
            PNG, JPEG or BMP.
        deadline_ms : float, optional
            The requirement, sent to the edge and used as the timeout of its answer.

        Returns
        -------
        DeviceAnswer

        Raises
        ------
        DeviceError
            The edge answered a 4xx about the request (a bad image or deadline).
        """
        started_s = time.perf_counter()
        params = {"model": self.model_id}
        if deadline_ms is not None:
            params["deadline_ms"] = repr(check_deadline_ms(deadline_ms))
        timeout_s = (DEFAULT_TIMEOUT_MS if deadline_ms is None else max(deadline_ms, 1.0)) / 1000.0
        try:
            response = self._session.post(f"{self.edge_url}/api/v1/classify", data=image_bytes, params=params,
                                          headers={"Content-Type": "application/octet-stream"}, timeout=timeout_s)
        except requests.RequestException as err:
            return self._local(image_bytes, started_s, f"edge unreachable or late: {type(err).__name__}")
        if response.status_code >= 500 or response.status_code in _FALLBACK_STATUSES:
            return self._local(image_bytes, started_s, f"edge answered {response.status_code}")
        if response.status_code != 200:
            raise DeviceError(f"the edge refused the request ({response.status_code}): {response.text[:300]}")
        try:
            body = response.json()
            label, where, split = int(body["label"]), str(body["where"]), int(body.get("split", self.net.n_stages))
        except (ValueError, KeyError, TypeError):
            return self._local(image_bytes, started_s, "malformed edge answer")
        y = split if where == "cloud" else self.net.n_stages
        return DeviceAnswer(label=label, class_name=str(body.get("class_name", "")), exit=body.get("exit", "final"),
                            where=where, cuts=(0, y), latency_ms=(time.perf_counter() - started_s) * 1000.0,
                            fallback=False)
