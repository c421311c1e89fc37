"""Multiply-accumulate counts per stage, from a dry run.

Used to place branches at FLOP fractions (SPINN) and to annotate profiles;
only convolutions and linear layers are counted, which dominate by far.
"""

from __future__ import annotations

import torch
from torch import nn

from popex.nets.early_exit import EarlyExitNet

__all__ = ["stage_macs"]


def _count_macs(modules: list[nn.Module], x: torch.Tensor) -> tuple[int, torch.Tensor]:
    n_macs = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal n_macs
        if isinstance(module, nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1] * (module.in_channels // module.groups)
            n_macs += output.numel() * kernel
        elif isinstance(module, nn.Linear):
            n_macs += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for top in modules for m in top.modules()]
    try:
        for module in modules:
            x = module(x)
    finally:
        for handle in handles:
            handle.remove()
    return n_macs, x


def stage_macs(net: EarlyExitNet) -> list[int]:
    """Multiply-accumulates of each stage for one input (batch of 1).

    >>> from popex.nets.zoo import b_lenet_spec
    >>> macs = stage_macs(EarlyExitNet(b_lenet_spec()))
    >>> len(macs), all(m > 0 for m in macs)
    (3, True)
    """
    was_training = net.training
    net.eval()
    x = torch.zeros(1, *net.input_shape)
    counts = []
    with torch.inference_mode():
        for modules in net._stages:
            n_macs, x = _count_macs(modules, x)
            counts.append(n_macs)
    net.train(was_training)
    return counts
