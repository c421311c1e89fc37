"""The edge tier's one composition root: :meth:`EdgeNode.from_config` builds every part from the config.

Everything below the node receives what it needs as keyword arguments and
keeps no copy of another part's state; the config's values are read here
and nowhere else. The Flask app (``edge_api.create_app``) builds one node
and registers its routes on it; a test or an experiment can build one
without Flask. Building starts no thread: :meth:`EdgeNode.start` starts the
background planner and the uplink monitor, :meth:`EdgeNode.close` stops
everything.
"""

from __future__ import annotations

import logging
from typing import Any


from popex.decision.latency import Link
from popex.edge.breaker import CircuitBreaker
from popex.edge.cloud_port import CloudClient
from popex.edge.compute import EdgeCompute
from popex.edge.device_link import DeviceLinks
from popex.edge.pipeline import EdgeRunner
from popex.edge.planner import BackgroundPlanner
from popex.edge.plans import PlanBook
from popex.edge.preparation import ModelPreparation
from popex.edge.store import ModelRegistry
from popex.edge.three_tier_plan import DevicePlanner
from popex.edge.uplink import UplinkMonitor
from popex.edge.vetting import ModelVetting
from popex.edge.views import EdgeViews
from popex.errors import PopexError
from popex.link.control import LinkController, resolve_cloud_ipv4
from popex.link.emulation import parse_link
from popex.link.profiles import load_link_profiles
from popex.runtime.model_cost import check_model_cost, files_cost

__all__ = ["EdgeNode"]

_log = logging.getLogger(__name__)

_HISTORY_FILE = "uplink_history.csv"


def _initial_link(config: Any, client: Any) -> Link:
    """The emulated link if the client emulates one, else the configured one."""
    emulated = getattr(client, "link", None)
    if emulated is not None:
        return Link(uplink_mbps=emulated.uplink_mbps, rtt_ms=emulated.rtt_ms)
    return Link(uplink_mbps=config.initial_uplink_mbps, rtt_ms=config.initial_rtt_ms)


