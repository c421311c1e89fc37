"""Vetting an uploaded model in a separate process with memory and time limits, before the edge takes it.

The audit of issue 15 found two ways an upload hurt the edge: a spec whose
dry run computed for two minutes on four request threads (every classify
request timed out meanwhile), and one whose plan raised ``MemoryError``
inside the service. So an upload now goes through three gates, in order:

1. **cheap checks on the request thread**, nothing run: the spec form's
   FLOPs and peak activation bytes from its shapes
   (:mod:`popex.runtime.model_cost`), and the bytes the edge would push to
   the cloud (``max_model_bytes``, which is at most the cloud's body limit);
2. **the vetting process** (``python -m popex.edge.vetting DIR``): it sets
   its own address-space limit (``RLIMIT_AS``, ``registration_memory_bytes``)
   and CPU limit, lowers its priority (nice 10), checks the cost of the ONNX
   form from its graphs, then does what the edge will do, in a throw-away
   store: validation, the spec-to-ONNX export (cached by model id, so the
   edge does not export again), the dry run, a quick timing of every stage
   and the plan (:class:`popex.edge.plans.PlanBook`). It is killed after
   ``registration_timeout_s``;
3. only then the edge's own :meth:`popex.edge.store.ModelRegistry.add`, whose
   load and plan the vetting just showed to fit.

One upload is vetted at a time: another that arrives meanwhile is a 429
(``busy``) at once, so uploads hold at most one request thread and the
others keep answering classify requests.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from popex.edge.model_parts import split_model_files
from popex.errors import BusyError, CostError, PopexError, SpecError, TooLargeError
from popex.runtime.model_cost import check_model_cost, spec_cost
from popex.runtime.model_files import SPEC_FILE, files_model_id, write_files
from popex.untrusted import MAX_DOCUMENT_BYTES, loads_json

__all__ = ["DEFAULT_VETTING_MEMORY_BYTES", "DEFAULT_VETTING_TIMEOUT_S", "PUSH_PART_OVERHEAD_BYTES", "ModelVetting",
           "main"]

#: Default address-space limit of the vetting process (its torch export child inherits it), bytes.
DEFAULT_VETTING_MEMORY_BYTES = 4 * 2**30  # the torch export child needs ~2 GiB of address space
#: Default time limit of one vetting, s.
DEFAULT_VETTING_TIMEOUT_S = 300.0  # the spec export's own limit (popex.runtime.model_files.EXPORT_TIMEOUT_S)
#: What one file adds to the multipart body of the push to the cloud (boundary, headers), at most, bytes.
PUSH_PART_OVERHEAD_BYTES = 512
_MODULE = "popex.edge.vetting"
_FILES_DIR = "files"
_RESULT_PREFIX = "vetting-result: "
_NICE = 10


def _error_classes() -> dict[str, type[PopexError]]:
    """Every PopexError subclass by its code, to raise the vetting process's error again here."""
    import popex.runtime.onnx_model  # noqa: F401  (defines OnnxModelError)

    found: dict[str, type[PopexError]] = {}
    pending = [PopexError]
    while pending:
        cls = pending.pop()
        found.setdefault(cls.code, cls)
        pending.extend(cls.__subclasses__())
    return found


