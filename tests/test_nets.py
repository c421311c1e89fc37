"""EarlyExitNet, the spec whitelist, safetensors I/O and the zoo."""

from __future__ import annotations

import copy
import io
import json
import pickle

import numpy as np
import pytest
import torch

from popex.errors import SpecError, WeightsError
from popex.nets import (
    EarlyExitNet,
    compute_model_id,
    exit_confidence,
    load_model,
    load_model_bytes,
    save_model,
    validate_spec,
    weights_to_bytes,
    zoo_spec,
)
from popex.nets.flops import stage_macs
from popex.nets.spec import MAX_PARAMETERS


@pytest.fixture(scope="module")
def lenet() -> EarlyExitNet:
    torch.manual_seed(0)
    return EarlyExitNet(zoo_spec("b-lenet")).eval()


@pytest.mark.parametrize("name", ["b-lenet", "b-alexnet", "b-resnet", "b-mobilenetv2"])
def test_zoo_builds_and_every_exit_has_class_logits(name: str) -> None:
    net = EarlyExitNet(zoo_spec(name)).eval()
    x = torch.randn(2, *net.input_shape)
    with torch.inference_mode():
        logits = net(x)
    assert len(logits) == net.n_branches + 1 >= 2
    assert all(tuple(lg.shape) == (2, net.n_classes) for lg in logits)


def test_split_execution_equals_full_forward(lenet: EarlyExitNet) -> None:
    x = torch.randn(3, *lenet.input_shape)
    with torch.inference_mode():
        full = lenet(x)[-1]
        for split in range(lenet.n_stages + 1):
            head = lenet.run_stages(x, start=0, stop=split)
            tail = lenet.run_stages(head, start=split)
            torch.testing.assert_close(tail, full)


def test_branch_logits_equal_forward_outputs(lenet: EarlyExitNet) -> None:
    x = torch.randn(2, *lenet.input_shape)
    with torch.inference_mode():
        outputs = lenet(x)
        k = lenet.branch_after_stage[0]
        torch.testing.assert_close(lenet.run_branch(0, lenet.run_stages(x, stop=k)), outputs[0])


def test_torchvision_parameter_names() -> None:
    resnet = set(EarlyExitNet(zoo_spec("b-resnet")).state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
            "layer4.1.bn2.weight", "fc.weight", "fc.bias"} <= resnet
    mobilenet = set(EarlyExitNet(zoo_spec("b-mobilenetv2")).state_dict())
    assert {"features.0.0.weight", "features.0.1.running_var", "features.1.conv.0.0.weight",
            "features.2.conv.0.0.weight", "features.2.conv.3.weight", "features.18.0.weight",
            "classifier.1.weight"} <= mobilenet


def test_mobilenetv2_exits_near_quarter_half_three_quarters_of_flops() -> None:
    net = EarlyExitNet(zoo_spec("b-mobilenetv2"))
    macs = stage_macs(net)
    fractions = [sum(macs[:k]) / sum(macs) for k in net.branch_after_stage]
    assert len(fractions) == 3
    for got, want in zip(fractions, (0.25, 0.5, 0.75)):
        assert abs(got - want) < 0.06


def test_exit_confidence_methods() -> None:
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    conf, pred = exit_confidence(logits)
    assert pred.tolist() == [0, 0]
    assert conf[0] > 0.9 and conf[1] == pytest.approx(1 / 3)
    hot, _ = exit_confidence(logits, temperature=4.0)
    assert hot[0] < conf[0]  # a higher temperature flattens
    entropy, _ = exit_confidence(logits, method="entropy")
    assert entropy[1] == pytest.approx(0.0, abs=1e-6) and 0 < entropy[0] < 1


# -- malformed specs: one clear SpecError each ------------------------------------------


def _mutated(mutate) -> dict:
    spec = copy.deepcopy(zoo_spec("b-lenet"))
    mutate(spec)
    return spec


