"""The `popex` command as a user runs it: real processes, real files; and its parser, in process."""

from __future__ import annotations

import argparse
import ast
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from popex import cli
from popex.decision import load_calibration, save_calibration
from popex.nets import EarlyExitNet, save_model, zoo_spec
from popex.nets.train import calibrate

ROOT = Path(__file__).resolve().parents[1]


def _popex(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "popex.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=240, env=env)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A small B-LeNet with a real calibration file (random weights, random inputs)."""
    directory = tmp_path_factory.mktemp("lenet")
    torch.manual_seed(0)
    net = EarlyExitNet(zoo_spec("b-lenet")).eval()
    save_model(net, directory)
    inputs = np.random.default_rng(0).normal(size=(300, *net.input_shape)).astype(np.float32)
    with torch.inference_mode():
        labels = net(torch.from_numpy(inputs))[-1].argmax(1).numpy()
    labels[::3] = (labels[::3] + 1) % net.n_classes  # make a third of the final answers wrong
    save_calibration(calibrate(net, inputs, labels), directory / "calibration.npz")
    return directory


@pytest.mark.slow
def test_profile_writes_json_csv_png(model_dir: Path) -> None:
    result = _popex("profile", "--model", str(model_dir), "--repeats", "5", "--warmup", "1", "--out", str(model_dir))
    assert result.returncode == 0, result.stderr
    profile = json.loads((model_dir / "profile.json").read_text())
    assert [s["name"] for s in profile["stages"]] == ["conv1", "conv2", "classifier"]
    assert profile["input_bytes"] == 28 * 28 * 4
    assert "ASSUMED" in profile["note"]
    assert (model_dir / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((model_dir / "profile.csv").read_text().splitlines()) == 1 + 1 + 3 + 1


@pytest.mark.slow
def test_profile_writes_under_results_and_leaves_the_model_directory_alone(model_dir: Path, tmp_path: Path) -> None:
    before = sorted(p.name for p in model_dir.iterdir())
    result = _popex("profile", "--model", str(model_dir), "--repeats", "2", "--warmup", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "results" / "profile" / model_dir.name / "profile.json").is_file()
    assert sorted(p.name for p in model_dir.iterdir()) == before


def test_profile_out_that_is_a_file_is_one_line_not_a_traceback(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    out.write_text("{}")
    result = _popex("profile", "--model", str(model_dir), "--repeats", "2", "--out", str(out))
    assert result.returncode == 2
    assert "is a file" in result.stderr and "Traceback" not in result.stderr
    assert out.read_text() == "{}"


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["mean", "tail"])
def test_plan_json_contract(model_dir: Path, objective: str) -> None:
    if not (model_dir / "profile.json").exists():
        assert _popex("profile", "--model", str(model_dir), "--repeats", "5", "--out", str(model_dir)).returncode == 0
    column = "expected_latency_ms" if objective == "mean" else "worst_latency_ms"

    def plan_for(deadline_ms: float) -> dict:
        result = _popex("plan", "--model", str(model_dir), "--uplink-mbps", "5.85", "--rtt-ms", "50",
                        "--deadline-ms", str(deadline_ms), "--objective", objective, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    # a requirement in the middle of this machine's latencies, so that some rows meet it and some do not
    deadline_ms = float(np.median([row[column] for row in plan_for(3.6e6)["strategies"]]))
    plan = plan_for(deadline_ms)
    assert set(plan) >= {"chosen", "feasible", "profile", "strategies"}
    assert set(plan["profile"]) == {"input_bytes", "offload_overhead_ms", "edge_fixed_ms", "wire_ratio", "stages",
                                    "branches"}
    assert set(plan["profile"]["stages"][0]) == {"name", "edge_ms", "cloud_ms", "out_bytes"}
    assert plan["profile"]["branches"] == [{"after_stage": 1, "edge_ms": plan["profile"]["branches"][0]["edge_ms"]}]
    rows = plan["strategies"]
    keys = {"thresholds", "split", "accuracy", "exit_probs", "offload_prob", "expected_latency_ms",
            "worst_latency_ms", "bytes_sent"}
    assert all(set(row) == keys for row in rows)
    assert {row["split"] for row in rows} == {0, 1, 2, 3}
    # the chosen row is the best feasible row (checked here by brute force over the printed table)
    feasible = [row for row in rows if row[column] <= deadline_ms]
    assert 0 < len(feasible) < len(rows)
    assert plan["feasible"] == bool(feasible)
    best = max(feasible, key=lambda row: (row["accuracy"], -row[column]))
    assert plan["chosen"]["accuracy"] == best["accuracy"]
    assert plan["chosen"][column] == best[column]
    # accuracy and exit rates agree with the calibration file
    calibration = load_calibration(model_dir / "calibration.npz")
    all_off = next(row for row in rows if row["split"] == 3 and row["thresholds"] == [None])
    assert all_off["accuracy"] == pytest.approx(calibration.correct[:, -1].mean())


@pytest.mark.slow
def test_plan_readable_output_and_infeasible_requirement(model_dir: Path) -> None:
    result = _popex("plan", "--model", str(model_dir), "--uplink-mbps", "1.1", "--rtt-ms", "100",
                    "--deadline-ms", "0.001")
    assert result.returncode == 0, result.stderr
    assert "Pareto front" in result.stdout
    assert "CANNOT meet" in result.stdout


@pytest.mark.slow
def test_bad_inputs_fail_with_one_line_and_no_traceback(model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    spec = json.loads((model_dir / "spec.json").read_text())
    spec["stages"][0]["layers"].append({"type": "exec", "code": "print(1)"})
    (bad / "spec.json").write_text(json.dumps(spec))
    (bad / "weights.safetensors").write_bytes((model_dir / "weights.safetensors").read_bytes())
    result = _popex("profile", "--model", str(bad))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "unknown layer type 'exec'" in result.stderr

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "spec.json").write_text((model_dir / "spec.json").read_text())
    (pickled / "weights.safetensors").write_bytes(pickle.dumps({"x": 1}))
    result = _popex("profile", "--model", str(pickled))
    assert result.returncode == 2 and "Traceback" not in result.stderr and "pickle" in result.stderr

    result = _popex("plan", "--model", str(tmp_path / "missing"), "--uplink-mbps", "1", "--rtt-ms", "1",
                    "--deadline-ms", "10", "--profile", str(model_dir / "profile.json"))
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_help_lists_every_subcommand_without_importing_its_module(monkeypatch, capsys):
    def no_import(self):
        raise AssertionError(f"{self.register} was imported to print the top-level help")

    monkeypatch.setattr(cli._Subcommand, "registrar", no_import)
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name, entry in cli._SUBCOMMANDS.items():
        assert name in out
    assert "train-experts" in out and "experiment" in out


def test_the_cli_module_imports_nothing_heavy_at_the_top():
    """What ``popex --help`` imports: the standard library and popex.errors only (no torch, numpy, experiments)."""
    allowed = {"__future__", "argparse", "importlib", "os", "sys", "collections.abc", "dataclasses", "popex.errors"}
    for path in (Path(cli.__file__), ROOT / "popex" / "errors.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.Import):
                names = {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {node.module}
            else:
                continue
            assert names <= allowed, f"{path.name} imports {names - allowed} at module level"


@pytest.mark.parametrize("name", sorted(cli._SUBCOMMANDS))
def test_a_subcommand_registers_under_its_name_with_the_tables_help(name):
    parser = cli._build_parser(name)
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {action.dest: action.help for action in subparsers._choices_actions}
    assert helps[name] == cli._SUBCOMMANDS[name].help
    registered = subparsers.choices[name]
    assert registered.add_help and len(registered._actions) > 1  # the real parser, not the name-only stand-in


def test_the_offline_cloud_speedup_is_the_one_default_of_both_subcommands():
    for name in ("profile", "plan"):
        parser = cli._build_parser(name)
        args = parser.parse_args([name, "--model", "m", *(["--uplink-mbps", "1", "--rtt-ms", "1", "--deadline-ms",
                                                            "1"] if name == "plan" else [])])
        assert args.cloud_speedup == cli.OFFLINE_CLOUD_SPEEDUP


@pytest.mark.slow
def test_top_level_help_does_not_import_torch():
    code = ("import sys\nfrom popex.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'numpy', 'experiments') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_an_experiment_leaves_the_results_document_alone_unless_asked() -> None:
    from popex.cli import _build_parser

    args = _build_parser("experiment").parse_args(["experiment", "threshold-sweep", "--quick"])
    assert args.update_docs is False
    args = _build_parser("experiment").parse_args(["experiment", "threshold-sweep", "--update-docs"])
    assert args.update_docs is True and args.docs.name == "results.md"
