"""Three real tiers on one machine: a cloud, an edge with the three-tier routes, and the device link between.

``three_tier_services`` starts ``run_cloud.sh`` and ``run_edge.sh``
(:mod:`popex.testbed.services`) with the edge's device token set, waits
until the edge's model is ready, and yields both with the model's id. The
device is the caller (:class:`popex.device.DeviceClient` in the same
process, or ``popex device classify``).

With ``device_link_mbps`` the edge runs in its own network namespace behind
a tbf-shaped veth (:func:`popex.testbed.netns.shaped_link`): traffic from the
root namespace (the device) to the edge is shaped, the answers are not. The
cloud runs in the same namespace (the edge reaches it without crossing the
veth, so the cloud's answers do not queue behind the device's uploads), and
the edge -> cloud hop is unshaped unless ``edge_link`` asks the edge to
emulate one (``--emulate-link``). :meth:`ThreeTierServices.set_device_link_mbps`
reshapes the device link in place. Needs root for the namespace: without
it :class:`~popex.testbed.netns.HarnessUnavailable` is raised (tests skip).
Every wait is bounded and everything is stopped on exit.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import requests

from popex.testbed.netns import ShapedLink, shaped_link
from popex.testbed.services import REPO_ROOT, ServiceError, ServiceProcess, start_cloud, start_edge

__all__ = ["DEFAULT_THREE_TIER_MODEL_DIR", "ThreeTierServices", "three_tier_services"]

#: The model of the three-tier runs: the default model's 4x7x7 bottleneck after stage 1 is a quarter of
#: its input, so a cut on the device pays (B-AlexNet's early cuts are larger than its input).
DEFAULT_THREE_TIER_MODEL_DIR = REPO_ROOT / "models" / "default"
_READY_TIMEOUT_S = 120.0


@dataclass
class ThreeTierServices:
    """The running cloud and edge, the device token, the model id and the shaped device link (if any)."""

    cloud: ServiceProcess
    edge: ServiceProcess
    device_token: str
    model_id: str
    model_dir: Path
    link: ShapedLink | None = None

    def set_device_link_mbps(self, uplink_mbps: float) -> None:
        """Reshape the device -> edge link now (tbf rate, Mbit/s).

        Parameters
        ----------
        uplink_mbps : float

        Raises
        ------
        ServiceError
            Without a shaped link (started without ``device_link_mbps``).
        """
        if self.link is None:
            raise ServiceError("the device link is not shaped: start with device_link_mbps")
        self.link.set_rate(uplink_mbps)


def _wait_model_ready(edge: ServiceProcess) -> str:
    deadline_s = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline_s:
        models = requests.get(edge.url + "/api/v1/models", timeout=30).json()["models"]
        if models and all(m["state"] == "ready" for m in models):
            return str(models[0]["model_id"])
        time.sleep(0.3)
    raise ServiceError(f"the edge's model was not ready after {_READY_TIMEOUT_S:.0f} s:\n{edge.log_tail()}")


@contextlib.contextmanager
def three_tier_services(work_dir: Path, *, model_dir: Path = DEFAULT_THREE_TIER_MODEL_DIR,
                        device_link_mbps: float | None = None, edge_link: str | None = None,
                        edge_slowdown: float = 1.0, edge_config: Mapping[str, Any] | None = None,
                        ) -> Iterator[ThreeTierServices]:
    """Start a cloud and a three-tier edge (optionally behind a shaped device link) for a ``with`` block.

    Parameters
    ----------
    work_dir : Path
        State folders and logs.
    model_dir : Path
        The edge's model (the device loads the same files).
    device_link_mbps : float, optional
        Shape device -> edge at this rate (the edge in a network namespace; needs root).
    edge_link : str, optional
        ``"RATE_MBPS,RTT_MS"``: the edge emulates that edge -> cloud link.
    edge_slowdown : float
        The edge's emulated slowdown.
    edge_config : mapping, optional
        More keys of ``configs/edge.yaml``.

    Yields
    ------
    ThreeTierServices

    Raises
    ------
    HarnessUnavailable
        ``device_link_mbps`` given where namespaces cannot be made.
    ServiceError
        A service did not start or the model did not get ready.
    """
    token, device_token = secrets.token_hex(16), secrets.token_hex(16)
    config = {"default_model_dir": str(model_dir), "device_token": device_token, "profile_n_repeats": 5,
              **(edge_config or {})}
    with contextlib.ExitStack() as stack:
        link = None
        host, prefix = "127.0.0.1", ()
        if device_link_mbps is not None:
            link = stack.enter_context(shaped_link(uplink_mbps=device_link_mbps, rtt_ms=0, name_prefix="pxdev"))
            host, prefix = link.cloud_ip, ("ip", "netns", "exec", link.netns)
        cloud = start_cloud(token=token, state_dir=work_dir / "cloud", log_path=work_dir / "cloud.log",
                            host=host, prefix=prefix)
        stack.callback(cloud.stop)
        cloud.wait_ready()
        edge = start_edge(token=token, cloud_url=cloud.url, state_dir=work_dir / "edge",
                          log_path=work_dir / "edge.log", host=host, emulate_link=edge_link,
                          edge_slowdown=edge_slowdown, config=config, prefix=prefix)
        stack.callback(edge.stop)
        edge.wait_ready()
        yield ThreeTierServices(cloud=cloud, edge=edge, device_token=device_token,
                                model_id=_wait_model_ready(edge), model_dir=Path(model_dir), link=link)
