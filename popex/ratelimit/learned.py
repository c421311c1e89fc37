"""The learned policy: fitted Q-iteration in torch (the seed's DQN, without tensorflow).

Input: the current metric and the previous 95 (normalised by the training
split's mean and deviation; zeros before the sequence starts). Output: Q(n, a)
for every token level n and action a in one forward pass, so a sequence is
planned in batches and the simulator only looks the decision up. The network
is an MLP of 5 hidden layers of 64 units with LeakyReLU(0.2), and predicts a
*correction* to the MDP's Q-values (its last layer starts at zero): before
training the policy is exactly the MDP; fitted Q-iteration then learns what
the history adds on correlated (location-reset) sequences. Targets, per
sampled step t and for every (n, a) at once, with the previous network frozen:

    y(n, a) = a R_t - g + gamma max_a' Q(h_{t+1}, min(m, n - p a + q I_t), a')

(R_t the image's actual reward, g the MDP's gain, so the values stay
relative). The network kept is the one with the lowest loss on validation
sequences (drawn from the train split, like the training sequences), the
MDP-initialised one included. Weights are safetensors plus a JSON file;
nothing is pickled.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from popex.errors import ConfigError, DataError
from popex.ratelimit.bucket import BucketParams
from popex.ratelimit.data import MetricData
from popex.ratelimit.mdp import DISCOUNT, solve_mdp, transition_matrix
from popex.ratelimit.metric import KernelTable
from popex.ratelimit.policies import Plan
from popex.ratelimit.sequences import LocationReset, image_sequences

__all__ = ["N_HISTORY", "TrainSchedule", "QNetwork", "LearnedPolicy", "train_learned_policy"]

#: Metrics in the input: the current one and the previous 95.
N_HISTORY = 96
_WEIGHTS, _CONFIG = "policy.safetensors", "policy.json"


@dataclass(frozen=True)
class TrainSchedule:
    """How long fitted Q-iteration runs; :meth:`quick` fits in a couple of minutes on 2 cores."""

    n_rounds: int = 200
    n_steps_per_round: int = 40
    batch_size: int = 1024
    learning_rate: float = 1e-4
    n_train_sequences: int = 8
    seq_len: int = 50_000
    validate_every: int = 10
    n_val_steps: int = 50_000
    seed: int = 0
    #: What a step earns in the targets and the validation: "metric" (E[R | h] of the image) or "reward" (its R).
    targets: str = "metric"
    #: A network replaces the MDP only with a validation gain of at least this many standard errors.
    min_z: float = 2.0

    @classmethod
    def quick(cls) -> TrainSchedule:
        """The short schedule (tests, ``--quick``)."""
        return cls(n_rounds=40, n_steps_per_round=20, batch_size=512, n_train_sequences=4, seq_len=20_000,
                   validate_every=5, n_val_steps=50_000)


class QNetwork(torch.nn.Module):
    """MLP 96 -> 5 x 64 (LeakyReLU 0.2) -> 2 (m + 1): the correction to the MDP's Q(n, a)."""

    def __init__(self, n_levels: int, *, n_hidden: int = 64, n_layers: int = 5) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        width = N_HISTORY
        for _ in range(n_layers):
            layers += [torch.nn.Linear(width, n_hidden), torch.nn.LeakyReLU(0.2)]
            width = n_hidden
        self.body = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(width, 2 * n_levels)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        """(batch, 96) normalised metrics -> (batch, 2 (m + 1)) corrections: [Q(., 0) | Q(., 1)]."""
        return self.head(self.body(window))


def _windows(metric_norm: np.ndarray) -> np.ndarray:
    """(T, 96): row t holds metrics t, t-1, ..., t-95 (zeros before the start)."""
    padded = np.concatenate([np.zeros(N_HISTORY - 1), metric_norm])
    view = np.lib.stride_tricks.sliding_window_view(padded, N_HISTORY)
    return np.ascontiguousarray(view[:, ::-1], dtype=np.float32)


