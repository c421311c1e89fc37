"""Shared fixtures: the tokens, one whole edge config, the edge app over a FakeCloud, and model actions.

Every test edge has an admin token (``ADMIN_TOKEN``), and every test client
of a test edge app (``app.test_client()``, the ``client`` fixture) sends it,
as an operator's tools would: tests that register models need nothing more.
A test of refusals takes :func:`anonymous_client` (no token at all) or sends
its own ``Authorization`` header, which wins over the default one.

The config is the whole config (``EdgeConfig.from_mapping``): neither
``configs/edge.yaml`` nor the environment (``POPEX_EDGE_CONFIG``,
``POPEX_TOKEN``, ...) can change a test's outcome. A test module that needs
another config or cloud overrides the fixture by name, e.g.::

    @pytest.fixture
    def config(config):
        return {**config, "default_model_dir": None}

    @pytest.fixture
    def fake_cloud(tmp_path):
        return FakeCloud(state_dir=tmp_path / "cloud")  # the cloud's half for real

Everything that reaches inside the edge app (past ``create_app``,
``close_app`` and the HTTP routes) is in :func:`_edge_internals` and
:meth:`ModelActions.force`, so a change of the app's internals is adapted
here once.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flask.testing import FlaskClient

from edge_api import close_app, create_app, get_node
from edge_api.config import EdgeConfig
from popex.edge.fake_cloud import FakeCloud
from popex.edge.plans import Strategy
from popex.nets import EarlyExitNet, compute_model_id, weights_to_bytes, zoo_spec

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO / "models" / "b-alexnet"
TEST_TOKEN = "test-token-0123456789"
ADMIN_TOKEN = "test-admin-token-0123456789"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
READY_TIMEOUT_S = 120.0  # the longest a test waits for a model's preparation (two busy cores)
_CLASSIFIER_DIR = "distortion-classifier"


def _edge_internals(app: Any) -> tuple[Any, Any]:
    """(preparation service, request runner) of an edge app: the one place tests reach inside it."""
    node = get_node(app)
    return node.preparation, node.runner


class ModelActions:
    """Repeated request sequences on one edge app: register a model, wait for it, force its strategy.

    Waits are bounded (``READY_TIMEOUT_S``) and wait on the preparation
    itself, never on wall-clock guesses.
    """

    def __init__(self, app: Any, client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self._app = app
        self._client = client
        self._monkeypatch = monkeypatch

    def register(self, files: Mapping[str, bytes | None]) -> Any:
        """POST ``files`` (field name -> bytes; None leaves the field out) to /api/v1/models."""
        data = {name: (io.BytesIO(content), f"{name}.bin") for name, content in files.items() if content is not None}
        return self._client.post("/api/v1/models", data=data, content_type="multipart/form-data")

    def register_directory(self, directory: str | Path) -> Any:
        """POST every model file of ``directory`` to /api/v1/models."""
        return self.register(model_dir_files(directory))

    def wait_idle(self, timeout_s: float = READY_TIMEOUT_S) -> bool:
        """Wait until no preparation is queued or running; False if ``timeout_s`` passed first."""
        service, _ = _edge_internals(self._app)
        return service.wait_idle(timeout_s)

    def wait_ready(self, model_id: str, timeout_s: float = READY_TIMEOUT_S) -> dict[str, Any]:
        """Wait for the preparation, then return the model's view, which must say "ready"."""
        assert self.wait_idle(timeout_s), f"model {model_id} still being prepared after {timeout_s} s"
        info = self._client.get(f"/api/v1/models/{model_id}").get_json()
        assert info["state"] == "ready", info
        return info

    def add(self, files: Mapping[str, bytes | None]) -> str:
        """Register ``files``, wait until the model is ready, return its id."""
        response = self.register(files)
        assert response.status_code in (200, 202), response.get_json()
        model_id = response.get_json()["model_id"]
        self.wait_ready(model_id)
        return model_id

    def force(self, model_id: str, *, split: int, thresholds: tuple[float | None, ...] | None = None,
              latency_ms: float = 5.0, worst_latency_ms: float | None = None, accuracy: float = 0.5,
              offload_prob: float = 1.0, profile: Any | None = None) -> Strategy:
        """Make the model's plan answer one strategy, whatever the request (undone at teardown).

        ``thresholds`` default to every branch off; a branch is active when it
        has a threshold and sits at or before ``split``. ``profile`` replaces
        the plan's profile first (e.g. to make the rest of the network slow).
        """
        _, runner = _edge_internals(self._app)
        return force_strategy(self._monkeypatch, runner.plans.get(model_id),
                              runner.registry.get(model_id).loaded.net.branch_after_stage, split=split,
                              thresholds=thresholds, latency_ms=latency_ms, worst_latency_ms=worst_latency_ms,
                              accuracy=accuracy, offload_prob=offload_prob, profile=profile)


