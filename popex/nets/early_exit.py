"""EarlyExitNet: a chain of stages with side-branch classifiers (DESIGN.md §2).

The backbone's modules are registered under the dotted names the spec gives
them (``features.3``, ``layer1.0``, ``fc``), so state-dict keys match
torchvision where a torchvision model exists; the stages are plain lists of
references into that tree, which keeps every parameter under one key.

A spec with ``"experts": ["blur", "noise"]`` gets one extra *head set* per
name under ``experts.<name>``: ``experts.<name>.branches.<b>.<j>`` mirrors
``branches.<b>.<j>`` and ``experts.<name>.final.<j>`` is layer ``j`` of the
last stage. The shared stages exist once, so one weights file holds one
backbone and every head set. ``head=None`` (or ``"pristine"``) selects the
backbone's own heads everywhere, so code that never names a head is unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from popex.errors import SpecError
from popex.nets.spec import PRISTINE_HEAD, build_layer, validate_spec
from popex.runtime.exits import exit_confidence as runtime_exit_confidence
from popex.runtime.exit_chain import ExitChain, UnknownHeadError

__all__ = ["EarlyExitNet", "UnknownHeadError", "exit_confidence", "CONFIDENCE_METHODS", "PRISTINE_HEAD"]

from popex.decision.calibration import CONFIDENCE_METHODS  # noqa: E402  one list for both sides


_RESERVED_NAMES = {"branches", "spec", "input_shape", "class_names", "stage_names", "branch_after_stage",
                   "experts", "expert_names"}


class _Container(nn.Module):
    """A node in the dotted-name tree; it only holds children."""


class _HeadSet(nn.Module):
    """One expert's copy of every branch (``branches``) and of the last stage (``final``)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(*(build_layer(layer) for layer in branch["layers"])) for branch in spec.get("branches", [])
        )
        self.final = nn.Sequential(*(build_layer(layer) for layer in spec["stages"][-1]["layers"]))


def _register(root: nn.Module, dotted_name: str, module: nn.Module, where: str) -> None:
    parts = dotted_name.split(".")
    node = root
    for part in parts[:-1]:
        child = node._modules.get(part)
        if child is None:
            child = _Container()
            node.add_module(part, child)
        elif not isinstance(child, _Container):
            raise SpecError(f"{where}: name {dotted_name!r} nests inside layer {part!r}, which is not a container")
        node = child
    if parts[0] in _RESERVED_NAMES or hasattr(type(root), parts[0]):
        raise SpecError(f"{where}: layer name {dotted_name!r} is reserved")
    if parts[-1] in node._modules:
        raise SpecError(f"{where}: layer name {dotted_name!r} is used twice")
    node.add_module(parts[-1], module)