class LearnedPolicy:
    """A trained Q-network for one bucket: ``plan`` decides every step at every level.

    Parameters
    ----------
    network : QNetwork
    params : BucketParams
    base_values : np.ndarray, shape (m + 1,)
        gamma (T V)(k) of the MDP (relative values), the base of the Q-values.
    gain : float
    mean, std : float
        The training metrics' normalisation.
    """

    name = "learned"

    def __init__(self, network: QNetwork, *, params: BucketParams, base_values: np.ndarray, gain: float,
                 mean: float, std: float) -> None:
        self.network, self.params = network.eval(), params
        self.base_values = np.asarray(base_values, dtype=np.float64)
        self.gain, self.mean, self.std = float(gain), float(mean), float(std)

    def q_values(self, metric: np.ndarray, windows: np.ndarray | None = None) -> np.ndarray:
        """(T, 2, m + 1) Q-values (action 1 at levels below p is -inf)."""
        p, m = self.params.p, self.params.m
        metric = np.asarray(metric, dtype=np.float64)
        windows = _windows((metric - self.mean) / self.std) if windows is None else windows
        with torch.no_grad():
            chunks = [self.network(torch.from_numpy(windows[i:i + 8192])).numpy()
                      for i in range(0, len(windows), 8192)]
        correction = np.concatenate(chunks).reshape(len(windows), 2, m + 1).astype(np.float64)
        q = np.empty_like(correction)
        q[:, 0] = self.base_values[None, :] - self.gain
        q[:, 1, :p] = -np.inf
        q[:, 1, p:] = metric[:, None] - self.gain + self.base_values[None, :m + 1 - p]
        q[:, :, :] += np.where(np.isfinite(q), correction, 0.0)
        return q

    def plan(self, metric: np.ndarray) -> Plan:
        """Offload at (t, n) iff Q(n, 1) > Q(n, 0) and the metric is positive.

        An image of metric <= 0 spends a token for no expected reward, and a
        token is never worth less than nothing (V is non-decreasing in the
        level): the action is dominated whatever the history, so it is masked
        rather than left to the network's approximation error.
        """
        metric = np.asarray(metric, dtype=np.float64)
        q = self.q_values(metric)
        return Plan(wants=(q[:, 1] > q[:, 0]) & (metric[:, None] > 0.0))

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write ``policy.safetensors`` and ``policy.json`` into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.network.state_dict().items()}, str(out / _WEIGHTS))
        config = {"bucket": self.params.to_dict(), "base_values": self.base_values.tolist(), "gain": self.gain,
                  "mean": self.mean, "std": self.std, "n_history": N_HISTORY}
        (out / _CONFIG).write_text(json.dumps(config, indent=1))
        return out

    @classmethod
    def load(cls, weights_dir: str | os.PathLike[str], *, params: BucketParams) -> LearnedPolicy:
        """Read a trained policy, which must be for the bucket ``params``.

        Raises
        ------
        ConfigError
            If the files are missing or malformed, or were trained for another bucket.
        """
        folder = Path(weights_dir)
        try:
            config = json.loads((folder / _CONFIG).read_text())
            state = load_file(str(folder / _WEIGHTS))
        except (OSError, ValueError) as err:
            raise ConfigError(f"{folder} holds no learned policy ({_CONFIG} + {_WEIGHTS}, from `popex ratelimit "
                              f"train`): {err}") from err
        if config.get("bucket") != params.to_dict():
            raise ConfigError(f"the learned policy in {folder} was trained for bucket {config.get('bucket')}, not "
                              f"{params.to_dict()}: train one for this rate and depth")
        network = QNetwork(params.m + 1)
        try:
            network.load_state_dict(state)
        except RuntimeError as err:
            raise ConfigError(f"the weights in {folder} do not fit the network: {err}") from err
        return cls(network, params=params, base_values=np.asarray(config["base_values"]), gain=config["gain"],
                   mean=config["mean"], std=config["std"])


