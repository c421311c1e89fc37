"""The offloading metric: how much an image is expected to gain from the remote classifier.

From the local (weak) exit's outputs only, as in the rate-limit seed: a cost
of each answer (``top1``: rank of the true class > 1; ``top5``: rank > 5;
``rank10``: min(rank, 10)), the reward R = local cost - remote cost (may be
negative), the local logits calibrated with one inverse temperature, the
entropy h of that softmax, and m(x) = E[R | h] by a Gaussian-kernel
(Nadaraya-Watson) regression of R on h, tabulated over 1,000 bins. The
bandwidth is chosen from {2^-8 .. 2^-4} x range(h) by fitting on the even
samples and validating on the odd ones; the table is then refitted on all.

The feature is pluggable (:class:`KernelTable` regresses R on any scalar):
the live edge regresses on the local exit's calibrated confidence, which is
what a running edge has for every request (the live edge).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from popex.errors import DataError

__all__ = ["COSTS", "N_BINS", "BANDWIDTH_FRACTIONS", "KernelTable", "OffloadMetric", "true_class_rank",
           "answer_cost", "softmax_entropy", "fit_inverse_temperature"]

COSTS = ("top1", "top5", "rank10")
#: Bins of the tabulated regression.
N_BINS = 1000
#: Candidate bandwidths as fractions of the feature's range.
BANDWIDTH_FRACTIONS = tuple(2.0 ** -k for k in (8, 7, 6, 5, 4))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def true_class_rank(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """1-based rank of the true class in each row of ``logits`` (ties count against the answer).

    >>> true_class_rank(np.array([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3]]), np.array([1, 1]))
    array([1, 3])
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    true_logit = logits[np.arange(len(labels)), labels]
    return 1 + (logits > true_logit[:, None]).sum(axis=1)


def answer_cost(rank: np.ndarray, cost: str) -> np.ndarray:
    """The cost of an answer whose true class has ``rank``: see the module docstring.

    >>> answer_cost(np.array([1, 3, 12]), "rank10").tolist()
    [1.0, 3.0, 10.0]
    """
    rank = np.asarray(rank)
    if cost == "top1":
        return (rank > 1).astype(np.float64)
    if cost == "top5":
        return (rank > 5).astype(np.float64)
    if cost == "rank10":
        return np.minimum(rank, 10).astype(np.float64)
    raise DataError(f"cost must be one of {list(COSTS)}, got {cost!r}")