BAD_SPECS = {
    "unknown layer": (lambda s: s["stages"][0]["layers"].append({"type": "lambda"}), "unknown layer type 'lambda'"),
    "python in an argument": (lambda s: s["stages"][0]["layers"][0].update(kernel_size="__import__('os')"),
                              "kernel_size must be an integer"),
    "unknown argument": (lambda s: s["stages"][0]["layers"][0].update(init="eval"), "unknown argument"),
    "missing stages": (lambda s: s.pop("stages"), "missing 'stages'"),
    "empty stages": (lambda s: s.update(stages=[]), "stages must be a non-empty list"),
    "wrong shapes": (lambda s: s["stages"][1]["layers"][0].update(in_channels=7), "stage 2 ('conv2') does not fit"),
    "wrong classifier width": (lambda s: s["stages"][2]["layers"][-1].update(out_features=3), "10 outputs"),
    "branch after last stage": (lambda s: s["branches"][0].update(after_stage=3), "after_stage must be in [1, 2]"),
    "branch does not fit": (lambda s: s["branches"][0]["layers"][0].update(in_channels=3), "branch 0"),
    "huge layer": (lambda s: s["stages"][2]["layers"].insert(1, {"type": "linear", "in_features": 16_000_000,
                                                                 "out_features": 16_000_000}),
                   f"at most {MAX_PARAMETERS:,}"),
    "bad name": (lambda s: s["stages"][0]["layers"][0].update(name="../etc"), "dotted identifier"),
    "reserved name": (lambda s: s["stages"][0]["layers"][0].update(name="branches"), "reserved"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_malformed_spec_fails_with_one_clear_message(case: str) -> None:
    mutate, message = BAD_SPECS[case]
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        EarlyExitNet(_mutated(mutate))


def test_spec_that_is_not_json_or_not_an_object() -> None:
    with pytest.raises(SpecError, match="not valid JSON"):
        load_model_bytes(b"{not json", b"")
    with pytest.raises(SpecError, match="must be a JSON object"):
        validate_spec([1, 2])


# -- weights --------------------------------------------------------------------------


def test_save_load_round_trip_and_model_id(tmp_path, lenet: EarlyExitNet) -> None:
    model_id = save_model(lenet, tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.model_id == model_id == compute_model_id(lenet.spec, (tmp_path / "weights.safetensors").read_bytes())
    x = torch.randn(1, *lenet.input_shape)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.net(x)[-1], lenet(x)[-1])
    # the id changes with the weights, not with the spec's formatting
    reformatted = json.dumps(lenet.spec, indent=7).encode()
    assert load_model_bytes(reformatted, loaded.weights_bytes).model_id == model_id
    other = EarlyExitNet(zoo_spec("b-lenet"))
    assert compute_model_id(other.spec, weights_to_bytes(other)) != model_id


def test_pickle_passed_as_weights_is_refused_without_unpickling(lenet: EarlyExitNet, monkeypatch) -> None:
    buffer = io.BytesIO()
    torch.save(lenet.state_dict(), buffer)  # a real checkpoint, the dangerous format
    plain_pickle = pickle.dumps({"conv1.weight": np.zeros(3)})

    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    spec_bytes = json.dumps(lenet.spec).encode()
    with pytest.raises(WeightsError, match="torch.save"):
        load_model_bytes(spec_bytes, buffer.getvalue())
    with pytest.raises(WeightsError, match="pickle"):
        load_model_bytes(spec_bytes, plain_pickle)


def test_weights_that_do_not_match_the_spec(lenet: EarlyExitNet) -> None:
    spec_bytes = json.dumps(lenet.spec).encode()
    alexnet = EarlyExitNet(zoo_spec("b-alexnet", width=0.25))
    with pytest.raises(WeightsError, match="missing"):
        load_model_bytes(spec_bytes, weights_to_bytes(alexnet))
    wider = _mutated(lambda s: (s["stages"][2]["layers"][1].update(out_features=121),
                                s["stages"][2]["layers"][3].update(in_features=121)))
    with pytest.raises(WeightsError, match=r"'fc1.weight' has shape \[120, 400\]"):
        load_model_bytes(json.dumps(wider).encode(), weights_to_bytes(lenet))
    with pytest.raises(WeightsError, match="empty"):
        load_model_bytes(spec_bytes, b"")


def test_non_finite_weights_are_refused(lenet: EarlyExitNet) -> None:
    broken = EarlyExitNet(lenet.spec)
    with torch.no_grad():
        broken.get_submodule("fc1").weight[0, 0] = float("nan")
    with pytest.raises(WeightsError, match="NaN"):
        load_model_bytes(json.dumps(lenet.spec).encode(), weights_to_bytes(broken))