def edge_config(token: str, state_dir: str | Path, **changes: Any) -> dict[str, Any]:
    """A whole edge config mapping: the admin token, no background thread, quick profiles, an unreachable cloud."""
    return {"token": token, "admin_token": ADMIN_TOKEN, "state_dir": str(state_dir),
            "default_model_dir": str(DEFAULT_MODEL_DIR), "start_background": False, "profile_n_repeats": 2,
            "cloud_url": "http://127.0.0.1:9", **changes}


class AdminClient(FlaskClient):
    """A Flask test client that sends the admin token unless a request sends its own ``Authorization``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.environ_base["HTTP_AUTHORIZATION"] = ADMIN_HEADERS["Authorization"]


def anonymous_client(app: Any) -> FlaskClient:
    """A test client of ``app`` that sends no token at all (what anyone on the network can do)."""
    return FlaskClient(app, app.response_class, use_cookies=True)


@contextlib.contextmanager
def running_edge(config: Mapping[str, Any], cloud: Any) -> Iterator[Any]:
    """The edge app of the whole ``config`` (no YAML, no environment) over ``cloud``, closed on exit; its test
    clients carry the admin token (:class:`AdminClient`)."""
    app = create_app(EdgeConfig.from_mapping(config), cloud_client=cloud)
    app.test_client_class = AdminClient
    try:
        yield app
    finally:
        close_app(app)


def calibration_bytes(n_exits: int = 2, n_samples: int = 200, seed: int = 0, n_classes: int = 10) -> bytes:
    """A random calibration.npz in the layout ``save_calibration`` writes (temperatures 1)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n_samples)
    predicted = rng.integers(0, n_classes, (n_samples, n_exits))
    buffer = io.BytesIO()
    np.savez(buffer, confidence=rng.random((n_samples, n_exits)), predicted=predicted,
             correct=predicted == labels[:, None], labels=labels, temperature=np.ones(n_exits),
             confidence_method=np.array("max_softmax"))
    return buffer.getvalue()


def model_dir_files(directory: str | Path) -> dict[str, bytes]:
    """The multipart fields of a model directory (the layout ``popex train-experts`` writes)."""
    directory = Path(directory)
    files = {"spec": directory / "spec.json", "weights": directory / "weights.safetensors",
             "calibration": directory / "calibration.npz",
             "classifier_spec": directory / _CLASSIFIER_DIR / "spec.json",
             "classifier_weights": directory / _CLASSIFIER_DIR / "weights.safetensors"}
    files.update({path.stem: path for path in directory.glob("calibration_*.npz")})
    return {name: path.read_bytes() for name, path in files.items() if path.is_file()}


def force_strategy(monkeypatch: pytest.MonkeyPatch, plan: Any, branch_after_stage: tuple[int, ...], *, split: int,
                   thresholds: tuple[float | None, ...] | None = None, latency_ms: float = 5.0,
                   worst_latency_ms: float | None = None, accuracy: float = 0.5, offload_prob: float = 1.0,
                   profile: Any | None = None) -> Strategy:
    """Make ``plan`` (a ModelPlan) answer one strategy for every deadline, objective, policy and head."""
    thresholds = tuple([None] * len(branch_after_stage) if thresholds is None else thresholds)
    if profile is not None:
        plan.set_profile(profile)
    active = tuple(b for b, t in enumerate(thresholds) if t is not None and branch_after_stage[b] <= split)
    strategy = Strategy(split=split, thresholds=thresholds, active_branches=active, latency_ms=latency_ms,
                        worst_latency_ms=latency_ms if worst_latency_ms is None else worst_latency_ms,
                        accuracy=accuracy, offload_prob=offload_prob, feasible=True, row=0, objective="mean",
                        deadline_ms=0.0)
    monkeypatch.setattr(plan, "strategy", lambda *args, **kwargs: strategy)
    return strategy


