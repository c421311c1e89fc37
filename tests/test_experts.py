"""Expert head sets: the model format, head selection, fine-tuning, the model directory, the experiment."""

from __future__ import annotations

import copy
import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load as safetensors_load

from popex.data import Dataset, load_fashion_mnist, preprocess, Preprocessing, write_idx
from popex.data.distort import distort
from popex.data.idx import FASHION_MNIST_FILES
from popex.data.subset import SHIPPED_SUBSET_ROOT
from popex.decision import load_calibration, save_calibration
from popex.errors import PopexError, SpecError, WeightsError
from experiments.distortion import run_distortion_experiment
from popex.nets import EarlyExitNet, load_model, load_model_bytes, save_model, validate_spec, weights_to_bytes, zoo_spec
from popex.nets.distortion import ClassifierTrainConfig
from popex.nets.early_exit import UnknownHeadError
from popex.nets.expert_recipe import ExpertRecipe, train_expert_model_dir
from popex.nets.experts import (
    ExpertTrainConfig,
    add_expert_heads,
    calibrate_head,
    calibration_file,
    finetune_expert,
    head_exit_logits,
    load_expert_model,
)
from popex.nets.spec import MAX_PARAMETERS
from popex.nets.train import TrainConfig, calibrate, train_early_exit


@pytest.fixture(scope="module")
def data() -> tuple[Dataset, Dataset]:
    """600 training and 400 held-out real Fashion-MNIST images (the shipped subset)."""
    subset = load_fashion_mnist(SHIPPED_SUBSET_ROOT, split="test")
    return subset.subset(np.arange(600)), subset.subset(np.arange(600, 1000))


@pytest.fixture(scope="module")
def base(data) -> EarlyExitNet:
    """A narrow B-AlexNet trained for 3 epochs on 600 pristine images (about 15 s on two busy cores)."""
    train, val = data
    torch.manual_seed(0)
    net = EarlyExitNet(zoo_spec("b-alexnet", width=0.25, mean=[0.286], std=[0.353], class_names=list(train.class_names)))
    p = Preprocessing.from_spec_dict(net.spec)
    train_early_exit(net, preprocess(train.images, p, is_batch=True), train.labels,
                     preprocess(val.images, p, is_batch=True), val.labels,
                     config=TrainConfig(n_epochs=3, n_threads=2), progress=False)
    return net.eval()


@pytest.fixture(scope="module")
def tuned(base, data) -> EarlyExitNet:
    """``base`` with experts; the blur expert fine-tuned on the 600 training images, blurred at random levels."""
    train, _ = data
    net = add_expert_heads(base)
    finetune_expert(net, "blur", train.images, train.labels,
                    config=ExpertTrainConfig(n_epochs=4, n_images_per_epoch=None, n_threads=2), progress=False)
    return net


# -- head selection ------------------------------------------------------------------


def test_pristine_heads_are_unchanged_by_experts_and_fine_tuning(base, tuned) -> None:
    x = torch.randn(5, *base.input_shape)
    with torch.inference_mode():
        expected = base(x)
        for head in (None, "pristine"):
            assert all(torch.equal(a, b) for a, b in zip(expected, tuned(x, head=head)))
        assert not torch.equal(tuned(x, head="blur")[-1], expected[-1])
        # the noise expert was not trained: still a copy of the pristine heads
        assert all(torch.equal(a, b) for a, b in zip(expected, tuned(x, head="noise")))


def test_every_split_of_a_head_equals_its_forward(tuned) -> None:
    x = torch.randn(3, *tuned.input_shape)
    with torch.inference_mode():
        for head in tuned.head_names:
            exits = tuned(x, head=head)
            for split in range(tuned.n_stages + 1):
                edge = tuned.run_stages(x, stop=split, head=head)  # at split N the edge runs the head's final stage
                cloud = tuned.run_stages(edge, start=split, head=head)
                assert torch.allclose(cloud, exits[-1], atol=1e-5)
            for b, after_stage in enumerate(tuned.branch_after_stage):
                features = tuned.run_stages(x, stop=after_stage)
                assert torch.allclose(tuned.run_branch(b, features, head=head), exits[b], atol=1e-5)


