"""``popex device classify --edge URL --model DIR IMAGES... [--deadline-ms D] [--json]``.

One line per image (``--json``: one JSON object per line with ``label``,
``exit``, ``where`` in {device, edge, cloud}, ``cuts``, ``ran`` (the stages
each tier ran), ``latency_ms``, ``fallback``). With the edge's device token
(``--device-token`` or POPEX_DEVICE_TOKEN) the device pulls its part of the
three-tier plan and runs stages 1..x itself; without it, it sends the images.
The device answers itself when the edge is late or unreachable
(:mod:`popex.device.client`).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

__all__ = ["DEVICE_HELP", "add_device_parser"]

DEVICE_HELP = "the device tier: classify images through the edge, answering locally when it is late or down"


def _cmd_classify(args: argparse.Namespace) -> int:
    from popex.device.client import DeviceClient
    from popex.errors import DataError

    client = DeviceClient(edge_url=args.edge, model_dir=args.model, slowdown=args.emulate_slowdown,
                          device_token=args.device_token or os.environ.get("POPEX_DEVICE_TOKEN") or None,
                          objective=args.objective, policy=args.policy, pin_x=args.x, pin_y=args.y,
                          refresh_every_n=args.refresh_every)
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
    c.add_argument("--emulate-slowdown", type=float, default=1.0, help="local compute F times slower (>= 1), "
                                                                       "e.g. 5.45 for raspi4 (configs/devices.yaml)")
    c.add_argument("--json", action="store_true", help="one JSON object per image")
    c.add_argument("--device-token", help="the edge's device token (default: POPEX_DEVICE_TOKEN): run the "
                                          "three-tier plan")
    c.add_argument("--objective", choices=("mean", "tail"), help="plan for the mean or the worst case")
    c.add_argument("--policy", help="a three-tier policy (default: the adaptive three-tier)")
    c.add_argument("--x", type=int, help="pin the device's cut (stages 1..x on the device)")
    c.add_argument("--y", type=int, help="pin the edge's cut (stages x+1..y on the edge)")
    c.add_argument("--refresh-every", type=int, default=50, help="re-plan every K images (default 50)")
    c.set_defaults(run=_cmd_classify)
    return p
