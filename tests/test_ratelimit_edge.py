"""The live edge under a token bucket: in-process app over the FakeCloud, a clock the test drives."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest import DEFAULT_MODEL_DIR
from edge_api import get_node
from popex.data.images import encode_png
from popex.data.subset import load_fashion_mnist, SHIPPED_SUBSET_ROOT
from popex.errors import ConfigError
from popex.ratelimit.live import RateLimiter


class _Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture(scope="module")
def images() -> list[tuple[bytes, int]]:
    dataset = load_fashion_mnist(SHIPPED_SUBSET_ROOT, split="test")
    return [(encode_png(dataset.images[i]), int(dataset.labels[i])) for i in range(120)]


@pytest.fixture
def config(config):
    return {**config, "offload_rate_per_s": 5.0, "offload_bucket_depth": 2.0}


def test_the_bucket_is_off_by_default(make_app, make_config, tmp_path):
    app = make_app(make_config(tmp_path / "plain"))
    assert get_node(app).runner.rate_limiter is None
    assert app.test_client().get("/api/v1/status").get_json()["rate_limit"] is None


def test_a_bad_rate_or_policy_is_refused_at_the_config(make_config, tmp_path):
    from edge_api.config import EdgeConfig

    for key, value in [("offload_rate_per_s", 0.0), ("offload_bucket_depth", 0.5), ("offload_policy", "greedy")]:
        with pytest.raises(ConfigError, match=key):
            EdgeConfig.from_mapping(make_config(tmp_path / "bad", **{key: value}))


@pytest.mark.parametrize("policy", ["mdp", "baseline"])
def test_offloads_never_exceed_r_t_plus_b_and_every_request_is_answered(app, client, model_actions, images, policy):
    runner = get_node(app).runner
    model_id = runner.default_model_id
    # an offload takes 50 ms (the strategy's worst case); a refused request is answered at its branch
    model_actions.force(model_id, split=2, thresholds=(1.01, 1.01), latency_ms=50.0, worst_latency_ms=50.0)
    clock = _Clock()
    limiter = RateLimiter(rate_per_s=5.0, depth=2.0, policy=policy, clock=clock)
    runner.rate_limiter = limiter
    answers = []
    for i, (png, _) in enumerate(images):
        clock.now_s = i / 15.0  # 15 requests/s against 5 tokens/s: 3x the token rate
        if i == 10:
            limiter.resolve()  # what the limiter's thread does: tables and thresholds for the measured rate
        response = client.post("/api/v1/classify", data=png, content_type="image/png")
        assert response.status_code == 200
        answers.append(response.get_json())
        n_offloads = sum(a["where"] == "cloud" for a in answers)
        assert n_offloads <= 5.0 * clock.now_s + 2.0
    limited = [a for a in answers if a["rate_limited"]]
    assert limited and all(a["where"] == "edge" and not a["fallback"] for a in limited)
    status = client.get("/api/v1/status").get_json()
    assert status["rate_limit"]["n_granted"] == sum(a["where"] == "cloud" for a in answers)
    assert status["rate_limit"]["n_refused"] == len(limited)
    assert status["requests"]["n_rate_limited"] == len(limited)
    assert status["rate_limit"]["policy"] == policy
    assert status["rate_limit"]["tokens_per_arrival"] == pytest.approx(5.0 / 15.0, rel=0.05)
    assert model_id in status["rate_limit"]["thresholds_ready"]
    # the Decision Maker's prediction, corrected for the offloads the bucket is expected to refuse
    (expected,) = [e for e in status["rate_limit"]["expected"] if e["model_id"] == model_id]
    refused = expected["expected_refused_fraction"]
    assert 0.6 <= refused <= 1.0  # 3x the token rate: at least two in three refused
    after = answers[10:]  # once the thresholds were solved
    assert abs(sum(a["rate_limited"] for a in after) / len(after) - refused) < 0.15
    corrected = expected["strategy"]
    assert corrected["accuracy_without_bucket"] == 0.5 and corrected["offload_prob"] == pytest.approx(1.0 - refused)
    assert corrected["accuracy"] == pytest.approx(
        0.5 - refused * (expected["accuracy_offloaded"] - expected["accuracy_refused"]))
    # ... and its latency: the refused share pays only the edge part (stages 1-2, both branches), not 50 ms
    profile = runner.plans.get(model_id).profile
    local_ms = profile.edge_fixed_ms + float(np.sum(profile.stage_edge_ms[:2]) + np.sum(profile.branch_edge_ms))
    assert local_ms < 50.0 and corrected["latency_ms_without_bucket"] == 50.0
    assert corrected["latency_ms"] == pytest.approx(50.0 - refused * (50.0 - local_ms))
    assert corrected["latency_ms"] < 50.0 - 0.6 * (50.0 - local_ms)


def test_the_limiter_maps_its_level_onto_the_mdp_thresholds():
    clock = _Clock()
    limiter = RateLimiter(rate_per_s=1.0, depth=3.0, clock=clock)
    assert (limiter.params.q, limiter.params.p, limiter.params.m) == (1, 100, 300)
    assert [limiter.consult("m", None, None, 0.0).granted for _ in range(4)] == [True, True, True, False]
    clock.now_s = 1.0  # one second refills one token
    assert limiter.consult("m", None, None, 0.0).granted and not limiter.consult("m", None, None, 0.0).granted
    assert np.isinf(limiter.metric("m", None, 0.5))


@pytest.mark.slow
def test_with_a_real_choice_per_image_the_mdp_collects_more_expected_reward_than_the_baseline(app, client,
                                                                                             model_actions):
    """An early split with a branch: confident images exit there, the rest ask the bucket; one stream, both policies.

    1,000 test images at 18 requests/s; about a third reach the bucket (branch 0 below 0.9), ~6/s against
    2 tokens/s: 3x the token rate where it binds. The cloud half is the FakeCloud running the rest of the
    network for real, so an offload's answer is the final exit's, a refused one branch 0's.

    What the MDP maximises is the expected reward of the images it offloads, sum of E[R | confidence]:
    that is asserted >= the baseline's on the same stream. The accuracy itself is a noisy sample of it:
    per image R is -1, 0 or 1, and the two policies decide only some tens of images differently, so the
    accuracy is asserted within two standard errors of those images (|R| <= 1: se <= sqrt(n_diff) / n).
    The simulator on this model's calibration puts the MDP's edge at +0.1 points (std 0.2 over
    3,000-image streams): docs/ratelimit.md.
    """
    dataset = load_fashion_mnist(SHIPPED_SUBSET_ROOT, split="test")
    runner = get_node(app).runner
    model_actions.force(runner.default_model_id, split=2, thresholds=(0.9, None))
    pngs = [encode_png(image) for image in dataset.images]
    accuracy, offloads, gain, decided = {}, {}, {}, {}
    for policy in ("mdp", "baseline"):
        clock = _Clock()
        runner.rate_limiter = limiter = RateLimiter(rate_per_s=2.0, depth=2.0, policy=policy, clock=clock)
        consults, decisions = [], {}
        real_consult = limiter.consult
        limiter.consult = lambda *args, **kwargs: consults.append(real_consult(*args, **kwargs)) or consults[-1]
        answers = []
        for i, png in enumerate(pngs):
            clock.now_s = i / 18.0
            if i % 50 == 10:
                limiter.resolve()  # the limiter thread's work, at fixed points of the stream for both policies
            n_before = len(consults)
            response = client.post("/api/v1/classify", data=png, content_type="image/png")
            assert response.status_code == 200
            answers.append(response.get_json())
            if len(consults) > n_before:
                decisions[i] = consults[-1]
            assert sum(a["where"] == "cloud" for a in answers) <= 2.0 * clock.now_s + 2.0
        status = client.get("/api/v1/status").get_json()["rate_limit"]
        assert status["n_granted"] + status["n_refused"] == len(decisions)
        assert 0.2 * len(pngs) < len(decisions) < 0.5 * len(pngs)  # the branch answered the rest locally
        assert status["n_refused"] > status["n_granted"] > 0
        accuracy[policy] = float(np.mean([a["label"] == int(y) for a, y in zip(answers, dataset.labels)]))
        offloads[policy] = status["n_granted"]
        solved = {i: d for i, d in decisions.items() if i > 10}  # once both had thresholds
        gain[policy] = sum(d.metric for d in solved.values() if d.granted and np.isfinite(d.metric))
        decided[policy] = {i for i, d in solved.items() if d.granted}
    assert decisions.keys() and all(np.isfinite(d.metric) for i, d in decisions.items() if i > 10)
    n_diff = len(decided["mdp"] ^ decided["baseline"])
    se = np.sqrt(n_diff) / len(pngs)
    print(f"accuracy {accuracy}, offloads {offloads}, expected reward {gain}, decided differently {n_diff}")
    assert gain["mdp"] >= gain["baseline"], (gain, offloads)
    assert accuracy["mdp"] >= accuracy["baseline"] - 2.0 * se, (accuracy, offloads, n_diff)


def test_the_limiter_thread_re_solves_when_the_arrival_rate_moves(app, client, model_actions, images):
    runner = get_node(app).runner
    model_actions.force(runner.default_model_id, split=2, thresholds=(1.01, 1.01))
    clock = _Clock()
    runner.rate_limiter = limiter = RateLimiter(rate_per_s=5.0, depth=2.0, clock=clock)
    limiter.start()  # the real thread: woken by the requests, never called by the test
    try:
        def stream(pngs, rate_per_s, start_s):
            for i, (png, _) in enumerate(pngs):
                clock.now_s = start_s + i / rate_per_s
                assert client.post("/api/v1/classify", data=png, content_type="image/png").status_code == 200
            return clock.now_s

        def solved_for() -> float | None:
            expected = client.get("/api/v1/status").get_json()["rate_limit"]["expected"]
            return expected[0]["solved_for_tokens_per_arrival"] if expected else None

        end_s = stream(images[:60], 15.0, 0.0)
        for _ in range(100):  # the thread fits the tables and solves on its own
            if solved_for() is not None and abs(solved_for() - 5.0 / 15.0) < 0.05:
                break
            end_s = stream(images[:1], 15.0, end_s + 1 / 15.0)
        assert solved_for() == pytest.approx(5.0 / 15.0, rel=0.15)
        stream(images, 5.0, end_s + 0.2)  # the arrivals slow to 5/s: one token per arrival
        for _ in range(100):
            if abs(solved_for() - 1.0) < 0.1:
                break
            threading.Event().wait(0.05)
        assert solved_for() == pytest.approx(1.0, rel=0.15)
    finally:
        limiter.close()


@pytest.mark.parametrize("policy", ["mdp", "baseline"])
def test_a_strategy_without_branches_is_predicted_to_take_every_token_it_finds(policy):
    """Cloud-only requests have no metric (+inf: any token will do); the prediction must say so, not 'all refused'."""
    from popex.decision.calibration import load_calibration

    calibration = load_calibration(DEFAULT_MODEL_DIR / "calibration.npz")
    clock = _Clock()
    limiter = RateLimiter(rate_per_s=4.0, depth=2.0, policy=policy, clock=clock)
    n_granted = 0
    for i in range(600):
        clock.now_s = i / 12.0  # 3x the token rate
        if i == 30:
            limiter.resolve()
        n_granted += limiter.consult("m", calibration, None, 0.0).granted
    (expected,) = limiter.status()["expected"]
    assert n_granted <= 4.0 * clock.now_s + 2.0
    assert expected["expected_refused_fraction"] == pytest.approx(1.0 - n_granted / 600, abs=0.02)
