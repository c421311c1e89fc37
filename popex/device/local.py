"""What the device computes itself: stages ``start..stop`` and its branches, as slow as the emulated device.

The device runs the same model files as the edge with ONNX Runtime
(:func:`popex.runtime.model_files.load_model_dir`; no torch at serving
time) and scores a branch exactly as the edge does
(:func:`popex.runtime.exits.exit_confidence` with that exit's calibration
temperature and method, compared in float64), so a threshold of the plan
means the same on both tiers. ``slowdown`` emulates a slower device (a
Raspberry-Pi-class factor from ``configs/devices.yaml``) by sleeping for the
extra compute time after each piece, the same way the edge emulates its own
slowdown (:mod:`popex.edge.compute`). :meth:`LocalModel.measure_timings` is
what the device reports to the edge (``POST /api/v1/device/report``): its
stage and branch times, already as slow as the device is.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from popex.checks import check_finite, check_int
from popex.data.images import decode_image
from popex.data.preprocess import Preprocessing, preprocess
from popex.decision.calibration import CALIBRATION_FILE, load_calibration
from popex.runtime.exits import exit_confidence
from popex.runtime.model_files import load_model_dir

__all__ = ["DeviceTimings", "LocalExit", "LocalModel"]


@dataclass(frozen=True)
class DeviceTimings:
    """The device's median time of each stage and each branch, ms (what it reports)."""

    stage_ms: tuple[float, ...]
    branch_ms: tuple[float, ...]


@dataclass(frozen=True)
class LocalExit:
    """An exit evaluated on the device: its label, confidence and the stage it sits after."""

    exit: int | str
    label: int
    confidence: float
    after_stage: int


class LocalModel:
    """The device's copy of a model: preprocessing, stages, branches and their calibration.

    Parameters
    ----------
    model_dir : path
        The model's directory (either form), the files the edge registered.
    slowdown : float
        Local compute takes this many times longer (>= 1).
    n_threads : int
        ONNX Runtime threads.
    """

    def __init__(self, model_dir: str | os.PathLike[str], *, slowdown: float = 1.0, n_threads: int = 1) -> None:
        self.slowdown = check_finite(slowdown, name="slowdown", low=1.0)
        loaded = load_model_dir(model_dir, n_threads=n_threads)
        self.model_id = loaded.model_id
        self.net = loaded.net
        self.preprocessing = Preprocessing.from_spec_dict(loaded.spec)
        n_exits = len(self.net.branch_after_stage) + 1
        path = Path(model_dir) / CALIBRATION_FILE
        if path.is_file():
            calibration = load_calibration(path)
            self._temperatures = tuple(float(t) for t in calibration.temperature)
            self._method = calibration.confidence_method
        else:  # an uncalibrated model: plain softmax (its plans have no branches to take anyway)
            self._temperatures, self._method = (1.0,) * n_exits, "max_softmax"

    @property
    def n_stages(self) -> int:
        """Stages of the model (N)."""
        return int(self.net.n_stages)

    def _timed(self, compute: Any, *args: Any, **kwargs: Any) -> Any:
        started_s = time.perf_counter()
        result = compute(*args, **kwargs)
        if self.slowdown > 1.0:  # an emulated device is slower by this factor
            time.sleep((time.perf_counter() - started_s) * (self.slowdown - 1.0))
        return result

    def input_tensor(self, image_bytes: bytes) -> np.ndarray:
        """Decode and preprocess one image into the model's input, batch of one.

        Parameters
        ----------
        image_bytes : bytes
            PNG, JPEG or BMP.

        Returns
        -------
        np.ndarray, shape (1, *input_shape)
        """
        x = self._timed(lambda: preprocess(decode_image(image_bytes), self.preprocessing))
        return x[None] if x.ndim == len(self.net.input_shape) else x

    def stages(self, h: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Stages ``start+1..stop`` (1-based) on ``h``, the output of stage ``start``.

        Parameters
        ----------
        h : np.ndarray
            The output of stage ``start`` (the input for 0), batch first.
        start, stop : int

        Returns
        -------
        np.ndarray
            The output of stage ``stop`` (``h`` itself when ``stop <= start``).
        """
        return h if stop <= start else self._timed(self.net.run_stages, h, start=start, stop=stop)

    def exit_of(self, exit_index: int, logits: np.ndarray, after_stage: int) -> LocalExit:
        """Score one exit's logits as the edge does.

        Parameters
        ----------
        exit_index : int
            The branch, or -1 for the final exit.
        logits : np.ndarray, shape (1, n_classes)
        after_stage : int
            The stage the exit sits after.

        Returns
        -------
        LocalExit
        """
        confidence, predicted = exit_confidence(np.asarray(logits), temperature=self._temperatures[exit_index],
                                                method=self._method)
        return LocalExit(exit="final" if exit_index == -1 else exit_index, label=int(predicted[0]),
                         confidence=float(np.float64(confidence[0])), after_stage=after_stage)

    def branch(self, branch: int, h: np.ndarray) -> LocalExit:
        """Run and score side branch ``branch`` on the output of its stage.

        Parameters
        ----------
        branch : int
        h : np.ndarray
            The output of stage ``branch_after_stage[branch]``.

        Returns
        -------
        LocalExit
        """
        logits = self._timed(self.net.run_branch, branch, h)
        return self.exit_of(branch, logits, int(self.net.branch_after_stage[branch]))

    def class_name(self, label: int) -> str:
        """The class name of a label.

        Parameters
        ----------
        label : int

        Returns
        -------
        str
            "" when the model names none.
        """
        names = self.net.class_names
        return str(names[label]) if names and 0 <= label < len(names) else ""

    def measure_timings(self, *, n_repeats: int = 5) -> DeviceTimings:
        """Median time of each stage and branch on this device (with its slowdown), after one warm-up.

        Parameters
        ----------
        n_repeats : int
            Timed runs of each piece (>= 1).

        Returns
        -------
        DeviceTimings
        """
        n_repeats = check_int(n_repeats, name="n_repeats", low=1, high=1000)
        h = np.zeros((1, *self.net.input_shape), dtype=np.float32)
        features, stage_ms = [h], []
        for stage in range(self.n_stages):
            times_ms = []
            for _ in range(n_repeats + 1):
                started_s = time.perf_counter()
                out = self.stages(features[-1], stage, stage + 1)
                times_ms.append((time.perf_counter() - started_s) * 1000.0)
            stage_ms.append(float(np.median(times_ms[1:])))
            features.append(out)
        branch_ms = []
        for b, after in enumerate(self.net.branch_after_stage):
            times_ms = []
            for _ in range(n_repeats + 1):
                started_s = time.perf_counter()
                self.branch(b, features[after])
                times_ms.append((time.perf_counter() - started_s) * 1000.0)
            branch_ms.append(float(np.median(times_ms[1:])))
        return DeviceTimings(stage_ms=tuple(stage_ms), branch_ms=tuple(branch_ms))
