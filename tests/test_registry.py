"""The edge's on-disk model store: validation before storing, atomic storage, restart."""

import io
import json
import pickle

import numpy as np
import pytest

from popex.decision import Profile
from popex.errors import CalibrationError, ProfileError, SpecError, WeightsError
from popex.edge.store import ModelRegistry, UnknownModelError


def _calibration_bytes(n_exits=2, n_samples=40, seed=0, n_classes=10):
    rng = np.random.default_rng(seed)
    predicted = rng.integers(0, n_classes, (n_samples, n_exits))
    labels = rng.integers(0, n_classes, n_samples)
    buffer = io.BytesIO()  # the layout save_calibration writes, into memory
    np.savez(buffer, confidence=rng.random((n_samples, n_exits)), predicted=predicted,
             correct=predicted == labels[:, None], labels=labels, temperature=np.ones(n_exits),
             confidence_method=np.array("max_softmax"))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def files(lenet_files):
    return {**lenet_files["files"], "model_id": lenet_files["model_id"]}


def _register(registry, files, **changes):
    data = {**files, **changes}
    return registry.register(data["spec"], data["weights"], data["calibration"])


def _entries(tmp_path):
    return sorted(p.name for p in (tmp_path / "models").iterdir())


def test_register_stores_all_files_and_is_idempotent(tmp_path, files):
    registry = ModelRegistry(tmp_path)
    model_id = _register(registry, files)
    assert model_id == files["model_id"]
    directory = tmp_path / "models" / model_id
    assert sorted(p.name for p in directory.iterdir()) == [
        "calibration.npz", "onnx", "spec.json", "state.json", "weights.safetensors"]
    assert (directory / "onnx" / "model.json").is_file()  # the export it runs, made at registration
    assert (directory / "weights.safetensors").read_bytes() == files["weights"]
    assert json.loads((directory / "state.json").read_text())["state"] == "registered"
    again = registry.add({"spec.json": files["spec"], "weights.safetensors": files["weights"],
                          "calibration.npz": files["calibration"]})
    assert again.model_id == model_id and not again.created
    assert registry.ids() == [model_id] and _entries(tmp_path) == [model_id]
    model = registry.get(model_id)
    assert model.name == "b-lenet" and len(model.class_names) == 10 and model.calibration.n_exits == 2


def test_models_survive_a_restart_with_their_state_and_profile(tmp_path, files):
    registry = ModelRegistry(tmp_path)
    model_id = _register(registry, files)
    profile = Profile(stage_names=("a", "b", "c"), stage_edge_ms=[1.0, 2.0, 3.0], stage_cloud_ms=[0.5, 0.5, 0.5],
                      branch_after_stage=(1,), branch_edge_ms=[0.2], split_bytes=[10, 20, 30, 0],
                      offload_overhead_ms=1.5)
    registry.set_state(model_id, "ready", profile=profile, cloud_profile="measured")
    reopened = ModelRegistry(tmp_path)
    model = reopened.get(model_id)
    assert model.state == "ready" and model.cloud_profile == "measured"
    assert model.profile.to_dict() == profile.to_dict()
    assert model.registered_at_s == registry.get(model_id).registered_at_s


@pytest.mark.parametrize("state", ["registered", "profiling", "failed"])
def test_an_interrupted_preparation_starts_again_after_a_restart(tmp_path, files, state):
    registry = ModelRegistry(tmp_path)
    model_id = _register(registry, files)
    registry.set_state(model_id, state, error="boom" if state == "failed" else None)
    model = ModelRegistry(tmp_path).get(model_id)
    assert model.state == "registered" and model.profile is None


@pytest.mark.parametrize("change, error, pattern", [
    ({"spec": b"{not json"}, SpecError, "not valid JSON"),
    ({"spec": json.dumps({"format": "popex-spec/1"}).encode()}, SpecError, None),
    ({"weights": pickle.dumps({"conv1.weight": [1.0]})}, WeightsError, "pickle"),
    ({"weights": b""}, WeightsError, "empty"),
    ({"calibration": b""}, CalibrationError, "empty"),
    ({"calibration": b"PK\x03\x04garbage"}, CalibrationError, "calibration.npz"),
    ({"calibration": _calibration_bytes(n_exits=3)}, CalibrationError, "3 exits"),
    ({"calibration": _calibration_bytes(n_classes=12)}, CalibrationError, "classes outside"),
])
def test_invalid_uploads_are_refused_and_nothing_is_stored(tmp_path, files, change, error, pattern):
    registry = ModelRegistry(tmp_path)
    with pytest.raises(error, match=pattern):
        _register(registry, files, **change)
    assert _entries(tmp_path) == [] and registry.ids() == []


def test_a_pickled_calibration_is_never_unpickled(tmp_path, files):
    buffer = io.BytesIO()
    np.savez(buffer, confidence=np.array([object()], dtype=object))
    with pytest.raises(CalibrationError):
        _register(ModelRegistry(tmp_path), files, calibration=buffer.getvalue())
    assert _entries(tmp_path) == []


def test_leftovers_of_an_interrupted_registration_are_removed(tmp_path, files):
    (tmp_path / "models" / ".incoming-abc").mkdir(parents=True)
    (tmp_path / "models" / ".incoming-abc" / "spec.json").write_text("{}")
    ModelRegistry(tmp_path)
    assert _entries(tmp_path) == []


def test_a_corrupted_stored_model_is_skipped_and_can_be_registered_again(tmp_path, files):
    model_id = _register(ModelRegistry(tmp_path), files)
    (tmp_path / "models" / model_id / "weights.safetensors").write_bytes(b"junk")
    registry = ModelRegistry(tmp_path)
    assert registry.ids() == []
    assert registry.add({"spec.json": files["spec"], "weights.safetensors": files["weights"],
                          "calibration.npz": files["calibration"]}).created
    assert ModelRegistry(tmp_path).ids() == [model_id]


def test_register_directory_and_lookups(tmp_path, files):
    source = tmp_path / "source"
    source.mkdir()
    for name, key in (("spec.json", "spec"), ("weights.safetensors", "weights"), ("calibration.npz", "calibration")):
        (source / name).write_bytes(files[key])
    registry = ModelRegistry(tmp_path / "state")
    assert registry.register_directory(source) == files["model_id"]
    (source / "calibration.npz").unlink()
    with pytest.raises(SpecError, match="calibration.npz"):
        registry.register_directory(source)
    with pytest.raises(UnknownModelError):
        registry.get("nope")
    with pytest.raises(ProfileError):
        registry.set_state(files["model_id"], "cooking")
