"""``popex device classify --edge URL --model DIR IMAGES... [--deadline-ms D] [--json]``.

One line per image (``--json``: one JSON object per line with ``label``,
``exit``, ``where`` in {device, edge, cloud}, ``cuts``, ``latency_ms``,
``fallback``). The device answers itself when the edge is late or
unreachable (:mod:`popex.device.client`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["DEVICE_HELP", "add_device_parser"]

DEVICE_HELP = "the device tier: classify images through the edge, answering locally when it is late or down"


def _cmd_classify(args: argparse.Namespace) -> int:
    from popex.device.client import DeviceClient
    from popex.errors import DataError

    client = DeviceClient(edge_url=args.edge, model_dir=args.model, slowdown=args.emulate_slowdown)
    try:
        for name in args.images:
            try:
                image = Path(name).read_bytes()
            except OSError as err:
                raise DataError(f"cannot read image {name!r}: {err.strerror or err}") from err
            answer = client.classify(image, deadline_ms=args.deadline_ms)
            if args.json:
                print(json.dumps({"image": name, **answer.to_dict()}), flush=True)
            else:
                print(f"{name}: {answer.class_name or answer.label} (exit {answer.exit}, {answer.where}"
                      f"{', fallback' if answer.fallback else ''}, {answer.latency_ms:.1f} ms)", flush=True)
    finally:
        client.close()
    return 0


def add_device_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``popex device``: see the module docstring.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction

    Returns
    -------
    argparse.ArgumentParser
    """
    p = subparsers.add_parser("device", help=DEVICE_HELP, description=__doc__.split("\n\n")[0])
    actions = p.add_subparsers(dest="action", required=True)
    c = actions.add_parser("classify", help="classify images through the edge")
    c.add_argument("--edge", required=True, help="the edge's URL, e.g. http://127.0.0.1:8000")
    c.add_argument("--model", required=True, help="the model directory (the files the edge registered)")
    c.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG or BMP files")
    c.add_argument("--deadline-ms", type=float, help="latency requirement, also the edge's timeout")
    c.add_argument("--emulate-slowdown", type=float, default=1.0, help="local compute F times slower (>= 1)")
    c.add_argument("--json", action="store_true", help="one JSON object per image")
    c.set_defaults(run=_cmd_classify)
    return p