class EarlyExitNet(ExitChain, nn.Module):
    """Stages 1..N and branches after stage k_b, built from a validated spec.

    Parameters
    ----------
    spec : dict
        A model spec (see :mod:`popex.nets.spec`); validated here, and its
        shapes checked by a dry run on the declared input shape.

    Raises
    ------
    SpecError
        If the spec is invalid or a layer does not fit its input.
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        validate_spec(spec)
        self.spec = spec
        self.input_shape: tuple[int, int, int] = tuple(spec["input_shape"])
        self.class_names: tuple[str, ...] = tuple(spec["class_names"])
        self.stage_names: tuple[str, ...] = tuple(
            stage.get("name", f"stage{i + 1}") for i, stage in enumerate(spec["stages"])
        )
        self.branch_after_stage: tuple[int, ...] = tuple(b["after_stage"] for b in spec.get("branches", []))
        self._stages: list[list[nn.Module]] = []
        for i, stage in enumerate(spec["stages"]):
            modules = []
            for j, layer in enumerate(stage["layers"]):
                module = build_layer(layer)
                _register(self, layer.get("name") or f"stage{i + 1}.{j}", module, f"stages[{i}].layers[{j}]")
                modules.append(module)
            self._stages.append(modules)
        self.branches = nn.ModuleList(
            nn.Sequential(*(build_layer(layer) for layer in branch["layers"])) for branch in spec.get("branches", [])
        )
        self.expert_names: tuple[str, ...] = tuple(spec.get("experts", []))
        # An empty ModuleDict adds no state-dict keys, so models without experts keep their weights format.
        # The expert head sets are the same layers as the backbone's heads, so the dry run covers their shapes.
        self.experts = nn.ModuleDict({name: _HeadSet(spec) for name in self.expert_names})
        self._dry_run()

    def run_stages(self, x: torch.Tensor, *, start: int = 0, stop: int | None = None,
                   head: str | None = None) -> torch.Tensor:
        """Run stages start+1..stop (a split index on each side: 0..N).

        ``head`` selects whose last stage runs when stage N is included; the
        shared stages are the same for every head. Raises UnknownHeadError
        for a head the model does not have.
        """
        stop = self.n_stages if stop is None else stop
        if not 0 <= start <= stop <= self.n_stages:
            raise ValueError(f"need 0 <= start <= stop <= {self.n_stages}, got start={start}, stop={stop}")
        expert = self.check_head(head)
        for i in range(start, stop):
            if expert is not None and i == self.n_stages - 1:
                x = self.experts[expert].final(x)
                continue
            for module in self._stages[i]:
                x = module(x)
        return x

    def run_branch(self, branch: int, features: torch.Tensor, *, head: str | None = None) -> torch.Tensor:
        """Logits of branch ``branch`` (0-based) of head set ``head`` from the output of its stage."""
        expert = self.check_head(head)
        branches = self.branches if expert is None else self.experts[expert].branches
        return branches[branch](features)

    def forward(self, x: torch.Tensor, *, head: str | None = None) -> list[torch.Tensor]:
        """Logits of every exit of head set ``head``: branches in order, then the final exit."""
        return self.exits(x, head=head)

    def stage_output_shapes(self) -> list[tuple[int, ...]]:
        """Shape (without batch) of the tensor after each split 0..N."""
        shapes = [self.input_shape]
        x = torch.zeros(1, *self.input_shape)
        with torch.inference_mode():
            for i in range(self.n_stages):
                x = self.run_stages(x, start=i, stop=i + 1)
                shapes.append(tuple(x.shape[1:]))
        return shapes

    def _dry_run(self) -> None:
        was_training = self.training
        self.eval()
        x = torch.zeros(1, *self.input_shape)
        outputs = [x]
        with torch.inference_mode():
            for i in range(self.n_stages):
                try:
                    x = self.run_stages(x, start=i, stop=i + 1)
                except RuntimeError as err:
                    shape = list(outputs[-1].shape[1:])
                    raise SpecError(
                        f"stage {i + 1} ({self.stage_names[i]!r}) does not fit its input of shape {shape}: {err}"
                    ) from err
                outputs.append(x)
            if tuple(x.shape) != (1, self.n_classes):
                raise SpecError(
                    f"the last stage must end in the classifier with {self.n_classes} outputs "
                    f"(one per class name); it produces shape {list(x.shape[1:])}"
                )
            for b, after_stage in enumerate(self.branch_after_stage):
                features = outputs[after_stage]
                try:
                    logits = self.run_branch(b, features)
                except RuntimeError as err:
                    raise SpecError(
                        f"branch {b} (after stage {after_stage}) does not fit its input of shape "
                        f"{list(features.shape[1:])}: {err}"
                    ) from err
                if tuple(logits.shape) != (1, self.n_classes):
                    raise SpecError(
                        f"branch {b} must produce {self.n_classes} logits, it produces shape {list(logits.shape[1:])}"
                    )
        self.train(was_training)


def exit_confidence(
    logits: torch.Tensor, *, temperature: float = 1.0, method: str = "max_softmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`popex.runtime.exits.exit_confidence` on torch logits (training and calibration).

    Examples
    --------
    >>> conf, pred = exit_confidence(torch.tensor([[0.0, 0.0]]))
    >>> round(conf.item(), 3), pred.item()
    (0.5, 0)
    """
    confidence, predicted = runtime_exit_confidence(logits.detach().float().cpu().numpy(),
                                                    temperature=temperature, method=method)
    return torch.from_numpy(confidence), torch.from_numpy(predicted)