class ModelVetting:
    """The gates an uploaded model passes before the edge stores it (see the module docstring).

    Parameters
    ----------
    scratch_dir : path
        Where the vetting's files are written (the store's folder: leftovers
        of a crash are removed when the store opens).
    max_model_flops, max_activation_bytes : int
        Caps of :func:`popex.runtime.model_cost.check_model_cost`.
    max_strategy_configurations : int
        Cap of :func:`popex.edge.admission.check_plan_cost`.
    max_push_bytes : int
        Most bytes of the files pushed to the cloud, with their multipart overhead.
    memory_bytes : int
        RLIMIT_AS of the vetting process.
    timeout_s : float
        Wall-clock limit of the vetting process, s (its CPU limit is the same).
    """

    def __init__(self, *, scratch_dir: str | os.PathLike[str], max_model_flops: int, max_activation_bytes: int,
                 max_strategy_configurations: int, max_push_bytes: int, memory_bytes: int,
                 timeout_s: float) -> None:
        self.scratch_dir = Path(scratch_dir)
        self.limits = {"max_model_flops": int(max_model_flops), "max_activation_bytes": int(max_activation_bytes),
                       "max_strategy_configurations": int(max_strategy_configurations),
                       "memory_bytes": int(memory_bytes), "timeout_s": float(timeout_s)}
        self.max_push_bytes = int(max_push_bytes)
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: Any, *, scratch_dir: str | os.PathLike[str]) -> ModelVetting:
        """The vetting an edge config asks for (``max_model_flops``, ``registration_memory_bytes``, ...).

        Parameters
        ----------
        config : EdgeConfig
            Read attribute by attribute.
        scratch_dir : path
            As for the constructor.

        Returns
        -------
        ModelVetting
        """
        return cls(scratch_dir=scratch_dir, max_model_flops=config.max_model_flops,
                   max_activation_bytes=config.max_activation_bytes,
                   max_strategy_configurations=config.max_strategy_configurations,
                   max_push_bytes=config.max_model_bytes, memory_bytes=config.registration_memory_bytes,
                   timeout_s=config.registration_timeout_s)

    @contextlib.contextmanager
    def gate(self, files: Mapping[str, bytes], *, known: Callable[[str], bool]) -> Iterator[None]:
        """Vet an upload unless the store ``known`` holds it, and keep the one vetting slot while the caller stores it.

        Parameters
        ----------
        files : mapping of str to bytes
            The whole upload by path.
        known : callable
            Model id -> whether the store holds it (then nothing is vetted).

        Returns
        -------
        contextlib.AbstractContextManager
            Entered once the upload passed (or is known); the slot is free again on exit.

        Raises
        ------
        BusyError
            429 at once while another upload holds the slot.
        PopexError
            As :meth:`vet`.
        """
        parts = split_model_files(files)
        if known(files_model_id(parts.model)):
            yield
            return
        self.check_cheap(parts.model)  # refused at once, even while the slot is taken
        if not self._lock.acquire(blocking=False):
            raise BusyError("another model upload is being validated; one is taken at a time: retry in a few seconds")
        try:
            self.vet(files)
            yield
        finally:
            self._lock.release()

    def check_cheap(self, model_files: Mapping[str, bytes]) -> None:
        """The checks that run nothing: the push's bytes, the spec form's cost (on the request thread).

        Parameters
        ----------
        model_files : mapping of str to bytes
            The model's own files (what is pushed to the cloud), by path.

        Raises
        ------
        TooLargeError, CostError, SpecError
        """
        push_bytes = sum(len(data) + len(path) + PUSH_PART_OVERHEAD_BYTES for path, data in model_files.items())
        if push_bytes > self.max_push_bytes:
            raise TooLargeError(f"the model's files make a {push_bytes:,}-byte upload to the cloud; at most "
                                f"{self.max_push_bytes:,} are taken (max_model_bytes, at most the cloud's "
                                "max_body_bytes)")
        if SPEC_FILE in model_files and "model.json" not in model_files:
            spec = loads_json(model_files[SPEC_FILE], name="spec", max_bytes=MAX_DOCUMENT_BYTES, error=SpecError)
            check_model_cost(spec_cost(spec), max_flops=self.limits["max_model_flops"],
                             max_activation_bytes=self.limits["max_activation_bytes"])

    def vet(self, files: Mapping[str, bytes]) -> dict[str, Any]:
        """Run the vetting process on an upload (after :meth:`check_cheap`); return its findings.

        Parameters
        ----------
        files : mapping of str to bytes
            The whole upload by path (model, calibrations, classifier).

        Returns
        -------
        dict
            ``flops``, ``peak_activation_bytes``, ``n_configurations``.

        Raises
        ------
        PopexError
            The vetting process's error (a 4xx), or a CostError when it ran
            out of memory or time or died.
        """
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".incoming-vet-", dir=self.scratch_dir))
        try:
            write_files(files, scratch / _FILES_DIR)
            (scratch / "limits.json").write_text(json.dumps(self.limits))
            return self._run(scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _run(self, scratch: Path) -> dict[str, Any]:
        timeout_s = self.limits["timeout_s"]
        env = {k: v for k, v in os.environ.items() if "TOKEN" not in k}  # the export cache passes, no secret
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        # Its own session, so that a timeout kills the export it may be running too (one process group).
        process = subprocess.Popen([sys.executable, "-m", _MODULE, str(scratch)], env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        try:
            stdout, stderr = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise CostError(f"validating, exporting and planning the model took over {timeout_s:g} s "
                            "(registration_timeout_s); refused") from err
        lines = [line for line in stdout.splitlines() if line.startswith(_RESULT_PREFIX)]
        if not lines:
            tail = (stderr or "").strip().splitlines()[-1:] or [f"exit status {process.returncode}"]
            raise CostError(f"the model could not be validated within registration_memory_bytes "
                            f"({self.limits['memory_bytes']:,} bytes) and registration_timeout_s "
                            f"({timeout_s:.0f} s): {tail[0][:300]}")
        result = json.loads(lines[-1][len(_RESULT_PREFIX):])
        if "error" in result:
            error_type = _error_classes().get(result["error"]["code"], SpecError)
            raise error_type(result["error"]["message"])
        return result


# -- the vetting process -----------------------------------------------------------------------------------------


def _limit_self(memory_bytes: int, timeout_s: float) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    cpu_s = int(timeout_s) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    os.nice(_NICE)


def _read_files(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def _vet(scratch: Path, limits: Mapping[str, Any]) -> dict[str, Any]:
    """What the edge does with an upload, in a throw-away store: cost, validation, export, dry run, timing, plan."""
    from popex.decision.latency import Link
    from popex.edge.admission import check_plan_cost
    from popex.edge.plans import PlanBook
    from popex.edge.store import ModelRegistry
    from popex.runtime.model_cost import files_cost
    from popex.runtime.profiler import build_profile, time_stages

    files = _read_files(scratch / _FILES_DIR)
    parts = split_model_files(files)
    caps = {"max_flops": limits["max_model_flops"], "max_activation_bytes": limits["max_activation_bytes"]}
    cost = check_model_cost(files_cost(parts.model), **caps)  # before anything runs
    if parts.classifier:
        try:
            check_model_cost(files_cost(parts.classifier), **caps)
        except SpecError:  # files that cannot be costed: the store's checks name what is wrong with them
            pass
    found: dict[str, Any] = {"flops": cost.flops, "peak_activation_bytes": cost.peak_activation_bytes}

    def admit(model: Any) -> None:
        found["n_configurations"] = check_plan_cost(model, max_configurations=limits["max_strategy_configurations"])
        timings = time_stages(model.loaded.net, n_warmup=1, n_repeats=3)
        profile = build_profile(timings, branch_after_stage=model.loaded.net.branch_after_stage,
                                offload_overhead_ms=2.0, cloud_speedup=1.0)
        plans = PlanBook(link=Link(uplink_mbps=10.0, rtt_ms=20.0), headroom_fraction=0.05)
        plans.install(model.model_id, model.calibration, profile, expert_calibrations=model.expert_calibrations)

    ModelRegistry(scratch / "state").add(files, admit=admit)
    return found


def main(argv: list[str] | None = None) -> int:
    """``python -m popex.edge.vetting DIR``: limit itself, vet ``DIR/files``, print one result line.

    Parameters
    ----------
    argv : list of str, optional
        ``[DIR]``; default ``sys.argv[1:]``. ``DIR/limits.json`` holds the caps and limits.

    Returns
    -------
    int
        0 when the model passed, 2 when it was refused (the line says why).
    """
    argv = sys.argv[1:] if argv is None else argv
    scratch = Path(argv[0])
    limits = json.loads((scratch / "limits.json").read_text())
    _limit_self(limits["memory_bytes"], limits["timeout_s"])
    try:
        result: dict[str, Any] = _vet(scratch, limits)
        status = 0
    except PopexError as err:
        result, status = {"error": {"code": err.code, "message": str(err)}}, 2
    except MemoryError:
        result = {"error": {"code": CostError.code, "message": "the model needs more memory than "
                            f"registration_memory_bytes ({limits['memory_bytes']:,} bytes) to be validated"}}
        status = 2
    except RecursionError:
        result, status = {"error": {"code": SpecError.code, "message": "the model nests too deeply"}}, 2
    except Exception as err:  # an ONNX Runtime or onnx failure on a hostile file: still the upload's fault
        message = f"the model could not be validated: {type(err).__name__}: {str(err)[:300]}"
        result, status = {"error": {"code": SpecError.code, "message": message}}, 2
    print(_RESULT_PREFIX + json.dumps(result), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