@pytest.fixture(scope="session")
def token() -> str:
    """The shared secret of every test edge and cloud."""
    return TEST_TOKEN


@pytest.fixture(scope="session")
def admin_token() -> str:
    """The admin token of every test edge (its writes need it)."""
    return ADMIN_TOKEN


@pytest.fixture
def config(tmp_path: Path, token: str) -> dict[str, Any]:
    """A whole edge config (no YAML, no environment): a temp state dir, no background thread, quick profiles."""
    return edge_config(token, tmp_path / "edge")


@pytest.fixture
def fake_cloud() -> FakeCloud:
    """A scripted in-process cloud (every offload answers label 4)."""
    return FakeCloud()


@pytest.fixture
def make_app(fake_cloud: FakeCloud) -> Iterator[Callable[..., Any]]:
    """Build edge apps from a config mapping (over ``fake_cloud`` unless given another); all closed at teardown."""
    with contextlib.ExitStack() as stack:
        yield lambda config, *, cloud=None: stack.enter_context(
            running_edge(config, fake_cloud if cloud is None else cloud))


@pytest.fixture
def app(make_app: Callable[..., Any], config: dict[str, Any]) -> Any:
    """The edge app of ``config`` over ``fake_cloud``."""
    return make_app(config)


@pytest.fixture
def client(app: Any) -> Any:
    """The edge app's Flask test client."""
    return app.test_client()


@pytest.fixture
def model_actions(app: Any, client: Any, monkeypatch: pytest.MonkeyPatch) -> ModelActions:
    """Register / wait / force on ``app`` through ``client``."""
    return ModelActions(app, client, monkeypatch)


@pytest.fixture
def force_plan(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Strategy]:
    """``force_plan(plan, branch_after_stage, split=..., ...)``: :func:`force_strategy`, undone at teardown."""
    return functools.partial(force_strategy, monkeypatch)


@pytest.fixture(scope="session")
def make_config(token: str) -> Callable[..., dict[str, Any]]:
    """``make_config(state_dir, **changes)``: the whole config of :func:`config` for any state dir (any scope)."""
    return functools.partial(edge_config, token)


@pytest.fixture(scope="session")
def open_edge() -> Callable[..., Any]:
    """``with open_edge(config, cloud) as app``: an edge app for module-scoped fixtures."""
    return running_edge


@pytest.fixture(scope="session")
def edge_internals() -> Callable[[Any], tuple[Any, Any]]:
    """``edge_internals(app)`` -> (preparation service, request runner), for tests of what the routes hide."""
    return _edge_internals


@pytest.fixture(scope="session")
def make_calibration() -> Callable[..., bytes]:
    """``make_calibration(n_exits=2, n_samples=200, seed=0, n_classes=10)`` -> calibration.npz bytes."""
    return calibration_bytes


@pytest.fixture(scope="session")
def lenet_files() -> dict[str, Any]:
    """An untrained b-lenet (seed 0): ``files`` (upload fields -> bytes, random calibration) and ``model_id``."""
    torch.manual_seed(0)
    spec = zoo_spec("b-lenet")
    net = EarlyExitNet(spec)
    weights_bytes = weights_to_bytes(net)
    files = {"spec": json.dumps(spec).encode(), "weights": weights_bytes,
             "calibration": calibration_bytes(n_exits=net.n_exits)}
    return {"files": files, "model_id": compute_model_id(spec, weights_bytes)}


def shipped_test_calibration(model: Any, model_dir: Path) -> Any:
    """Confidence and correctness of every exit of a shipped model on the available test set (full, or the
    shipped subset), at the temperatures of its calibration.npz: what its card's test figures are made of."""
    from popex.data import default_test_set
    from popex.data.preprocess import Preprocessing, preprocess
    from popex.decision import load_calibration
    from popex.nets.train import calibrate

    test = default_test_set().dataset
    inputs = preprocess(test.images, Preprocessing.from_spec_dict(model.spec), is_batch=True)
    temperature = load_calibration(model_dir / "calibration.npz").temperature
    return calibrate(model.net, inputs, test.labels, temperature=temperature)
