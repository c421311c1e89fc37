"""`popex train` on any dataset: the readers, the size options of every zoo architecture, the card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from popex.cli import main
from popex.data.images import encode_png
from popex.errors import ConfigError, SpecError
from popex.nets.early_exit import EarlyExitNet
from popex.nets.flops import stage_macs
from popex.nets.io import load_model
from popex.nets.recipe import TrainRecipe, exit_macs, load_dataset, train_model_dir
from popex.nets.train import TrainConfig
from popex.nets.zoo import zoo_spec


def _write_image_folder(root: Path, *, n_per_class: int, size_px: int, seed: int) -> None:
    """Two classes a network can tell apart: bright top half or bright bottom half, RGB."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(("bottom", "top")):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(n_per_class):
            image = rng.integers(0, 60, (size_px, size_px, 3), dtype=np.uint8)
            rows = slice(0, size_px // 2) if label else slice(size_px // 2, size_px)
            image[rows] += 150
            (folder / f"{i:03d}.png").write_bytes(encode_png(image))


def _write_cifar(root: Path, *, n_per_batch: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        records = rng.integers(0, 256, (n_per_batch, 3073), dtype=np.uint8)
        records[:, 0] = rng.integers(0, 10, n_per_batch)
        (root / name).write_bytes(records.tobytes())


@pytest.mark.parametrize(("arch", "small", "large"), [
    ("b-lenet", {"width": 0.5}, {"width": 2.0}),
    ("b-alexnet", {"width": 0.25}, {"width": 1.0}),
    ("b-resnet", {"width": 8, "blocks_per_layer": (1, 1, 1, 1)}, {"width": 8, "blocks_per_layer": (2, 2, 2, 2)}),
    ("b-mobilenetv2", {"width_mult": 0.25, "depth_mult": 0.5}, {"width_mult": 0.25, "depth_mult": 1.0}),
])
def test_every_architecture_has_size_options(arch: str, small: dict, large: dict) -> None:
    nets = [EarlyExitNet(zoo_spec(arch, in_channels=1, image_size=28, **options)) for options in (small, large)]
    assert sum(stage_macs(nets[0])) < sum(stage_macs(nets[1]))
    assert nets[0].n_exits == nets[1].n_exits


def test_resnet_exits_at_about_quarter_half_three_quarters_and_cost_increases() -> None:
    net = EarlyExitNet(zoo_spec("b-resnet", in_channels=1, image_size=28, width=20, blocks_per_layer=(1, 1, 1, 1)))
    macs = stage_macs(net)
    shares = [sum(macs[:k]) / sum(macs) for k in net.branch_after_stage]
    np.testing.assert_allclose(shares, [0.25, 0.5, 0.75], atol=0.05)
    per_exit = exit_macs(net)
    assert per_exit == sorted(per_exit) and len(set(per_exit)) == net.n_exits


def test_a_bottleneck_stem_makes_the_first_cut_smaller_than_the_input() -> None:
    """The split-computing stem: the tensor after stage 1 is what a cut there ships, and it must undercut the image."""
    net = EarlyExitNet(zoo_spec("b-resnet", in_channels=1, image_size=28, width=32, blocks_per_layer=(2, 1),
                                bottleneck_channels=4, exit_flop_fractions=(0.3, 0.6)))
    shapes = net.stage_output_shapes()
    assert shapes[1] == (4, 7, 7)  # stride 4, four channels: 196 values against the image's 784
    assert np.prod(shapes[1]) < np.prod(shapes[0])
    plain = EarlyExitNet(zoo_spec("b-resnet", in_channels=1, image_size=28, width=32, blocks_per_layer=(2, 1)))
    assert np.prod(plain.stage_output_shapes()[1]) > np.prod(shapes[0])  # without it, every cut is larger
    macs = stage_macs(net)
    shares = [sum(macs[:k]) / sum(macs) for k in net.branch_after_stage]
    assert len(shares) == 2 and shares == sorted(shares)
    # each branch sits at the stage nearest its fraction: no other stage is nearer
    all_shares = [sum(macs[:k]) / sum(macs) for k in range(1, net.n_stages)]
    for got, want in zip(shares, (0.3, 0.6)):
        assert abs(got - want) == min(abs(s - want) for s in all_shares)
    with torch.inference_mode():
        assert [tuple(x.shape) for x in net.eval()(torch.zeros(2, 1, 28, 28))] == [(2, 10)] * 3


def test_bad_sizes_and_misplaced_options_are_refused() -> None:
    with pytest.raises(SpecError, match="width"):
        zoo_spec("b-lenet", width=0)
    with pytest.raises(SpecError, match="depth_mult"):
        zoo_spec("b-mobilenetv2", depth_mult=-1)
    with pytest.raises(ConfigError, match="b-resnet option"):
        TrainRecipe(arch="b-alexnet", blocks=(1, 1))
    with pytest.raises(ConfigError, match="dataset"):
        TrainRecipe(dataset="mnist")
    with pytest.raises(ConfigError, match="b-resnet option"):
        TrainRecipe(arch="b-mobilenetv2", bottleneck=4)
    with pytest.raises(ConfigError, match="exit fractions"):
        TrainRecipe(arch="b-resnet", exit_fractions=(0.5, 0.25))
    with pytest.raises(ConfigError, match="exit fractions"):
        TrainRecipe(arch="b-lenet", exit_fractions=(0.5,))
    with pytest.raises(SpecError, match="bottleneck_channels"):
        zoo_spec("b-resnet", bottleneck_channels=0)


def test_cifar10_binary_is_read(tmp_path: Path) -> None:
    _write_cifar(tmp_path / "cifar-10-batches-bin", n_per_batch=4, seed=0)
    train, test = load_dataset("cifar10", tmp_path)
    assert (len(train), len(test), train.image_shape) == (20, 4, (32, 32, 3))


def test_train_on_an_image_folder_writes_a_complete_model(tmp_path: Path) -> None:
    _write_image_folder(tmp_path / "data", n_per_class=40, size_px=20, seed=0)
    recipe = TrainRecipe(arch="b-lenet", width=0.5, dataset="imagefolder", data_root=str(tmp_path / "data"),
                         max_train_images=30, image_size=16, val_fraction=0.2,
                         train=TrainConfig(n_epochs=1, batch_size=16, n_threads=1))
    model_id = train_model_dir(tmp_path / "model", recipe, progress=False)
    model = load_model(tmp_path / "model")
    card = json.loads((tmp_path / "model" / "card.json").read_text())
    assert model.model_id == card["model_id"] == model_id
    assert model.net.input_shape == (3, 16, 16) and model.net.spec["class_names"] == ["bottom", "top"]
    assert card["n_train_images"] == 30 and len(card["epoch_seconds"]) == 1
    assert card["test"]["n_test_samples"] == round(80 / 6)  # no test/ folder: a sixth held out
    assert card["exit_macs"][-1] == sum(card["stage_macs"])
    for option in ("--dataset imagefolder", "--max-train-images 30", "--image-size 16", "--threads 1"):
        assert option in card["command"]
    assert "Fashion-MNIST" not in (tmp_path / "model" / "MODEL_CARD.md").read_text()


def test_cli_refuses_options_of_another_architecture(capsys) -> None:
    assert main(["train", "--arch", "b-alexnet", "--blocks", "1,1", "--out", "unused"]) == 2
    assert "b-resnet option" in capsys.readouterr().err
    assert main(["train", "--arch", "b-resnet", "--exit-fractions", "0.2,x", "--out", "unused"]) == 2
    assert "--exit-fractions" in capsys.readouterr().err
    assert main(["train", "--dataset", "cifar10", "--out", "unused"]) == 2
    assert "--data-root" in capsys.readouterr().err