class EdgeNode:
    """Every part of one edge, built once; see :meth:`from_config`.

    Parameters
    ----------
    config : EdgeConfig
        The frozen config it was built from (``edge_api.config``).
    client : CloudClient
        The cloud port (a fake in tests).
    registry : ModelRegistry
        The model store on ``config.state_dir``.
    plans : PlanBook
        The current plans; a request reads them, the planner and the preparation replace them.
    monitor : UplinkMonitor
        The uplink estimate.
    planner : BackgroundPlanner
        Measurements in, re-plans out, on its own thread.
    preparation : ModelPreparation
        Registration and background preparation of models.
    runner : EdgeRunner
        The request pipeline (``classify``).
    views : EdgeViews
        Read-only JSON views (models, strategies, status).
    link_controller : LinkController
        Changes the edge -> cloud link at run time (the admin route).
    device_planner : DevicePlanner
        Three-tier plans for devices (set by :meth:`from_config`; ``edge_api.device``).
    """

    device_planner: DevicePlanner

    def __init__(self, *, config: Any, client: Any, registry: ModelRegistry, plans: PlanBook,
                 monitor: UplinkMonitor, planner: BackgroundPlanner, preparation: ModelPreparation,
                 runner: EdgeRunner, views: EdgeViews, link_controller: LinkController) -> None:
        self.config = config
        self.client = client
        self.registry = registry
        self.plans = plans
        self.monitor = monitor
        self.planner = planner
        self.preparation = preparation
        self.runner = runner
        self.views = views
        self.link_controller = link_controller

    @classmethod
    def from_config(cls, config: Any, *, cloud_client: Any | None = None) -> EdgeNode:
        """Build the edge from its config, plan the stored models and register the default model.

        Parameters
        ----------
        config : EdgeConfig
            Already checked (``edge_api.config``); read attribute by attribute.
        cloud_client : object, optional
            Replaces the :class:`CloudClient` for ``config.cloud_url`` (tests pass a fake).

        Returns
        -------
        EdgeNode
            Built, with no thread started.

        Raises
        ------
        ConfigError
            If the link profiles file is invalid.
        """
        client = cloud_client
        if client is None:
            link = parse_link(config.emulate_link) if config.emulate_link is not None else None
            client = CloudClient(config.cloud_url, token=config.token, link=link)
        caps = {"max_flops": config.max_model_flops, "max_activation_bytes": config.max_activation_bytes}
        registry = ModelRegistry(config.state_dir, n_threads=config.n_threads or 1, max_n_models=config.max_n_models,
                                 max_store_bytes=config.max_store_bytes,
                                 check_stored=lambda files: check_model_cost(files_cost(files), **caps))
        _log.info("edge registry on %s with %d stored models", config.state_dir, len(registry))
        plans = PlanBook(link=_initial_link(config, client), headroom_fraction=config.plan_headroom_fraction,
                         infeasible_accuracy_margin=config.infeasible_accuracy_margin,
                         strategy_hysteresis_accuracy=config.strategy_hysteresis_accuracy)
        monitor = UplinkMonitor(
            client, cloud_url=config.cloud_url, initial_link=plans.link, probe_interval_s=config.probe_interval_s,
            probe_n_bytes=config.probe_n_bytes, window_n=config.uplink_window_n,
            hysteresis_fraction=config.replan_hysteresis_fraction, history_path=config.state_dir / _HISTORY_FILE,
            on_change=lambda link: planner.submit_link(link),  # bound below; called only once samples arrive
            rtt_method=config.rtt_method, timeout_s=config.cloud_timeout_s,
        )
        planner = BackgroundPlanner(plans=plans, monitor=monitor,
                                    initial_offload_overhead_ms=config.initial_offload_overhead_ms,
                                    replan_hysteresis_fraction=config.replan_hysteresis_fraction)
        compute = EdgeCompute(edge_slowdown=config.emulate_edge_slowdown)
        preparation = ModelPreparation(
            registry=registry, plans=plans, client=client, planner=planner, compute=compute,
            wire_dtype=config.wire_dtype, distortion_aware_default=config.distortion_aware_default,
            cloud_speedup=config.cloud_speedup, profile_n_repeats=config.profile_n_repeats,
            cloud_timeout_s=config.cloud_timeout_s, max_strategy_configurations=config.max_strategy_configurations,
            vetting=ModelVetting.from_config(config, scratch_dir=registry.state_dir / "models"),
        )
        runner = EdgeRunner(
            registry=registry, plans=plans, client=client, planner=planner, compute=compute,
            objective=config.objective, default_deadline_ms=config.default_deadline_ms,
            max_image_pixels=config.max_image_pixels, wire_dtype=config.wire_dtype,
            wire_compression=config.wire_compression, distortion_aware_default=config.distortion_aware_default,
            on_cloud_rejected=preparation.request_sync, max_batch_size=config.max_batch_size,
            batch_max_wait_ms=config.batch_max_wait_ms,
            breaker=CircuitBreaker(n_failures=config.breaker_n_failures, open_s=config.breaker_open_s),
        )
        views = EdgeViews(registry=registry, plans=plans, runner=runner, planner=planner, monitor=monitor,
                          client=client, cloud_url=config.cloud_url)
        interface = config.shaping_interface
        link_controller = LinkController(
            profiles=load_link_profiles(), interface=interface, emulator=getattr(client, "link", None),
            dst_ip=resolve_cloud_ipv4(config.cloud_url) if interface is not None else None,
        )
        if getattr(config, "offload_rate_per_s", None) is not None:
            from popex.ratelimit.live import RateLimiter

            runner.rate_limiter = RateLimiter(rate_per_s=config.offload_rate_per_s, depth=config.offload_bucket_depth,
                                              policy=config.offload_policy)
        if getattr(config, "batch_plan", False):
            from popex.edge.batch_plans import BatchExitPlanner

            runner.batch_exits = BatchExitPlanner(
                max_batch_size=max(config.max_batch_size, config.max_batch_images),
                batcher_max_batch_size=config.max_batch_size, batch_max_wait_ms=config.batch_max_wait_ms,
                arrival_rate_per_s=lambda: runner.batcher.arrivals.rate_per_s(runner.batcher.clock()))
        node = cls(config=config, client=client, registry=registry, plans=plans, monitor=monitor, planner=planner,
                   preparation=preparation, runner=runner, views=views, link_controller=link_controller)
        devices = DeviceLinks(initial_link=plans.link, window_n=config.uplink_window_n,
                              hysteresis_fraction=config.replan_hysteresis_fraction)
        node.device_planner = DevicePlanner(plans=plans, devices=devices, headroom_fraction=config.plan_headroom_fraction)
        node._open()
        return node

    def start(self) -> None:
        """Start the background planner and the uplink monitor (daemon threads).

        Raises
        ------
        RuntimeError
            If the node was closed.
        """
        self.planner.start()
        self.monitor.start()
        if self.runner.rate_limiter is not None:
            self.runner.rate_limiter.start()

    def close(self) -> None:
        """Stop the uplink monitor, the planner and the preparation worker; close the cloud client."""
        self.monitor.stop()
        if self.runner.rate_limiter is not None:
            self.runner.rate_limiter.close()
        self.planner.close()
        if self.runner.batch_exits is not None:
            self.runner.batch_exits.close()
        self.preparation.close()
        close = getattr(self.client, "close", None)
        if callable(close):
            close()

    def _open(self) -> None:
        """Plan the stored models, then register the default model directory if there is one."""
        self.preparation.open()
        directory = self.config.default_model_dir
        if directory is not None and directory.is_dir():
            try:
                self.runner.default_model_id = self.preparation.register_directory(str(directory))
            except PopexError as err:  # the edge is still useful for uploaded models
                _log.error("cannot register the default model from %s: %s", directory, err)