def test_unknown_head_is_a_popex_error(tuned, base) -> None:
    x = torch.zeros(1, *tuned.input_shape)
    for call in (lambda: tuned(x, head="fog"), lambda: tuned.run_stages(x, head="Blur"),
                 lambda: tuned.run_branch(0, tuned.run_stages(x, stop=1), head="fog"), lambda: base(x, head="blur")):
        with pytest.raises(UnknownHeadError, match="no head set") as caught:
            call()
        assert isinstance(caught.value, PopexError)
    assert base.head_names == ("pristine",) and tuned.head_names == ("pristine", "blur", "noise")


# -- the model format --------------------------------------------------------------


def test_weights_file_holds_one_backbone_and_a_head_copy_per_expert(base, tuned) -> None:
    keys = set(safetensors_load(weights_to_bytes(tuned)))
    base_keys = set(base.state_dict())
    head_keys = {k for k in base_keys if k.startswith("branches.") or k.startswith("classifier.")}
    assert base_keys <= keys
    assert sum(k.startswith("features.") for k in keys) == sum(k.startswith("features.") for k in base_keys)
    for name in ("blur", "noise"):
        expert_keys = {k for k in keys if k.startswith(f"experts.{name}.")}
        assert {f"experts.{name}.{k}" for k in base_keys if k.startswith("branches.")} <= expert_keys
        n_final = sum(k.startswith(f"experts.{name}.final.") for k in expert_keys)
        assert n_final == sum(k.startswith("classifier.") for k in base_keys)  # B-AlexNet's last stage
        assert len(expert_keys) == len(head_keys)
    assert len(keys) == len(base_keys) + 2 * len(head_keys)


