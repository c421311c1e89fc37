"""Latency model of DESIGN.md §3: the profile and the link (the reference formulas: :mod:`popex.decision.formulas`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from popex.checks import check_finite
from popex.errors import ConfigError, ProfileError

__all__ = ["Profile", "Link"]

# Tolerance on "sum of exit probabilities <= 1", which are ratios of counts.
_PROB_TOLERANCE = 1e-9


def _float_vector(name: str, value: object, length: int) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ProfileError(f"profile {name!r} must be a list of numbers, got {value!r}") from err
    if array.shape != (length,):
        raise ProfileError(f"profile {name!r} must have length {length}, got shape {array.shape}")
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ProfileError(f"profile {name!r} must be finite and >= 0, got {array.tolist()}")
    array.flags.writeable = False
    return array


def _byte_vector(name: str, value: object, length: int) -> np.ndarray:
    try:
        raw = np.asarray(value)
        as_float = raw.astype(np.float64)
    except (TypeError, ValueError) as err:
        raise ProfileError(f"profile {name!r} must be a list of byte counts, got {value!r}") from err
    if raw.dtype.kind == "b" or raw.shape != (length,):
        raise ProfileError(f"profile {name!r} must be {length} byte counts, got dtype {raw.dtype} "
                           f"and shape {raw.shape}")
    if not np.all(np.isfinite(as_float)) or np.any(as_float < 0) or np.any(as_float != np.round(as_float)):
        raise ProfileError(f"profile {name!r} must be whole numbers >= 0, got {raw.tolist()}")
    array = as_float.astype(np.int64)
    array.flags.writeable = False
    return array


def _non_negative(name: str, value: object) -> float:
    if isinstance(value, bool):
        raise ProfileError(f"profile {name} must be a number, got {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as err:
        raise ProfileError(f"profile {name} must be a number, got {value!r}") from err
    if not math.isfinite(number) or number < 0:
        raise ProfileError(f"profile {name} must be finite and >= 0, got {value!r}")
    return number


def _offload_ms(profile: Profile, link: Link, split: int) -> float:
    """One offload at ``split``, ms: O + transfer + R + the cloud's stages (DESIGN.md §3)."""
    cloud_ms = sum(profile.stage_cloud_ms[i - 1] for i in range(split + 1, profile.n_stages + 1))
    return profile.offload_overhead_ms + link.transfer_ms(float(profile.wire_bytes[split])) + link.rtt_ms + cloud_ms


def _checked_split(profile: Profile, split: object) -> int:
    if isinstance(split, bool) or not isinstance(split, (int, np.integer)):
        raise ConfigError(f"split must be an integer, got {split!r}")
    if not 0 <= split <= profile.n_stages:
        raise ConfigError(f"split must be in 0..{profile.n_stages}, got {split}")
    return int(split)


