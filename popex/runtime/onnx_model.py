"""The stage executor every tier runs: one ONNX Runtime session per stage and per branch.

A model in ONNX form is a directory (format ``popex-onnx/1``, DESIGN.md §2)::

    model.json                       stage order, branch positions, input shape,
                                     normalisation (mean, std), class names
    stages/1.onnx ... stages/N.onnx
    branches/0.onnx ...              one per side branch
    experts/<name>/branches/<b>.onnx, experts/<name>/final.onnx   (optional head sets)

Serving never imports torch: ONNX Runtime runs each stage at 0.1-0.4x the
time of eager torch at batch 1 on this CPU, and a tier that loads only
protobuf graphs cannot be made to run code by a model file. Every file is
checked before a session is built (:mod:`popex.runtime.onnx_checks`), and the
whole chain is dry-run on the declared input, so a model that is accepted
runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from popex.errors import PopexError, SpecError
from popex.runtime.exit_chain import PRISTINE_HEAD, ExitChain, UnknownHeadError
from popex.untrusted import MAX_DOCUMENT_BYTES, loads_json

__all__ = [
    "ONNX_FORMAT",
    "MANIFEST_FILE",
    "PRISTINE_HEAD",
    "OnnxModelError",
    "UnknownHeadError",
    "OnnxModel",
    "canonical_manifest_bytes",
    "compute_onnx_model_id",
    "check_file_path",
    "manifest_files",
    "read_manifest",
    "load_onnx_dir",
]

ONNX_FORMAT = "popex-onnx/1"
MANIFEST_FILE = "model.json"


class OnnxModelError(SpecError):
    """An ONNX model directory or one of its graphs is not acceptable."""

    code = "invalid_onnx"


def canonical_manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """model.json as hashed: sorted keys, no whitespace.

    >>> canonical_manifest_bytes({"b": 1, "a": [1, 2]})
    b'{"a":[1,2],"b":1}'
    """
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def compute_onnx_model_id(manifest: Mapping[str, Any], files: Mapping[str, bytes]) -> str:
    """sha256 (hex) of the canonical model.json, then each file in path order (path, NUL, length, bytes).

    ``files`` maps relative paths to bytes; ``model.json`` itself is not
    among them. Lengths make the concatenation unambiguous.

    >>> compute_onnx_model_id({"a": 1}, {})[:12]
    '015abd7f5cc5'
    """
    digest = hashlib.sha256()
    digest.update(canonical_manifest_bytes(manifest))
    for path in sorted(files):
        data = files[path]
        digest.update(path.encode())
        digest.update(b"\0")
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


def check_file_path(path: str) -> str:
    """A received file's relative path, refused when it could leave its directory.

    >>> check_file_path("stages/1.onnx")
    'stages/1.onnx'
    """
    parts = path.split("/")
    if (not path or len(path) > 200 or path.startswith("/") or "\\" in path or "\0" in path
            or any(part in ("", ".", "..") for part in parts) or len(parts) > 6):
        raise SpecError(f"file path {path[:80]!r} must be a relative path inside the model directory")
    return path


def _check_relative_path(path: Any, where: str) -> str:
    if not isinstance(path, str) or not path:
        raise OnnxModelError(f"model.json: {where} must be a relative file path, got {path!r}")
    try:
        check_file_path(path)
    except SpecError as err:
        raise OnnxModelError(f"model.json: {where} {path[:80]!r} must stay inside the model directory") from err
    if not path.endswith(".onnx"):
        raise OnnxModelError(f"model.json: {where} {path!r} must be an .onnx file")
    return path


def _check_str_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise OnnxModelError(f"model.json: {where} must be a non-empty list of strings")
    return value


def read_manifest(data: bytes) -> dict[str, Any]:
    """Parse and check model.json: format, shapes, normalisation, files, branches, experts.

    Parameters
    ----------
    data : bytes

    Returns
    -------
    dict
        The manifest as parsed.

    Raises
    ------
    OnnxModelError
        Naming the first key that is wrong.
    """
    from popex.data.preprocess import Preprocessing  # numpy/cv2 only

    manifest = loads_json(data, name="model.json", max_bytes=MAX_DOCUMENT_BYTES, error=OnnxModelError)
    if not isinstance(manifest, dict):
        raise OnnxModelError("model.json must hold a JSON object")
    if manifest.get("format") != ONNX_FORMAT:
        raise OnnxModelError(f"model.json: format must be {ONNX_FORMAT!r}, got {manifest.get('format')!r}")
    try:
        Preprocessing.from_spec_dict(manifest)
    except PopexError as err:
        raise OnnxModelError(f"model.json: {err}") from err
    names = _check_str_list(manifest.get("class_names"), "class_names")
    if len(set(names)) != len(names) or len(names) < 2:
        raise OnnxModelError("model.json: class_names must be at least two distinct names")
    stages = _check_str_list(manifest.get("stages"), "stages")
    for i, path in enumerate(stages):
        _check_relative_path(path, f"stages[{i}]")
    stage_names = manifest.get("stage_names")
    if stage_names is not None and (len(_check_str_list(stage_names, "stage_names")) != len(stages)
                                    or any(len(name) > 64 for name in stage_names)):
        raise OnnxModelError("model.json: stage_names must give one name (up to 64 characters) per stage")
    branches = manifest.get("branches", [])
    if not isinstance(branches, list):
        raise OnnxModelError("model.json: branches must be a list")
    previous = 0
    for b, branch in enumerate(branches):
        if not isinstance(branch, dict) or set(branch) != {"after_stage", "file"}:
            raise OnnxModelError(f"model.json: branches[{b}] must be {{\"after_stage\": k, \"file\": path}}")
        after = branch["after_stage"]
        if not isinstance(after, int) or isinstance(after, bool) or not previous < after < len(stages):
            raise OnnxModelError(f"model.json: branches[{b}].after_stage must be an integer in "
                                 f"{previous + 1}..{len(stages) - 1} (increasing), got {after!r}")
        previous = after
        _check_relative_path(branch["file"], f"branches[{b}].file")
    experts = manifest.get("experts", {})
    if not isinstance(experts, dict):
        raise OnnxModelError("model.json: experts must map a head name to its files")
    for name, head in experts.items():
        if name == PRISTINE_HEAD or not name.isidentifier():
            raise OnnxModelError(f"model.json: expert name {name!r} is not allowed")
        if not isinstance(head, dict) or set(head) != {"branches", "final"}:
            raise OnnxModelError(f"model.json: experts.{name} must be {{\"branches\": [...], \"final\": path}}")
        if not isinstance(head["branches"], list) or len(head["branches"]) != len(branches):
            raise OnnxModelError(f"model.json: experts.{name}.branches must list one file per branch "
                                 f"({len(branches)})")
        for b, path in enumerate(head["branches"]):
            _check_relative_path(path, f"experts.{name}.branches[{b}]")
        _check_relative_path(head["final"], f"experts.{name}.final")
    files = manifest_files(manifest)
    if len(set(files)) != len(files):
        raise OnnxModelError("model.json names one file twice")
    return manifest


def manifest_files(manifest: Mapping[str, Any]) -> list[str]:
    """Every graph file a (checked) manifest names: stages, branches, then experts."""
    files = list(manifest["stages"]) + [b["file"] for b in manifest.get("branches", [])]
    for head in manifest.get("experts", {}).values():
        files += list(head["branches"]) + [head["final"]]
    return files


@dataclass(frozen=True)
class _Graph:
    """One ONNX Runtime session and its input/output names."""

    session: Any
    input_name: str
    output_name: str
    path: str

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]


class OnnxModel(ExitChain):
    """Stages 1..N and branches after stage k_b, each an ONNX Runtime session; numpy in, numpy out.

    The attribute names are those of :class:`popex.nets.early_exit.EarlyExitNet`,
    so the tiers' code reads the same whichever form a model came in. Build
    with :func:`load_onnx_dir`, which checks everything first.

    Notes
    -----
    Thread-safe: ``InferenceSession.run`` may be called from several threads.
    """

    def __init__(self, manifest: dict[str, Any], stages: Sequence[_Graph], branches: Sequence[_Graph],
                 experts: Mapping[str, tuple[Sequence[_Graph], _Graph]]) -> None:
        self.spec = manifest
        self.input_shape: tuple[int, ...] = tuple(int(d) for d in manifest["input_shape"])
        self.class_names: tuple[str, ...] = tuple(manifest["class_names"])
        self.stage_names: tuple[str, ...] = tuple(manifest.get("stage_names")
                                                  or (f"stage{i + 1}" for i in range(len(stages))))
        self.branch_after_stage: tuple[int, ...] = tuple(b["after_stage"] for b in manifest.get("branches", []))
        self.expert_names: tuple[str, ...] = tuple(experts)
        self._stages = list(stages)
        self._branches = list(branches)
        self._experts = dict(experts)
        self._shapes: list[tuple[int, ...]] | None = None

    def run_stages(self, x: np.ndarray, *, start: int = 0, stop: int | None = None,
                   head: str | None = None) -> np.ndarray:
        """Run stages start+1..stop (a split index on each side: 0..N); ``head`` picks stage N's copy."""
        stop = self.n_stages if stop is None else stop
        if not 0 <= start <= stop <= self.n_stages:
            raise ValueError(f"need 0 <= start <= stop <= {self.n_stages}, got start={start}, stop={stop}")
        expert = self.check_head(head)
        for i in range(start, stop):
            graph = self._experts[expert][1] if expert is not None and i == self.n_stages - 1 else self._stages[i]
            x = graph(x)
        return x

    def run_branch(self, branch: int, features: np.ndarray, *, head: str | None = None) -> np.ndarray:
        """Logits of branch ``branch`` (0-based) of head set ``head`` from the output of its stage."""
        expert = self.check_head(head)
        graph = self._branches[branch] if expert is None else self._experts[expert][0][branch]
        return graph(features)

    def forward(self, x: np.ndarray, *, head: str | None = None) -> list[np.ndarray]:
        """Logits of every exit of head set ``head``: branches in order, then the final exit."""
        return self.exits(x, head=head)

    __call__ = forward

    def stage_output_shapes(self) -> list[tuple[int, ...]]:
        """Shape (without batch) of the tensor after each split 0..N (measured by the load's dry run)."""
        if self._shapes is None:
            x = np.zeros((1, *self.input_shape), dtype=np.float32)
            shapes = [self.input_shape]
            for i in range(self.n_stages):
                x = self.run_stages(x, start=i, stop=i + 1)
                shapes.append(tuple(x.shape[1:]))
            self._shapes = shapes
        return list(self._shapes)