def fit_inverse_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The inverse temperature beta minimising the cross-entropy of softmax(beta * logits).

    The one-dimensional search is :func:`popex.runtime.calibrate.fit_temperature`'s (beta = 1/T).
    """
    from popex.runtime.calibrate import fit_temperature

    return 1.0 / fit_temperature(logits, labels)


def softmax_entropy(logits: np.ndarray, inverse_temperature: float = 1.0) -> np.ndarray:
    """Entropy (nats) of softmax(beta * logits) per row.

    >>> round(float(softmax_entropy(np.zeros((1, 4)))[0]), 4)  # uniform: log 4
    1.3863
    """
    log_p = _log_softmax(np.asarray(logits, dtype=np.float64) * float(inverse_temperature))
    return -(np.exp(log_p) * log_p).sum(axis=1)


def _binned(feature: np.ndarray, reward: np.ndarray, low: float, width: float,
            n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    index = np.clip(((feature - low) / width).astype(np.int64), 0, n_bins - 1)
    return (np.bincount(index, weights=reward, minlength=n_bins),
            np.bincount(index, minlength=n_bins).astype(np.float64))


def _smooth(sums: np.ndarray, counts: np.ndarray, centres: np.ndarray, bandwidth: float,
            fallback: float) -> np.ndarray:
    weights = np.exp(-0.5 * ((centres[:, None] - centres[None, :]) / bandwidth) ** 2)
    numerator, denominator = weights @ sums, weights @ counts
    with np.errstate(invalid="ignore", divide="ignore"):
        values = numerator / denominator
    return np.where(denominator > 1e-300, values, fallback)


@dataclass(frozen=True, eq=False)
class KernelTable:
    """E[R | feature] tabulated over ``N_BINS`` equal bins of [low, high].

    Attributes
    ----------
    low, high : float
        The fitted feature range; values outside are clipped into it.
    values : np.ndarray, shape (n_bins,)
        The regression at each bin's centre.
    bandwidth : float
        The chosen kernel bandwidth, in feature units.
    """

    low: float
    high: float
    values: np.ndarray
    bandwidth: float

    @classmethod
    def fit(cls, feature: np.ndarray, reward: np.ndarray, *, n_bins: int = N_BINS) -> KernelTable:
        """Fit on ``feature``/``reward`` (1-D, same length, >= 2 samples); bandwidth by even/odd validation.

        Raises
        ------
        DataError
            If the arrays are too short, of different lengths, or not finite.
        """
        feature = np.asarray(feature, dtype=np.float64)
        reward = np.asarray(reward, dtype=np.float64)
        if feature.ndim != 1 or feature.shape != reward.shape or len(feature) < 2:
            raise DataError(f"feature and reward must be 1-D of one length >= 2, got {feature.shape} and "
                            f"{reward.shape}")
        if not (np.all(np.isfinite(feature)) and np.all(np.isfinite(reward))):
            raise DataError("feature and reward must be finite")
        low, high = float(feature.min()), float(feature.max())
        if high <= low:
            high = low + 1.0  # a constant feature: one flat table
        width = (high - low) / n_bins
        centres = low + width * (np.arange(n_bins) + 0.5)
        even_sums, even_counts = _binned(feature[0::2], reward[0::2], low, width, n_bins)
        odd_index = np.clip(((feature[1::2] - low) / width).astype(np.int64), 0, n_bins - 1)
        best = None
        for fraction in BANDWIDTH_FRACTIONS:
            bandwidth = fraction * (high - low)
            table = _smooth(even_sums, even_counts, centres, bandwidth, float(reward[0::2].mean()))
            error = float(np.mean((table[odd_index] - reward[1::2]) ** 2))
            if best is None or error < best[0]:
                best = (error, bandwidth)
        sums, counts = _binned(feature, reward, low, width, n_bins)
        values = _smooth(sums, counts, centres, best[1], float(reward.mean()))
        values.flags.writeable = False
        return cls(low=low, high=high, values=values, bandwidth=best[1])

    def __call__(self, feature: np.ndarray | float) -> np.ndarray:
        """E[R | feature], looked up in the table (no interpolation: the bins are fine)."""
        n_bins = len(self.values)
        position = (np.asarray(feature, dtype=np.float64) - self.low) / (self.high - self.low) * n_bins
        return self.values[np.clip(position.astype(np.int64), 0, n_bins - 1)]


@dataclass(frozen=True, eq=False)
class OffloadMetric:
    """The seed's metric: entropy of the calibrated local softmax, mapped through a :class:`KernelTable`.

    Attributes
    ----------
    inverse_temperature : float
    table : KernelTable
    """

    inverse_temperature: float
    table: KernelTable

    @classmethod
    def fit(cls, local_logits: np.ndarray, reward: np.ndarray, labels: np.ndarray) -> OffloadMetric:
        """Calibrate on (``local_logits``, ``labels``), then regress ``reward`` on the entropy."""
        beta = fit_inverse_temperature(local_logits, labels)
        return cls(inverse_temperature=beta, table=KernelTable.fit(softmax_entropy(local_logits, beta), reward))

    def __call__(self, local_logits: np.ndarray) -> np.ndarray:
        """m(x) per row of ``local_logits`` (n_samples, n_classes)."""
        return self.table(softmax_entropy(local_logits, self.inverse_temperature))
