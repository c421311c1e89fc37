"""Link profiles: named (uplink rate, RTT) pairs from ``configs/links.yaml``.

A profile is what the experiments shape the edge -> cloud link to (Docker:
tc netem; this machine: the network-namespace harness). The numbers are
checked here once, so that every consumer (the shaping helpers, the shell
script docker/apply_link.sh through ``python -m popex.link.profiles``)
can trust them.

A service reads the file once, when it is built, and passes the read-only
mapping :func:`load_link_profiles` returns down to whatever needs a profile
(:func:`find_link_profile` looks one up by a name from a request); nothing
below the factory opens the file per request.

Run as a module it prints one profile for shell scripts::

    python -m popex.link.profiles wifi        # -> "18.8 10"
    python -m popex.link.profiles --list
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from popex.errors import ConfigError

__all__ = [
    "DEFAULT_LINKS_PATH",
    "MIN_UPLINK_MBPS",
    "MAX_UPLINK_MBPS",
    "MAX_RTT_MS",
    "LinkProfile",
    "LinkProfiles",
    "find_link_profile",
    "load_link_profiles",
    "format_number",
    "main",
]

DEFAULT_LINKS_PATH = Path(__file__).resolve().parents[2] / "configs" / "links.yaml"
# Below 10 kbit/s tc's rate tables lose precision and one 1500-byte packet
# takes over a second; above 100 Gbit/s nothing on a CPU edge can send.
MIN_UPLINK_MBPS = 0.01
MAX_UPLINK_MBPS = 100_000.0
# A minute of RTT is already far beyond any real path (geostationary ~600 ms).
MAX_RTT_MS = 60_000.0
_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
_KEYS = {"uplink_mbps", "rtt_ms", "source"}
_REQUIRED_KEYS = {"uplink_mbps", "rtt_ms"}


def _check_number(where: str, name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: {name} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{where}: {name} must be in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"link profiles file {str(path)!r} does not exist") from err
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read link profiles file {str(path)!r}: {err}") from err


def _profile_from_entry(path: Path, name: Any, entry: Any) -> LinkProfile:
    where = f"{str(path)!r}, profile {name!r}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a mapping with keys uplink_mbps and rtt_ms, got {entry!r}")
    unknown = sorted(map(str, set(entry) - _KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known keys: {sorted(_KEYS)}")
    missing = sorted(_REQUIRED_KEYS - set(entry))
    if missing:
        raise ConfigError(f"{where}: missing keys {missing}")
    try:
        return LinkProfile(name=name, uplink_mbps=entry["uplink_mbps"], rtt_ms=entry["rtt_ms"],
                           source=entry.get("source") or "")
    except ConfigError as err:
        raise ConfigError(f"in {str(path)!r}: {err}") from err


@dataclass(frozen=True)
class LinkProfile:
    """One emulated uplink.

    Attributes
    ----------
    name : str
        Profile name: lowercase letters, digits and "-", at most 32 characters.
    uplink_mbps : float
        Edge -> cloud rate in Mbit/s (10^6 bit/s), in [0.01, 100000].
    rtt_ms : float
        Round-trip time in ms, in [0, 60000].
    source : str
        Where the numbers come from (one line); may be empty.

    Raises
    ------
    ConfigError
        On a bad name, a non-finite number or a value out of range.

    Examples
    --------
    >>> LinkProfile("lte", 5.85, 50)
    LinkProfile(name='lte', uplink_mbps=5.85, rtt_ms=50.0, source='')
    """

    name: str
    uplink_mbps: float
    rtt_ms: float
    source: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_PATTERN.fullmatch(self.name):
            raise ConfigError(f"link profile name must match {_NAME_PATTERN.pattern} "
                              f"(lowercase letters, digits, '-'), got {self.name!r}")
        where = f"link profile {self.name!r}"
        object.__setattr__(self, "uplink_mbps",
                           _check_number(where, "uplink_mbps", self.uplink_mbps, MIN_UPLINK_MBPS, MAX_UPLINK_MBPS))
        object.__setattr__(self, "rtt_ms", _check_number(where, "rtt_ms", self.rtt_ms, 0.0, MAX_RTT_MS))
        if not isinstance(self.source, str) or "\n" in self.source:
            raise ConfigError(f"{where}: source must be one line of text, got {self.source!r}")


def format_number(value: float) -> str:
    """Format a rate or an RTT with at most 3 decimals and no exponent (for shell scripts and tc).

    Parameters
    ----------
    value : float
        A finite, non-negative number.

    Returns
    -------
    str

    Examples
    --------
    >>> format_number(93.6), format_number(10.0), format_number(5.8504)
    ('93.6', '10', '5.85')
    """
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return text or "0"


#: Profiles by name, in file order, read-only (what :func:`load_link_profiles` returns).
LinkProfiles = Mapping[str, LinkProfile]


def find_link_profile(profiles: LinkProfiles, name: object) -> LinkProfile:
    """The profile called ``name``.

    Parameters
    ----------
    profiles : mapping of str to LinkProfile
        As read once by :func:`load_link_profiles`.
    name : object
        A profile name, as it arrived (from a request, a command line).

    Returns
    -------
    LinkProfile

    Raises
    ------
    ConfigError
        If ``name`` is not a string or not a known profile; the message lists
        the known ones.

    Examples
    --------
    >>> find_link_profile(load_link_profiles(), "lte").uplink_mbps
    5.85
    """
    if not isinstance(name, str) or name not in profiles:
        raise ConfigError(f"unknown link profile {name!r}; known: {', '.join(profiles)}")
    return profiles[name]


def load_link_profiles(path: str | Path = DEFAULT_LINKS_PATH) -> LinkProfiles:
    """Read and check every link profile of a YAML file, once (a service does it when it is built).

    Parameters
    ----------
    path : str or path-like, default ``configs/links.yaml`` of the checkout
        A YAML file with a top-level ``profiles`` mapping of name to
        ``{uplink_mbps, rtt_ms, source}``.

    Returns
    -------
    mapping of str to LinkProfile
        In file order, read-only (a ``types.MappingProxyType``): the services
        share one and nothing can change a profile behind their back.

    Raises
    ------
    ConfigError
        If the file is missing or not YAML, has no ``profiles`` mapping, or a
        profile has a missing or unknown key or a value out of range. The
        message names the file and the profile.

    Examples
    --------
    >>> profiles = load_link_profiles()
    >>> profiles["paris"].uplink_mbps, profiles["paris"].rtt_ms
    (60.0, 216.0)
    """
    path = Path(path)
    data = _read_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("profiles"), dict) or not data["profiles"]:
        raise ConfigError(f"link profiles file {str(path)!r} must have a non-empty top-level 'profiles' mapping")
    unknown = sorted(map(str, set(data) - {"profiles"}))
    if unknown:
        raise ConfigError(f"link profiles file {str(path)!r}: unknown top-level keys {unknown}")
    return MappingProxyType({str(name): _profile_from_entry(path, name, entry)
                             for name, entry in data["profiles"].items()})


def main(argv: Sequence[str] | None = None) -> int:
    """Print one profile as ``UPLINK_MBPS RTT_MS`` (or all with ``--list``) for shell scripts.

    Parameters
    ----------
    argv : sequence of str, optional
        Command-line arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status: 0, or 2 on a ConfigError (printed to stderr).
    """
    parser = argparse.ArgumentParser(prog="python -m popex.link.profiles",
                                     description="Print a link profile for shell scripts.")
    parser.add_argument("name", nargs="?", help="profile name (see --list)")
    parser.add_argument("--path", default=str(DEFAULT_LINKS_PATH), help="link profiles YAML file")
    parser.add_argument("--list", action="store_true", help="print every profile: NAME UPLINK_MBPS RTT_MS")
    args = parser.parse_args(argv)
    try:
        profiles = load_link_profiles(args.path)
        if args.list:
            for profile in profiles.values():
                print(profile.name, format_number(profile.uplink_mbps), format_number(profile.rtt_ms))
            return 0
        if args.name is None:
            parser.error("give a profile name or --list")
        profile = find_link_profile(profiles, args.name)
        print(format_number(profile.uplink_mbps), format_number(profile.rtt_ms))
        return 0
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