class _Validation:
    """Validation sequences of the train split, and the gate a trained network must pass to replace the MDP.

    The candidate's gain over the MDP (its earned value, per image) counts
    only if it exceeds ``z`` standard errors of what the images' actual
    rewards would make of the same decisions: the images where the two
    policies differ, each weighted by how often it is decided differently
    (the sequences repeat the split's images), give
    se = sqrt(sum_i c_i^2 E[R^2 | m_i]) / L (a kernel regression of R^2 on
    the metric: an image whose own R is 0 still stands for the images like
    it, which another split would hold). On a model whose local exit is as
    good as the final one (few images with a positive metric) no network
    passes and the learned policy *is* the MDP; where the history pays, the
    gain is many standard errors.
    """

    def __init__(self, images: np.ndarray, metric: np.ndarray, earned: np.ndarray, reward: np.ndarray,
                 params: BucketParams, reference: LearnedPolicy, z: float) -> None:
        self.images, self.metric, self.earned, self.reward, self.params, self.z = (
            images, metric[images], earned[images], reward, params, z)
        self.variance = np.clip(KernelTable.fit(metric, reward ** 2)(metric), 0.0, None)
        self.reference = self._offloaded(reference)
        self.reference_loss = -float(self.earned[self.reference].sum()) / len(images)

    def _offloaded(self, policy: LearnedPolicy) -> np.ndarray:
        from popex.ratelimit.simulate import run_plan

        return run_plan(policy.plan(self.metric), self.metric, np.ones(len(self.metric), dtype=np.int64),
                        self.params)

    def score(self, policy: LearnedPolicy) -> dict[str, float]:
        """``val_loss`` (earned, lower is better), ``gain`` over the MDP and its ``z`` (gain / standard error)."""
        offloaded = self._offloaded(policy)
        loss = -float(self.earned[offloaded].sum()) / len(self.images)
        differ = offloaded.astype(np.float64) - self.reference
        per_image = np.bincount(self.images, weights=differ, minlength=len(self.reward))
        se = float(np.sqrt(np.sum(per_image ** 2 * self.variance))) / len(self.images)
        gain = self.reference_loss - loss
        return {"val_loss": loss, "gain": gain, "z": gain / se if se > 0 else (np.inf if gain > 0 else 0.0)}


def train_learned_policy(data: MetricData, params: BucketParams, *, schedule: TrainSchedule = TrainSchedule(),
                         location_reset: LocationReset = LocationReset(), discount: float = DISCOUNT,
                         progress: bool = False) -> tuple[LearnedPolicy, list[dict[str, float]]]:
    """Fitted Q-iteration on synthetic location-reset sequences of the train split, periodic arrivals.

    Returns
    -------
    (LearnedPolicy, list of dict)
        The policy with the best validation loss, and the history (round, validation loss: lower is better).
    """
    if len(data.metric_tr) < N_HISTORY:
        raise DataError(f"the train split needs at least {N_HISTORY} images, it has {len(data.metric_tr)}")
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide MLP gains nothing from more threads, and loses much on shared cores
    try:
        return _train(data, params, schedule=schedule, location_reset=location_reset, discount=discount,
                      progress=progress)
    finally:
        torch.set_num_threads(n_threads)


