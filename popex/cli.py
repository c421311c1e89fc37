"""The ``popex`` command: train, profile, plan.

Every subcommand parses its arguments, calls one popex function and prints;
a PopexError becomes one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from popex.errors import PopexError

__all__ = ["main"]


def _cmd_train(args: argparse.Namespace) -> int:
    from popex.nets.recipe import TrainRecipe, train_model_dir
    from popex.nets.train import TrainConfig

    recipe = TrainRecipe(
        arch=args.arch,
        width=args.width,
        data_root=args.data_root,
        val_fraction=args.val_fraction,
        confidence_method=args.confidence,
        train=TrainConfig(n_epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                          seed=args.seed, n_threads=args.threads),
    )
    model_id = train_model_dir(args.out, recipe, progress=not args.quiet)
    print(f"model {model_id} written to {args.out} (see {args.out}/MODEL_CARD.md)")
    return 0


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    from popex.data.idx import DEFAULT_FASHION_MNIST_ROOT
    from popex.nets.zoo import ZOO

    p = subparsers.add_parser("train", help="train an early-exit network on Fashion-MNIST and write a model dir")
    p.add_argument("--arch", choices=sorted(ZOO), default="b-alexnet")
    p.add_argument("--width", type=float, default=0.5, help="channel multiplier (b-alexnet only)")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--data-root", default=DEFAULT_FASHION_MNIST_ROOT, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--confidence", choices=("max_softmax", "entropy"), default="max_softmax")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_cmd_train)


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_train]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``popex``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="popex", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except PopexError as err:
        print(f"popex {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"popex {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
