"""Export to the ONNX model directory: modules the old whitelist could not express, refusals, spec models, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from any_modules import CLASSES, NORM, cases, pool_head
from popex.errors import ExportError
from popex.nets.export import _run_chain, compute_onnx_model_id, export, export_model

REPO = Path(__file__).resolve().parents[1]


def _load(out: Path) -> tuple[dict, dict]:
    manifest = json.loads((out / "model.json").read_text())
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*.onnx")}
    return manifest, files


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("case", list(cases()), ids=lambda case: case[0])
def test_export_modules_outside_the_old_whitelist(tmp_path, case):
    _, stages, branches = case
    for module in [*stages, *branches.values()]:
        module.eval()
    x = torch.randn(1, 3, 16, 16)
    result = export(stages=stages, branches=branches, example_input=x, out=tmp_path, class_names=CLASSES,
                    normalisation=NORM)
    assert set(result.max_abs_diff) == {"branch0", "final"} and max(result.max_abs_diff.values()) < 1e-4
    manifest, files = _load(tmp_path)
    assert manifest["format"] == "popex-onnx/1" and manifest["input_shape"] == [3, 16, 16]
    assert manifest["branches"] == [{"after_stage": 2, "file": "branches/0.onnx"}]
    assert compute_onnx_model_id(manifest, files) == result.model_id
    images = torch.randn(7, 3, 16, 16)
    got = _run_chain(manifest, files, images.numpy())
    with torch.inference_mode():
        features = images
        for module in stages[:2]:
            features = module(features)
        want = {"branch0": branches[2](features), "final": stages[-1](features if len(stages) == 3 else
                                                                       stages[2](features))}
    for name, logits in want.items():
        assert np.array_equal(got[name].argmax(1), logits.numpy().argmax(1))
        assert np.abs(_softmax(got[name]) - torch.softmax(logits, 1).numpy()).max() < 1e-4


class Gate(nn.Module):  # data-dependent control flow: the trace keeps the example's branch
    def forward(self, x):
        return x * 2 if x.sum() > 0 else -x


def test_export_refuses_an_export_that_differs(tmp_path):
    stages = [Gate(), pool_head(3)]
    x = torch.ones(1, 3, 8, 8)
    with pytest.raises(ExportError, match="differ"):
        export(stages=stages, example_input=x, out=tmp_path, class_names=CLASSES, normalisation=NORM)
    assert not (tmp_path / "model.json").exists()


def test_export_refuses_a_module_in_training_mode(tmp_path):
    stages = [nn.Sequential(nn.Conv2d(3, 3, 1), nn.Dropout(0.5)), pool_head(3).eval()]
    with pytest.raises(ExportError, match="training mode"):
        export(stages=stages, example_input=torch.randn(1, 3, 8, 8), out=tmp_path, class_names=CLASSES,
               normalisation=NORM)


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv(x))


class ResNetWithHead(nn.Module):  # stage boundaries at block outputs; the classifier's flatten is in forward
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block1, self.block2 = Residual(8), Residual(8)
        self.head1 = pool_head(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.block1(self.stem(x))
        early = self.head1(x)
        x = self.block2(x)
        return [early, self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))]


def test_export_model_cuts_one_module_at_its_boundaries(tmp_path):
    torch.manual_seed(0)
    net = ResNetWithHead().eval()
    result = export_model(net, stage_ends=["stem", "block1"], branch_heads={2: "head1"},
                          example_input=torch.randn(1, 3, 8, 8), out=tmp_path, class_names=CLASSES,
                          normalisation=NORM)
    assert set(result.max_abs_diff) == {"branch0", "final"} and max(result.max_abs_diff.values()) < 1e-4
    manifest, files = _load(tmp_path)
    assert len(manifest["stages"]) == 3 and manifest["branches"][0]["after_stage"] == 2
    x = torch.randn(5, 3, 8, 8)
    got = _run_chain(manifest, files, x.numpy())
    with torch.inference_mode():
        early, final = net(x)
    assert np.abs(got["final"] - final.numpy()).max() < 1e-4 and np.abs(got["branch0"] - early.numpy()).max() < 1e-4


def test_export_model_refuses_a_boundary_that_is_not_a_cut(tmp_path):
    net = ResNetWithHead().eval()
    with pytest.raises(ExportError, match="not a cut"):
        export_model(net, stage_ends=["block1.conv"], branch_heads={}, example_input=torch.randn(1, 3, 8, 8),
                     out=tmp_path, class_names=CLASSES, normalisation=NORM)


def _check_spec_export(src: Path, out: Path) -> None:
    from popex.nets.export_spec import export_spec_dir
    from popex.nets.io import load_model

    net = load_model(src).net
    result = export_spec_dir(src, out)
    manifest, files = _load(out)
    x = torch.randn(6, *net.input_shape, generator=torch.Generator().manual_seed(1))
    got = _run_chain(manifest, {k: v for k, v in files.items() if not k.startswith("distortion")}, x.numpy())
    with torch.inference_mode():
        for head in net.head_names:
            for e, logits in enumerate(net(x, head=head)):
                name = f"branch{e}" if e < net.n_branches else "final"
                name = name if head == "pristine" else f"{head}/{name}"
                assert np.abs(got[name] - logits.numpy()).max() <= 1e-4 * max(1.0, logits.abs().max().item())
    assert len(result.max_abs_diff) == len(net.head_names) * net.n_exits
    spec = json.loads((src / "spec.json").read_text())
    assert {k: manifest[k] for k in spec if k not in ("format", "stages", "branches", "experts")} == \
        {k: v for k, v in spec.items() if k not in ("format", "stages", "branches", "experts")}


def test_export_spec_default_model(tmp_path):
    _check_spec_export(REPO / "models/b-alexnet", tmp_path / "a")
    _check_spec_export(REPO / "models/b-alexnet", tmp_path / "b")
    for path in sorted((tmp_path / "a").rglob("*")):
        if path.is_file():
            assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes(), path


def test_export_spec_distortion_model_with_experts(tmp_path):
    _check_spec_export(REPO / "models/b-alexnet-distortion", tmp_path)
    assert (tmp_path / "distortion-classifier/model.json").is_file()
    assert (tmp_path / "calibration_blur.npz").is_file()


@pytest.mark.slow
def test_export_spec_entry_point_exits_2_on_a_bad_dir(tmp_path):
    (tmp_path / "spec.json").write_text("{not json")
    run = subprocess.run([sys.executable, "-m", "popex.nets.export_spec", str(tmp_path), str(tmp_path / "o")],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr


@pytest.mark.slow
def test_import_popex_does_not_import_torch_but_export_is_there():
    code = "import sys, popex; assert 'torch' not in sys.modules; from popex import export; print(export.__name__)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0 and run.stdout.strip() == "export", run.stderr


def test_popex_export_cli_exits_2_on_a_bad_dir(tmp_path, capsys):
    from popex import cli

    assert cli.main(["export", "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "has no spec.json" in capsys.readouterr().err


@pytest.mark.slow
def test_export_falls_back_to_the_dynamo_exporter(tmp_path, monkeypatch):
    original = torch.onnx.export

    def torchscript_fails(*args, **kwargs):
        if kwargs.get("dynamo") is False:
            raise RuntimeError("unsupported operator (simulated)")
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", torchscript_fails)
    stages = [nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU()).eval(), pool_head(4).eval()]
    result = export(stages=stages, branches={1: pool_head(4).eval()}, example_input=torch.randn(1, 3, 8, 8),
                    out=tmp_path, class_names=CLASSES, normalisation=NORM)
    assert set(result.exporter.values()) == {"dynamo"} and max(result.max_abs_diff.values()) < 1e-4
