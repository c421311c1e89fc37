"""configs/links.yaml and popex.link.profiles: the profiles of issue 4, and clear errors."""

from __future__ import annotations

import math

import pytest

from popex.errors import ConfigError
from popex.link.profiles import LinkProfile, find_link_profile, load_link_profiles, main

EXPECTED = {
    "sao-paulo": (93.6, 10.0),
    "fremont": (73.3, 180.0),
    "paris": (60.0, 216.0),
    "3g": (1.1, 100.0),
    "lte": (5.85, 50.0),
    "wifi": (18.8, 10.0),
}


def test_shipped_profiles():
    profiles = load_link_profiles()
    assert {name: (p.uplink_mbps, p.rtt_ms) for name, p in profiles.items()} == EXPECTED
    for profile in profiles.values():
        assert profile.source and "\n" not in profile.source


@pytest.mark.parametrize("uplink_mbps", [0, -1.0, math.nan, math.inf, 1e9, True, "5", None])
def test_profile_rejects_bad_rates(uplink_mbps):
    with pytest.raises(ConfigError, match="uplink_mbps"):
        LinkProfile("x", uplink_mbps, 10)


@pytest.mark.parametrize("rtt_ms", [-0.1, math.nan, -math.inf, 1e6, False, "10"])
def test_profile_rejects_bad_rtts(rtt_ms):
    with pytest.raises(ConfigError, match="rtt_ms"):
        LinkProfile("x", 5.0, rtt_ms)


@pytest.mark.parametrize("name", ["", "Paris", "a b", "x;y", "-lte", "lte\n", 3, "a" * 33])
def test_profile_rejects_bad_names(name):
    with pytest.raises(ConfigError, match="name"):
        LinkProfile(name, 5.0, 10)


def test_profile_is_frozen_and_numbers_are_floats():
    profile = LinkProfile("lte", 5, 50)
    assert isinstance(profile.uplink_mbps, float) and isinstance(profile.rtt_ms, float)
    with pytest.raises(AttributeError):
        profile.rtt_ms = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("text, message", [
    ("profiles: [1, 2]\n", "top-level 'profiles' mapping"),
    ("other: 1\n", "top-level 'profiles' mapping"),
    ("profiles: {}\n", "non-empty"),
    ("profiles:\n  a: {uplink_mbps: 1}\n", "missing keys \\['rtt_ms'\\]"),
    ("profiles:\n  a: {uplink_mbps: 1, rtt_ms: 2, rate: 3}\n", "unknown keys \\['rate'\\]"),
    ("profiles:\n  a: {uplink_mbps: -1, rtt_ms: 2}\n", "profile 'a'.*uplink_mbps"),
    ("profiles:\n  a: {uplink_mbps: .nan, rtt_ms: 2}\n", "finite"),
    ("profiles:\n  a: 5\n", "profile 'a': must be a mapping"),
    ("profiles:\n  a: {uplink_mbps: 1, rtt_ms: 2}\nextra: 1\n", "unknown top-level keys"),
    ("profiles: {a: [\n", "cannot read"),
])
def test_load_errors_name_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / "links.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_link_profiles(path)
    assert "links.yaml" in str(info.value)


def test_profiles_are_read_only_and_looked_up_by_name():
    profiles = load_link_profiles()
    with pytest.raises(TypeError):
        profiles["lte"] = LinkProfile("lte", 1.0, 1.0)  # type: ignore[index]
    assert list(profiles) == list(EXPECTED)  # file order
    assert find_link_profile(profiles, "wifi") is profiles["wifi"]
    for name in ("no-such", None, ["lte"]):
        with pytest.raises(ConfigError, match="unknown link profile.*known: sao-paulo"):
            find_link_profile(profiles, name)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_link_profiles(tmp_path / "nope.yaml")


def test_module_prints_profiles_for_shell_scripts(capsys):
    assert main(["paris"]) == 0
    assert capsys.readouterr().out == "60 216\n"
    assert main(["--list"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "sao-paulo 93.6 10"
    assert main(["no-such"]) == 2
    assert "unknown link profile" in capsys.readouterr().err