def load_onnx_dir(directory: str | os.PathLike[str], *, n_threads: int = 1,
                  max_total_bytes: int | None = None) -> tuple[OnnxModel, str]:
    """Check an ONNX model directory completely, build its sessions, and dry-run the chain.

    Parameters
    ----------
    directory : path
        Holds model.json and the graphs it names.
    n_threads : int
        ONNX Runtime intra-op threads per session.
    max_total_bytes : int, optional
        Largest sum of file sizes (default :data:`popex.runtime.onnx_checks.MAX_ONNX_BYTES`).

    Returns
    -------
    (OnnxModel, str)
        The executor and the model id (:func:`compute_onnx_model_id`).

    Raises
    ------
    OnnxModelError
        With one message naming the file and the problem.
    """
    from popex.runtime.onnx_checks import MAX_ONNX_BYTES, check_graph_file, dry_run, make_session

    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise OnnxModelError(f"the model directory has no {MANIFEST_FILE}")
    manifest = read_manifest(manifest_path.read_bytes())
    limit = MAX_ONNX_BYTES if max_total_bytes is None else max_total_bytes
    file_bytes: dict[str, bytes] = {}
    total = 0
    for rel in manifest_files(manifest):
        path = directory / rel
        if not path.is_file():
            raise OnnxModelError(f"model.json names {rel!r}, which is not in the model directory")
        total += path.stat().st_size
        if total > limit:
            raise OnnxModelError(f"the model's ONNX files exceed {limit} bytes (at {rel!r}); the limit is "
                                 "max_onnx_bytes")
        data = path.read_bytes()
        total += check_graph_file(data, path, directory, rel, max_bytes=limit - total)
        file_bytes[rel] = data

    def graph(rel: str) -> _Graph:
        session = make_session(directory / rel, rel, n_threads=n_threads)
        return _Graph(session=session, input_name=session.get_inputs()[0].name,
                      output_name=session.get_outputs()[0].name, path=rel)

    stages = [graph(rel) for rel in manifest["stages"]]
    branches = [graph(b["file"]) for b in manifest.get("branches", [])]
    experts = {name: ([graph(rel) for rel in head["branches"]], graph(head["final"]))
               for name, head in manifest.get("experts", {}).items()}
    model = OnnxModel(manifest, stages, branches, experts)
    dry_run(model)
    return model, compute_onnx_model_id(manifest, file_bytes)