def _exit_config(
    profile: Profile, exit_probs: object, active: object
) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``(exit_probs, active)`` for all B branches; shared with the graph builder."""
    n_branches = profile.n_branches
    probs = np.asarray(exit_probs, dtype=np.float64)
    flags = np.asarray(active)
    if probs.shape != (n_branches,):
        raise ConfigError(f"exit_probs must have shape ({n_branches},), got {probs.shape}")
    if flags.shape != (n_branches,) or (n_branches and flags.dtype.kind != "b"):
        raise ConfigError(
            f"active must be a boolean array of shape ({n_branches},), got dtype "
            f"{flags.dtype} and shape {flags.shape}"
        )
    if not np.all(np.isfinite(probs)) or np.any(probs < 0) or np.any(probs > 1):
        raise ConfigError(f"exit_probs must lie in [0, 1], got {probs.tolist()}")
    total = float(probs[flags.astype(bool)].sum())
    if total > 1 + _PROB_TOLERANCE:
        raise ConfigError(f"exit probabilities of active branches sum to {total} > 1")
    return probs, flags.astype(bool)


@dataclass(frozen=True, eq=False)
class Profile:
    """Measured timings and tensor sizes of one model on one edge/cloud pair.

    Stages are numbered 1..N in the text and indexed 0..N-1 in the arrays.
    ``eq=False`` because numpy arrays have no single truth value; compare
    :meth:`to_dict` results instead.

    Parameters
    ----------
    stage_names : tuple of str, length N
    stage_edge_ms : np.ndarray, shape (N,)
        Edge time t^e_i of each stage, ms.
    stage_cloud_ms : np.ndarray, shape (N,)
        Cloud time t^c_i of each stage, ms.
    branch_after_stage : tuple of int, length B
        Stage k_b (1-based) after which branch b is attached; 1 <= k_b < N,
        strictly increasing.
    branch_edge_ms : np.ndarray, shape (B,)
        Edge time e_b of each branch, ms.
    split_bytes : np.ndarray, shape (N + 1,), int64
        Bytes α_s crossing the link at split s (α_0: preprocessed input).
    offload_overhead_ms : float
        Per-offload overhead O (serialisation, HTTP, deserialisation), ms.
    edge_fixed_ms : float, default 0
        Edge time every request costs whatever the strategy (receiving and
        decoding the image, preprocessing), ms; added to E[T] and the worst case.
    wire_ratio : float, default 1
        Bytes on the wire per byte of ``split_bytes``, in (0, 2]: below 1 when
        the payload travels compressed (the edge measures it on its offloads).

    Raises
    ------
    ProfileError
        On wrong lengths, negative or non-finite values, or bad branch positions.

    Examples
    --------
    >>> p = Profile(stage_names=("a", "b"), stage_edge_ms=[1.0, 2.0],
    ...             stage_cloud_ms=[0.1, 0.2], branch_after_stage=(1,),
    ...             branch_edge_ms=[0.5], split_bytes=[100, 50, 4],
    ...             offload_overhead_ms=1.0)
    >>> p.n_stages, p.n_branches
    (2, 1)
    """

    stage_names: tuple[str, ...]
    stage_edge_ms: np.ndarray
    stage_cloud_ms: np.ndarray
    branch_after_stage: tuple[int, ...]
    branch_edge_ms: np.ndarray
    split_bytes: np.ndarray
    offload_overhead_ms: float
    edge_fixed_ms: float = 0.0
    wire_ratio: float = 1.0

    def __post_init__(self) -> None:
        names = self.stage_names
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise ProfileError(f"profile stage_names must be a sequence of str, got {names!r}")
        names = tuple(names)
        if not names or not all(isinstance(name, str) for name in names):
            raise ProfileError(f"profile stage_names must be >= 1 strings, got {names!r}")
        n_stages = len(names)
        positions = self.branch_after_stage
        if isinstance(positions, (str, bytes)) or not isinstance(positions, (Sequence, np.ndarray)):
            raise ProfileError(
                f"profile branch_after_stage must be a sequence of int, got {positions!r}"
            )
        positions = tuple(positions)
        for position in positions:
            if isinstance(position, bool) or not isinstance(position, (int, np.integer)):
                raise ProfileError(
                    f"profile branch_after_stage must hold integers, got {positions!r}"
                )
            if not 1 <= position < n_stages:
                raise ProfileError(
                    f"profile branch position {position} is outside 1..{n_stages - 1} "
                    f"(a branch sits after stage k with 1 <= k < N = {n_stages})"
                )
        if any(a >= b for a, b in zip(positions, positions[1:])):
            raise ProfileError(
                f"profile branch_after_stage must be strictly increasing, got {positions!r}"
            )
        n_branches = len(positions)
        object.__setattr__(self, "stage_names", names)
        object.__setattr__(self, "branch_after_stage", tuple(int(k) for k in positions))
        object.__setattr__(
            self, "stage_edge_ms", _float_vector("stage_edge_ms", self.stage_edge_ms, n_stages)
        )
        object.__setattr__(
            self, "stage_cloud_ms", _float_vector("stage_cloud_ms", self.stage_cloud_ms, n_stages)
        )
        object.__setattr__(
            self, "branch_edge_ms", _float_vector("branch_edge_ms", self.branch_edge_ms, n_branches)
        )
        object.__setattr__(
            self, "split_bytes", _byte_vector("split_bytes", self.split_bytes, n_stages + 1)
        )
        object.__setattr__(
            self,
            "offload_overhead_ms",
            _non_negative("offload_overhead_ms", self.offload_overhead_ms),
        )
        object.__setattr__(
            self, "edge_fixed_ms", _non_negative("edge_fixed_ms", self.edge_fixed_ms)
        )
        wire_ratio = self.wire_ratio
        if isinstance(wire_ratio, bool) or not isinstance(wire_ratio, (int, float, np.floating, np.integer)) \
                or not 0 < float(wire_ratio) <= 2:
            raise ProfileError(f"profile wire_ratio must be a number in (0, 2], got {wire_ratio!r}")
        object.__setattr__(self, "wire_ratio", float(wire_ratio))

    @property
    def n_stages(self) -> int:
        """Number of stages N."""
        return len(self.stage_names)

    @property
    def n_branches(self) -> int:
        """Number of side branches B."""
        return len(self.branch_after_stage)

    @property
    def wire_bytes(self) -> np.ndarray:
        """Expected bytes on the wire at each split: ``split_bytes · wire_ratio``, float."""
        return self.split_bytes * self.wire_ratio

    def to_dict(self) -> dict:
        """Return the public JSON form (the CLI prints it).

        Returns
        -------
        dict
            ``{"input_bytes", "offload_overhead_ms", "stages": [{"name",
            "edge_ms", "cloud_ms", "out_bytes"}], "branches": [{"after_stage",
            "edge_ms"}]}``; stage i's ``out_bytes`` is α_i. Plain Python types.
        """
        return {
            "input_bytes": int(self.split_bytes[0]),
            "offload_overhead_ms": float(self.offload_overhead_ms),
            "edge_fixed_ms": float(self.edge_fixed_ms),
            "wire_ratio": float(self.wire_ratio),
            "stages": [
                {
                    "name": name,
                    "edge_ms": float(self.stage_edge_ms[i]),
                    "cloud_ms": float(self.stage_cloud_ms[i]),
                    "out_bytes": int(self.split_bytes[i + 1]),
                }
                for i, name in enumerate(self.stage_names)
            ],
            "branches": [
                {"after_stage": int(k), "edge_ms": float(self.branch_edge_ms[b])}
                for b, k in enumerate(self.branch_after_stage)
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> Profile:
        """Build a profile from :meth:`to_dict` output.

        Parameters
        ----------
        data : Mapping
            The JSON form (see :meth:`to_dict`).

        Returns
        -------
        Profile

        Raises
        ------
        ProfileError
            If a key is missing, a list has the wrong type, or a value is invalid.
        """
        try:
            stages = data["stages"]
            branches = data["branches"]
            if not isinstance(stages, Sequence) or not isinstance(branches, Sequence):
                raise ProfileError("profile 'stages' and 'branches' must be lists")
            return cls(
                stage_names=tuple(stage["name"] for stage in stages),
                stage_edge_ms=[stage["edge_ms"] for stage in stages],
                stage_cloud_ms=[stage["cloud_ms"] for stage in stages],
                branch_after_stage=tuple(branch["after_stage"] for branch in branches),
                branch_edge_ms=[branch["edge_ms"] for branch in branches],
                split_bytes=[data["input_bytes"]] + [stage["out_bytes"] for stage in stages],
                offload_overhead_ms=data["offload_overhead_ms"],
                edge_fixed_ms=data.get("edge_fixed_ms", 0.0),
                wire_ratio=data.get("wire_ratio", 1.0),
            )
        except KeyError as err:
            raise ProfileError(f"profile is missing the key {err.args[0]!r}") from err
        except TypeError as err:
            raise ProfileError(f"profile has a malformed entry: {err}") from err


@dataclass(frozen=True)
class Link:
    """Uplink estimate between edge and cloud.

    Parameters
    ----------
    uplink_mbps : float
        Uplink rate B in Mbit/s, > 0.
    rtt_ms : float
        Round-trip time R in ms, >= 0.

    Raises
    ------
    ConfigError
        On a non-finite or out-of-range value.

    Examples
    --------
    >>> Link(uplink_mbps=10.0, rtt_ms=20.0)
    Link(uplink_mbps=10.0, rtt_ms=20.0)
    """

    uplink_mbps: float
    rtt_ms: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "uplink_mbps", check_finite(self.uplink_mbps, name="link uplink_mbps", low=0.0,
                                                             low_open=True, allow_text=False))
        object.__setattr__(self, "rtt_ms", check_finite(self.rtt_ms, name="link rtt_ms", low=0.0, allow_text=False))

    def transfer_ms(self, n_bytes: float) -> float:
        """Time to push ``n_bytes`` through the uplink, ms: ``8·n/(1000·B)``.

        Parameters
        ----------
        n_bytes : float
            Bytes to send, >= 0 (the caller's; not checked on this hot path).

        Returns
        -------
        float
        """
        return 8.0 * n_bytes / (1000.0 * self.uplink_mbps)
