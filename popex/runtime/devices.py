"""Emulated device profiles: named slowdown factors from ``configs/devices.yaml``, each with its source.

An emulated edge (``emulate_edge_slowdown``) is only as honest as its
factor, so the factors come from measurements (Scission's published
benchmarks, relative to a 2-core VM like this machine) and are looked up by
name rather than typed in. Run as a module it prints one factor for shell
scripts::

    python -m popex.runtime.devices raspi4      # -> "5.45"
    python -m popex.runtime.devices --list
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import yaml

from popex.errors import ConfigError

__all__ = ["DEFAULT_DEVICES_PATH", "TIERS", "DeviceProfile", "load_device_profiles", "find_device", "main"]

DEFAULT_DEVICES_PATH = Path(__file__).resolve().parents[2] / "configs" / "devices.yaml"
TIERS = ("device", "edge", "cloud")
_KEYS = {"tier", "slowdown", "source"}


@dataclass(frozen=True)
class DeviceProfile:
    """One named system: its tier, how many times slower than this machine it runs, and why."""

    name: str
    tier: str
    slowdown: float
    source: str


def load_device_profiles(path: str | Path = DEFAULT_DEVICES_PATH) -> Mapping[str, DeviceProfile]:
    """Read and check the profiles file; a read-only mapping name -> DeviceProfile.

    Raises
    ------
    ConfigError
        Naming the profile and key that is wrong.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read device profiles {str(path)!r}: {err}") from err
    entries = data.get("profiles") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise ConfigError(f"{path.name} must hold a non-empty 'profiles' mapping")
    profiles = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict) or set(entry) != _KEYS:
            raise ConfigError(f"device profile {name!r} must have exactly the keys {sorted(_KEYS)}")
        slowdown = entry["slowdown"]
        if entry["tier"] not in TIERS:
            raise ConfigError(f"device profile {name!r}: tier must be one of {list(TIERS)}, got {entry['tier']!r}")
        if isinstance(slowdown, bool) or not isinstance(slowdown, (int, float)) or not (
                math.isfinite(slowdown) and 0 < slowdown <= 1000):
            raise ConfigError(f"device profile {name!r}: slowdown must be a number in (0, 1000], got {slowdown!r}")
        if not isinstance(entry["source"], str) or not entry["source"].strip():
            raise ConfigError(f"device profile {name!r}: source must say where the factor comes from")
        profiles[str(name)] = DeviceProfile(str(name), entry["tier"], float(slowdown), entry["source"].strip())
    return MappingProxyType(profiles)


def find_device(name: str, profiles: Mapping[str, DeviceProfile] | None = None) -> DeviceProfile:
    """The profile ``name``, or a ConfigError listing the known ones."""
    profiles = load_device_profiles() if profiles is None else profiles
    if name not in profiles:
        raise ConfigError(f"unknown device profile {name!r}; configs/devices.yaml has {sorted(profiles)}")
    return profiles[name]


def main(argv: Sequence[str] | None = None) -> int:
    """Print one profile's slowdown (or every profile with --list); exit 2 on an unknown name."""
    parser = argparse.ArgumentParser(prog="python -m popex.runtime.devices", description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    try:
        profiles = load_device_profiles()
        if args.list or args.name is None:
            for profile in profiles.values():
                print(f"{profile.name:14} {profile.tier:6} {profile.slowdown:6.2f}x  {profile.source}")
            return 0
        print(f"{find_device(args.name, profiles).slowdown:g}")
        return 0
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