def _train(data: MetricData, params: BucketParams, *, schedule: TrainSchedule, location_reset: LocationReset,
           discount: float, progress: bool) -> tuple[LearnedPolicy, list[dict[str, float]]]:
    torch.manual_seed(schedule.seed)
    rng = np.random.default_rng(schedule.seed)
    solution = solve_mdp(params, data.metric_tr, discount=discount)
    base = discount * (transition_matrix(params, {1: 1.0}) @ solution.values)
    mean, std = float(data.metric_tr.mean()), float(data.metric_tr.std()) or 1.0
    network = QNetwork(params.m + 1)
    policy = LearnedPolicy(network, params=params, base_values=base, gain=solution.gain, mean=mean, std=std)
    images = image_sequences(data.metric_tr, kind="locreset", n_seq=schedule.n_train_sequences,
                             seq_len=schedule.seq_len, rng=rng, location_reset=location_reset)
    metric_seqs = data.metric_tr[images]
    earned = data.metric_tr if schedule.targets == "metric" else data.reward_tr
    reward_seqs = earned[images]
    padded = np.concatenate([np.zeros((len(metric_seqs), N_HISTORY - 1)), (metric_seqs - mean) / std], axis=1)
    padded = padded.astype(np.float32)
    back = np.arange(N_HISTORY)[None, :]
    val_images = image_sequences(data.metric_tr, kind="locreset", n_seq=1, seq_len=schedule.n_val_steps, rng=rng,
                                 location_reset=location_reset)[0]
    validation = _Validation(val_images, data.metric_tr, earned, data.reward_tr, params, policy, schedule.min_z)
    best = validation.score(policy)  # the MDP itself: gain 0
    best_state = {k: v.clone() for k, v in network.state_dict().items()}
    history = [{"round": 0, **best}]
    optimiser = torch.optim.Adam(network.parameters(), lr=schedule.learning_rate)
    p, q, m = params.p, params.q, params.m
    levels = np.arange(m + 1)
    next_level = np.stack([np.minimum(m, levels + q), np.minimum(m, np.maximum(levels - p, 0) + q)])
    rounds = range(1, schedule.n_rounds + 1)
    if progress:
        from tqdm import tqdm

        rounds = tqdm(rounds, desc="fitted Q-iteration", file=sys.stderr)
    for round_index in rounds:
        seq = rng.integers(0, len(metric_seqs), schedule.n_steps_per_round * schedule.batch_size)
        step = rng.integers(0, schedule.seq_len - 1, len(seq))
        now = padded[seq[:, None], step[:, None] + N_HISTORY - 1 - back]
        after = padded[seq[:, None], step[:, None] + N_HISTORY - back]
        x_now, x_after, r_now = metric_seqs[seq, step], metric_seqs[seq, step + 1], reward_seqs[seq, step]
        q_after = policy.q_values(x_after, after)  # frozen: the network as it was before this round
        best_after = q_after.max(axis=1)  # (batch, m + 1): max over a' at every next level
        target = np.empty((len(seq), 2, m + 1))
        target[:, 0] = -solution.gain + discount * best_after[:, next_level[0]]
        target[:, 1] = r_now[:, None] - solution.gain + discount * best_after[:, next_level[1]]
        base_now = policy.q_values(x_now, now) - _correction(policy, now)
        residual = np.where(np.isfinite(base_now), target - base_now, 0.0).reshape(len(seq), -1)
        valid = torch.from_numpy(np.isfinite(base_now).reshape(len(seq), -1).astype(np.float32))
        inputs, targets = torch.from_numpy(now), torch.from_numpy(residual.astype(np.float32))
        network.train()
        for i in range(schedule.n_steps_per_round):
            batch = slice(i * schedule.batch_size, (i + 1) * schedule.batch_size)
            optimiser.zero_grad()
            error = (network(inputs[batch]) - targets[batch]) * valid[batch]
            loss = (error ** 2).sum() / valid[batch].sum()
            loss.backward()
            optimiser.step()
        network.eval()
        if round_index % schedule.validate_every == 0 or round_index == schedule.n_rounds:
            score = validation.score(policy)
            history.append({"round": round_index, **score})
            if score["z"] >= schedule.min_z and score["val_loss"] < best["val_loss"]:
                best, best_state = score, {k: v.clone() for k, v in network.state_dict().items()}
    network.load_state_dict(best_state)
    return LearnedPolicy(network, params=params, base_values=base, gain=solution.gain, mean=mean, std=std), history


def _correction(policy: LearnedPolicy, windows: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = policy.network(torch.from_numpy(windows)).numpy().astype(np.float64)
    return out.reshape(len(windows), 2, policy.params.m + 1)
