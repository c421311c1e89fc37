"""A model as the tiers hold it: its registered files, its id, and its ONNX executor.

A model arrives in one of two forms (DESIGN.md §2):

- **ONNX**: model.json and its graphs. The id hashes those files
  (:func:`popex.runtime.onnx_model.compute_onnx_model_id`).
- **spec**: spec.json + weights.safetensors. The id hashes the canonical spec
  and the weights, as it always has. The files are converted to the ONNX form
  by a *separate process* (``python -m popex.nets.export_spec``), so a tier
  never imports torch: that process validates the spec and the weights
  (safetensors only) exactly as training does, and its result is checked like
  any uploaded ONNX model. Conversions are cached by model id
  (``POPEX_EXPORT_CACHE``, default ``~/.cache/popex/exports``): the id is a
  content hash, so a cached export is the export of these very files.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from popex.errors import SpecError, WeightsError
from popex.untrusted import MAX_DOCUMENT_BYTES, loads_json
from popex.runtime.onnx_model import (
    MANIFEST_FILE,
    OnnxModel,
    OnnxModelError,
    canonical_manifest_bytes,
    load_onnx_dir,
    manifest_files,
    check_file_path,
    compute_onnx_model_id,
    read_manifest,
)

__all__ = [
    "SPEC_FILE",
    "WEIGHTS_FILE",
    "ONNX_DIR",
    "EXPORT_TIMEOUT_S",
    "LoadedModel",
    "spec_model_id",
    "export_cache_dir",
    "convert_spec_files",
    "load_model_dir",
    "files_model_id",
    "form_files",
    "check_file_path",
    "write_files",
    "model_form",
    "atomic_write_bytes",
]

SPEC_FILE = "spec.json"
WEIGHTS_FILE = "weights.safetensors"
#: Where a spec model's ONNX export lies inside its stored directory.
ONNX_DIR = "onnx"
#: Longest a spec-to-ONNX conversion may take (it validates, builds and exports every piece).
EXPORT_TIMEOUT_S = 300.0
_EXPORT_MODULE = "popex.nets.export_spec"


@dataclass(frozen=True)
class LoadedModel:
    """A registered model: its executor, metadata, id and the files it was registered as.

    Attributes
    ----------
    net : OnnxModel
        Runs stages and branches with ONNX Runtime.
    spec : dict
        model.json of the ONNX form (for a spec model: the export's, which
        carries the spec's name, input shape, normalisation and class names).
    model_id : str
    form : {"spec", "onnx"}
    files : mapping of str to bytes
        The registered form's files by relative path (what a tier pushes to
        the next): spec.json + weights.safetensors, or model.json + graphs.
    """

    net: OnnxModel
    spec: dict[str, Any]
    model_id: str
    form: str
    files: Mapping[str, bytes] = field(repr=False)


def spec_model_id(spec_bytes: bytes, weights_bytes: bytes) -> str:
    """The spec form's id: sha256 of the canonical spec JSON followed by the weights, without torch.

    Raises
    ------
    SpecError
        If the spec is not a JSON object.
    """
    spec = loads_json(spec_bytes, name="spec", max_bytes=MAX_DOCUMENT_BYTES, error=SpecError)
    if not isinstance(spec, dict):
        raise SpecError("spec must be a JSON object")
    digest = hashlib.sha256()
    digest.update(canonical_manifest_bytes(spec))
    digest.update(weights_bytes)
    return digest.hexdigest()


def export_cache_dir() -> Path:
    """``POPEX_EXPORT_CACHE``, else ``$XDG_CACHE_HOME/popex/exports`` (``~/.cache/popex/exports``)."""
    configured = os.environ.get("POPEX_EXPORT_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "popex" / "exports"


def _run_export(source: Path, out: Path, timeout_s: float) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POPEX_")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    try:
        done = subprocess.run([sys.executable, "-m", _EXPORT_MODULE, str(source), str(out)], env=env,
                              capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        raise SpecError(f"converting the spec model to ONNX took over {timeout_s:.0f} s; refused") from err
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
        message = lines[-1] if lines else f"the converter failed with exit status {done.returncode}"
        # The converter's last line is "error[<code>]: <message>", code as in popex.errors.
        match = re.fullmatch(r"error\[([a-z_]+)\]: (.*)", message)
        if match is None:
            raise SpecError(f"converting the spec model to ONNX failed: {message[:300]}")
        error_type = {"bad_weights": WeightsError}.get(match.group(1), SpecError)
        raise error_type(match.group(2)[:500])


def convert_spec_files(spec_bytes: bytes, weights_bytes: bytes, out: Path, *,
                       timeout_s: float = EXPORT_TIMEOUT_S) -> str:
    """Write the ONNX form of a spec model into ``out`` (a new directory); return the spec model's id.

    Parameters
    ----------
    spec_bytes, weights_bytes : bytes
        spec.json and weights.safetensors as received.
    out : Path
        Must not exist yet.
    timeout_s : float

    Raises
    ------
    SpecError, WeightsError
        With the converter's one-line message (the spec or weights are bad).
    """
    model_id = spec_model_id(spec_bytes, weights_bytes)
    cached = export_cache_dir() / model_id
    if not (cached / MANIFEST_FILE).is_file():
        with tempfile.TemporaryDirectory(prefix="popex-export-") as scratch:
            source = Path(scratch) / "spec"
            source.mkdir()
            (source / SPEC_FILE).write_bytes(spec_bytes)
            (source / WEIGHTS_FILE).write_bytes(weights_bytes)
            exported = Path(scratch) / "onnx"
            _run_export(source, exported, timeout_s)
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                staging = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".incoming-"))
                shutil.copytree(exported, staging, dirs_exist_ok=True)
                if cached.exists():
                    shutil.rmtree(staging)  # another process cached it meanwhile
                else:
                    os.replace(staging, cached)
            except OSError:  # an unwritable cache only costs time
                shutil.copytree(exported, out)
                return model_id
    shutil.copytree(cached, out)
    return model_id


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a file so that readers see the old or the new content, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; artifacts are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def model_form(directory: str | os.PathLike[str]) -> str:
    """"onnx" when the directory holds model.json, else "spec"."""
    return "onnx" if (Path(directory) / MANIFEST_FILE).is_file() else "spec"


def onnx_form_files(directory: Path) -> dict[str, bytes]:
    """model.json and every graph it names (and nothing else), by relative path.

    Raises
    ------
    OnnxModelError
        If model.json is invalid or names a missing file.
    """
    manifest_bytes = (directory / MANIFEST_FILE).read_bytes()
    manifest = read_manifest(manifest_bytes)
    files = {MANIFEST_FILE: manifest_bytes}
    for rel in manifest_files(manifest):
        path = directory / rel
        if not path.is_file():
            raise OnnxModelError(f"model.json names {rel!r}, which is not in the model directory")
        files[rel] = path.read_bytes()
    return files


def form_files(directory: Path) -> dict[str, bytes]:
    """The files of the model's own form in ``directory`` (model.json + graphs, or spec + weights), by path.

    Raises
    ------
    SpecError, OnnxModelError
        If neither form is complete.
    """
    if (directory / MANIFEST_FILE).is_file():
        return onnx_form_files(directory)
    missing = [name for name in (SPEC_FILE, WEIGHTS_FILE) if not (directory / name).is_file()]
    if missing:
        raise SpecError(f"model directory {str(directory)!r} has neither {MANIFEST_FILE} nor {missing[0]}")
    return {name: (directory / name).read_bytes() for name in (SPEC_FILE, WEIGHTS_FILE)}


def load_model_dir(directory: str | os.PathLike[str], *, n_threads: int = 1,
                   export_to: str | os.PathLike[str] | None = None) -> LoadedModel:
    """Load a model directory in either form.

    A spec model runs from its ONNX export: ``<directory>/onnx`` when it is
    there (the stores write it at registration), else a new export into
    ``export_to`` (or a temporary directory), taken from the cache when
    these files were converted before.

    Parameters
    ----------
    directory : path
        ONNX form (model.json present) or spec form (spec.json + weights.safetensors).
    n_threads : int
        ONNX Runtime intra-op threads per session.
    export_to : path, optional
        Where a spec model's export is written (must not exist yet).

    Returns
    -------
    LoadedModel

    Raises
    ------
    SpecError, WeightsError, OnnxModelError
        One message naming the file and the problem.
    """
    directory = Path(directory)
    files = form_files(directory)
    if model_form(directory) == "onnx":
        net, model_id = load_onnx_dir(directory, n_threads=n_threads)
        return LoadedModel(net=net, spec=net.spec, model_id=model_id, form="onnx", files=files)
    model_id = spec_model_id(files[SPEC_FILE], files[WEIGHTS_FILE])
    onnx_dir = directory / ONNX_DIR
    if (onnx_dir / MANIFEST_FILE).is_file():
        net, _ = load_onnx_dir(onnx_dir, n_threads=n_threads)
    elif export_to is not None:
        convert_spec_files(files[SPEC_FILE], files[WEIGHTS_FILE], Path(export_to))
        net, _ = load_onnx_dir(export_to, n_threads=n_threads)
    else:
        with tempfile.TemporaryDirectory(prefix="popex-onnx-") as scratch:
            out = Path(scratch) / ONNX_DIR
            convert_spec_files(files[SPEC_FILE], files[WEIGHTS_FILE], out)
            net, _ = load_onnx_dir(out, n_threads=n_threads)  # sessions hold the graphs in memory
    return LoadedModel(net=net, spec=net.spec, model_id=model_id, form="spec", files=files)


def files_model_id(files: Mapping[str, bytes]) -> str:
    """The id of a model given as files (either form), computed before anything is converted or run.

    Raises
    ------
    SpecError, OnnxModelError
        If neither form's files are there, or model.json is invalid.
    """
    if MANIFEST_FILE in files:
        manifest = read_manifest(files[MANIFEST_FILE])
        missing = [rel for rel in manifest_files(manifest) if rel not in files]
        if missing:
            raise OnnxModelError(f"model.json names {missing[0]!r}, which was not sent")
        return compute_onnx_model_id(manifest, {rel: files[rel] for rel in manifest_files(manifest)})
    if SPEC_FILE in files and WEIGHTS_FILE in files:
        return spec_model_id(files[SPEC_FILE], files[WEIGHTS_FILE])
    if SPEC_FILE in files or WEIGHTS_FILE in files:
        missing = WEIGHTS_FILE if SPEC_FILE in files else SPEC_FILE
        raise SpecError(f"{missing} is missing: a spec-form model is {SPEC_FILE} + {WEIGHTS_FILE} "
                        f"(multipart fields 'spec' and 'weights')")
    raise SpecError(f"a model is {MANIFEST_FILE} with its ONNX graphs, or {SPEC_FILE} + {WEIGHTS_FILE}; "
                    f"got {sorted(files)[:8]}")


def write_files(files: Mapping[str, bytes], directory: Path) -> None:
    """Write received files (paths checked) under ``directory``."""
    for rel, data in files.items():
        target = directory / check_file_path(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
