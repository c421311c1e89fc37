"""Seconds per training epoch of each zoo architecture on this machine, from a short timed run.

Times ``n_batches`` optimiser steps (forward of every exit, the summed loss,
backward, AdamW) on random inputs after one warm-up step, and extrapolates to
an epoch of ``n_images`` (54,000: Fashion-MNIST's training part after the
10% validation split; CIFAR-10's is 45,000). It measures the step only: the
validation pass at the end of each epoch adds about a third of an epoch's
forward passes over 10% of the images.

Two figures per step: wall seconds, which depend on what else the machine
runs, and this process's CPU seconds divided by the thread count, which is
about what the wall time would be on an otherwise idle machine (exact for
one thread; with more, the threads' waiting is counted too).

    python benchmarks/train_epoch.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from popex.nets.early_exit import EarlyExitNet
from popex.nets.flops import stage_macs
from popex.nets.zoo import zoo_spec

# (label, architecture, input channels, image side, builder options)
CONFIGS = (
    ("b-lenet", "b-lenet", 1, 28, {}),
    ("b-alexnet w0.5 (models/default)", "b-alexnet", 1, 28, {"width": 0.5}),
    ("b-alexnet w1", "b-alexnet", 1, 28, {"width": 1.0}),
    ("b-resnet w1.25 blocks 1,1,1,1 (models/b-resnet)", "b-resnet", 1, 28,
     {"width": 20, "blocks_per_layer": (1, 1, 1, 1)}),
    ("b-resnet w1 blocks 2,2,2,2 (ResNet-18 layout)", "b-resnet", 1, 28, {"width": 16}),
    ("b-resnet w1 blocks 2,2,2,2, CIFAR-10 32x32x3", "b-resnet", 3, 32, {"width": 16}),
    ("b-mobilenetv2 w0.5 depth 0.5", "b-mobilenetv2", 1, 28, {"width_mult": 0.5, "depth_mult": 0.5}),
    ("b-mobilenetv2 w1", "b-mobilenetv2", 1, 28, {}),
)


def time_steps(net: EarlyExitNet, *, batch_size: int, n_batches: int, n_threads: int) -> tuple[float, float]:
    """Median wall seconds and median CPU seconds / ``n_threads`` of one optimiser step at ``batch_size``."""
    optimizer = torch.optim.AdamW(net.parameters())
    inputs = torch.randn(batch_size, *net.input_shape)
    labels = torch.randint(0, net.n_classes, (batch_size,))
    net.train()
    seconds, cpu_seconds = [], []
    for step in range(n_batches + 1):
        started, cpu_started = time.perf_counter(), time.process_time()
        loss = sum(torch.nn.functional.cross_entropy(out, labels) for out in net(inputs))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step:  # the first step is warm-up
            seconds.append(time.perf_counter() - started)
            cpu_seconds.append((time.process_time() - cpu_started) / n_threads)
    return sorted(seconds)[len(seconds) // 2], sorted(cpu_seconds)[len(cpu_seconds) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--n-images", type=int, default=54_000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"threads {args.threads}, batch {args.batch_size}, load average {os.getloadavg()[0]:.1f} at start")
    print("| architecture | M MACs/image | parameters | wall s/step | CPU s/step / threads | "
          "min/epoch, idle machine (from CPU) | min/epoch, as measured (wall) |")
    print("|---|---|---|---|---|---|---|")
    for label, arch, channels, size, options in CONFIGS:
        net = EarlyExitNet(zoo_spec(arch, in_channels=channels, image_size=size, **options))
        wall, cpu = time_steps(net, batch_size=args.batch_size, n_batches=args.batches, n_threads=args.threads)
        n_params = sum(p.numel() for p in net.parameters())
        steps_per_epoch = args.n_images / args.batch_size
        print(f"| {label} | {sum(stage_macs(net)) / 1e6:.1f} | {n_params:,} | {wall:.2f} | {cpu:.2f} | "
              f"{cpu * steps_per_epoch / 60:.1f} | {wall * steps_per_epoch / 60:.1f} |", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