def test_save_load_round_trip_keeps_every_head(tmp_path, tuned) -> None:
    model_id = save_model(tuned, tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.model_id == model_id and loaded.net.expert_names == ("blur", "noise")
    assert json.loads((tmp_path / "spec.json").read_text())["experts"] == ["blur", "noise"]
    x = torch.randn(4, *tuned.input_shape)
    with torch.inference_mode():
        for head in tuned.head_names:
            assert all(torch.equal(a, b) for a, b in zip(tuned(x, head=head), loaded.net(x, head=head)))
    # weights without expert heads do not fit a spec that lists experts, and vice versa
    plain = EarlyExitNet({k: v for k, v in tuned.spec.items() if k != "experts"})
    with pytest.raises(WeightsError, match="unexpected"):
        load_model_bytes(json.dumps(plain.spec).encode(), loaded.weights_bytes)
    with pytest.raises(WeightsError, match="missing"):
        load_model_bytes(json.dumps(tuned.spec).encode(), weights_to_bytes(plain))


@pytest.mark.parametrize("experts, message", [
    ("blur", "list"), (["pristine"], "backbone's own"), (["blur", "blur"], "repeat"), (["Blur"], "lower-case"),
    ([3], "lower-case"), (["a.b"], "lower-case"), ([f"e{i}" for i in range(9)], "at most"), (["x" * 33], "lower-case"),
])
def test_spec_validation_of_the_experts_key(experts, message) -> None:
    spec = zoo_spec("b-lenet")
    spec["experts"] = experts
    with pytest.raises(SpecError, match=message):
        validate_spec(spec)


def test_expert_heads_count_towards_the_parameter_limit() -> None:
    n_hidden = MAX_PARAMETERS * 6 // 10 // 4096  # the last stage alone is 60 % of the limit
    spec = {"input_shape": [1, 64, 64], "class_names": [str(i) for i in range(10)],
            "stages": [{"layers": [{"type": "flatten"}, {"type": "linear", "in_features": 4096, "out_features": n_hidden},
                                   {"type": "linear", "in_features": n_hidden, "out_features": 10}]}]}
    validate_spec(copy.deepcopy(spec))
    with pytest.raises(SpecError, match="parameters"):
        validate_spec({**spec, "experts": ["blur"]})


# -- fine-tuning and calibration ---------------------------------------------------


def test_blur_expert_beats_the_pristine_heads_on_blurred_images(tuned, data) -> None:
    _, held_out = data
    p = Preprocessing.from_spec_dict(tuned.spec)
    inputs = preprocess(distort(held_out.images, kind="blur", level=1.0), p, is_batch=True)
    logits = head_exit_logits(tuned, inputs, heads=("pristine", "blur"))
    accuracy = {h: [float((lg.argmax(1) == held_out.labels).mean()) for lg in v] for h, v in logits.items()}
    # every exit of the blur head set gains, by a clear margin on 400 real held-out images
    assert all(b > p + 0.05 for b, p in zip(accuracy["blur"], accuracy["pristine"])), accuracy


def test_calibrate_head_matches_the_pristine_calibration(tuned, base, data) -> None:
    _, held_out = data
    inputs = preprocess(held_out.images, Preprocessing.from_spec_dict(base.spec), is_batch=True)
    reference = calibrate(base, inputs, held_out.labels)
    mine = calibrate_head(tuned, inputs, held_out.labels, head="pristine")
    np.testing.assert_allclose(mine.confidence, reference.confidence, atol=1e-6)
    np.testing.assert_allclose(mine.temperature, reference.temperature, rtol=1e-6)
    blur = calibrate_head(tuned, inputs, held_out.labels, head="blur", temperature=mine.temperature)
    assert blur.n_exits == tuned.n_exits and np.array_equal(blur.temperature, mine.temperature)
    assert calibration_file("noise") == "calibration_noise.npz"


# -- popex train-experts and popex experiment distortion, end to end -----------------


@pytest.fixture(scope="module")
def expert_dir(tmp_path_factory, base, data):
    """A model dir written by train_expert_model_dir from a tiny base model and a tiny data root."""
    root = tmp_path_factory.mktemp("experts")
    train, held_out = data
    data_root = root / "data"
    data_root.mkdir()
    for split, part in (("train", train), ("test", held_out)):
        images_name, labels_name = FASHION_MNIST_FILES[split]
        write_idx(data_root / images_name, part.images)
        write_idx(data_root / labels_name, part.labels.astype(np.uint8))
    source = root / "base"
    save_model(base, source)
    val = train.split_holdout(0.1, seed=0).val
    save_calibration(calibrate(base, preprocess(val.images, Preprocessing.from_spec_dict(base.spec), is_batch=True),
                               val.labels), source / "calibration.npz")
    recipe = ExpertRecipe(data_root=str(data_root),
                          experts=ExpertTrainConfig(n_epochs=1, n_images_per_epoch=None, n_threads=2),
                          classifier=ClassifierTrainConfig(n_epochs=1, n_threads=2))
    card = train_expert_model_dir(source, root / "out", recipe, progress=False)
    return source, root / "out", card


def test_train_experts_writes_a_complete_new_model_dir(expert_dir) -> None:
    source, out, card = expert_dir
    assert sorted(p.name for p in source.iterdir()) == ["calibration.npz", "spec.json", "weights.safetensors"]
    model = load_expert_model(out)
    assert model.loaded.model_id == card["model_id"] and model.net.expert_names == ("blur", "noise")
    assert load_calibration(out / "calibration.npz").n_samples == load_calibration(source / "calibration.npz").n_samples
    assert set(model.calibrations) == {"pristine", "blur", "noise"}
    assert {(s["kind"], s["level"]) for s in card["classifier"]["scores"]} >= {("pristine", 0.0), ("blur", 1.0)}
    text = (out / "MODEL_CARD.md").read_text()
    assert "## Test accuracy per head" in text and "## Distortion classifier" in text
    choice = model.choose(distort(load_fashion_mnist(SHIPPED_SUBSET_ROOT, split="test").images[0], kind="blur",
                                  level=1.5))
    assert choice.expert in model.net.head_names and (choice.head is None) == (choice.expert == "pristine")
    assert choice.classifier_ms > 0


def test_distortion_experiment_writes_csv_png_and_its_docs_section(expert_dir, tmp_path) -> None:
    _, out, _ = expert_dir
    docs = tmp_path / "results.md"
    docs.write_text("# Results\n\n## Other\n\nkeep me\n\n## Distortion\n\nSTALE-SECTION-TEXT\n\n## Later\n\nkeep me too\n")
    csv_path = run_distortion_experiment(out, tmp_path / "results", quick=True, docs_path=docs, progress=False)
    with open(csv_path) as handle:
        rows = list(csv.DictReader(handle))
    assert {r["system"] for r in rows} == {"pristine", "expert", "classifier"}
    assert len(rows) == 4 + 6 * 3  # pristine images: 4 systems/heads; 6 distorted conditions: 3 systems
    assert all(0 <= float(r["accuracy"]) <= 1 and 0 <= float(r["edge_exit_share"]) <= 1 for r in rows)
    assert (csv_path.parent / "distortion.png").stat().st_size > 10_000
    text = docs.read_text()
    assert "keep me\n" in text and "keep me too" in text and "STALE-SECTION-TEXT" not in text
    assert text.count("## Distortion") == 1 and text.index("## Distortion") < text.index("## Later")
    assert "target >= 50%" in text
