"""Static checks of docker/: there is no Docker engine here, so check what can be checked without one.

The compose file parses and has the services, limits and capabilities the
experiments rely on; every Dockerfile COPY source exists; torch is pinned;
the scripts exist, are executable and parse (``bash -n``); apply_link.sh
refuses injected values and builds the same tc commands as
popex.link.shaping.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from popex.link.profiles import format_number, load_link_profiles
from popex.link.shaping import tc_commands

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = REPO_ROOT / "docker"
COMPOSE_PATH = DOCKER_DIR / "docker-compose.yml"
DOCKERFILES = {"cloud": DOCKER_DIR / "Dockerfile.cloud", "edge": DOCKER_DIR / "Dockerfile.edge"}
APPLY_LINK = DOCKER_DIR / "apply_link.sh"
TORCH_PIN = "torch==2.13.0"


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined, current = [], ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        joined.append(current + stripped)
        current = ""
    if current:
        joined.append(current)
    result = []
    for text in joined:
        instruction, _, arguments = text.partition(" ")
        result.append((instruction.upper(), arguments.strip()))
    return result


def _exec_form_or_words(arguments: str) -> list[str]:
    if arguments.startswith("["):
        return json.loads(arguments)
    return shlex.split(arguments)


def _copy_sources(arguments: str) -> list[str]:
    words = [word for word in _exec_form_or_words(arguments) if not word.startswith("--")]
    return words[:-1]


@pytest.fixture(scope="module")
def compose() -> dict:
    data = yaml.safe_load(COMPOSE_PATH.read_text())
    assert isinstance(data, dict)
    return data


def test_compose_has_cloud_and_edge(compose):
    assert {"cloud", "edge"} <= set(compose["services"])
    for name, service in compose["services"].items():
        build = service["build"]
        context = (COMPOSE_PATH.parent / build["context"]).resolve()
        assert context == REPO_ROOT, f"{name}: the build context must be the repository root"
        assert (context / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']} is missing"
        assert "TORCH_INDEX_URL" in build.get("args", {})


def test_edge_is_limited_to_one_cpu_and_may_shape(compose):
    edge = compose["services"]["edge"]
    cpus = edge.get("cpus", edge.get("deploy", {}).get("resources", {}).get("limits", {}).get("cpus"))
    assert float(cpus) == 1.0
    assert "NET_ADMIN" in edge["cap_add"]
    assert "NET_ADMIN" not in compose["services"]["cloud"].get("cap_add", [])


def test_token_comes_from_the_environment_and_state_from_named_volumes(compose):
    named_volumes = set(compose.get("volumes") or {})
    for name in ("cloud", "edge"):
        service = compose["services"][name]
        token = service["environment"]["POPEX_TOKEN"]
        assert token.startswith("${POPEX_TOKEN"), f"{name}: the token must not be written in the file"
        mounted = {volume.split(":")[0] for volume in service["volumes"]}
        assert mounted & named_volumes, f"{name}: state must live in a named volume"
        health = " ".join(service["healthcheck"]["test"])
        assert "/healthz" in health


def test_edge_depends_on_a_healthy_cloud_and_selects_a_profile(compose):
    edge = compose["services"]["edge"]
    assert edge["depends_on"]["cloud"]["condition"] == "service_healthy"
    assert "POPEX_LINK_PROFILE" in edge["environment"]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_copy_sources_exist(name):
    instructions = _instructions(DOCKERFILES[name])
    ignored = _dockerignore_patterns(DOCKERFILES[name])
    n_copies = 0
    for instruction, arguments in instructions:
        if instruction not in ("COPY", "ADD") or "--from=" in arguments:
            continue
        for source in _copy_sources(arguments):
            n_copies += 1
            matches = list(REPO_ROOT.glob(source)) if any(ch in source for ch in "*?[") else [REPO_ROOT / source]
            assert matches and all(path.exists() for path in matches), f"{name}: COPY source {source} is missing"
            # git keeps no empty directories: an empty one here is missing in a fresh clone.
            assert all(path.is_file() or any(path.iterdir()) for path in matches), \
                f"{name}: COPY source {source} is an empty directory (absent from a git checkout)"
            assert not any(fnmatch.fnmatch(source.rstrip("/"), pattern) for pattern in ignored), \
                f"{name}: COPY source {source} is excluded by the .dockerignore"
    assert n_copies > 0


def _dockerignore_patterns(dockerfile: Path) -> list[str]:
    path = dockerfile.with_name(dockerfile.name + ".dockerignore")
    if not path.is_file():
        return []
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_base_and_cpu_torch(name):
    instructions = _instructions(DOCKERFILES[name])
    assert instructions[0] == ("FROM", "python:3.11-slim")
    args = {arguments.split("=", 1)[0]: arguments for instruction, arguments in instructions if instruction == "ARG"}
    assert "=" in args["TORCH_INDEX_URL"], "TORCH_INDEX_URL needs a default"
    runs = " ".join(arguments for instruction, arguments in instructions if instruction == "RUN")
    assert TORCH_PIN in runs and "${TORCH_INDEX_URL}" in runs
    assert "pip install -r requirements.txt" in runs
    requirements = (REPO_ROOT / "requirements.txt").read_text().split()
    assert TORCH_PIN in requirements
    assert "TORCH_INDEX_URL" in (DOCKER_DIR / "README.md").read_text()


def test_cloud_runs_unprivileged_and_edge_has_tc():
    cloud = _instructions(DOCKERFILES["cloud"])
    users = [arguments for instruction, arguments in cloud if instruction == "USER"]
    assert users and users[-1] not in ("root", "0")
    edge_runs = " ".join(arguments for instruction, arguments in _instructions(DOCKERFILES["edge"])
                         if instruction == "RUN")
    assert "iproute2" in edge_runs


def _referenced_scripts() -> set[Path]:
    scripts = set()
    for dockerfile in DOCKERFILES.values():
        for instruction, arguments in _instructions(dockerfile):
            if instruction in ("ENTRYPOINT", "CMD"):
                first = _exec_form_or_words(arguments)[0]
                if first.endswith(".sh"):
                    scripts.add(REPO_ROOT / first)  # WORKDIR /app holds the repository
    compose = yaml.safe_load(COMPOSE_PATH.read_text())
    for service in compose["services"].values():
        for key in ("entrypoint", "command"):
            value = service.get(key)
            words = value if isinstance(value, list) else shlex.split(value or "")
            scripts.update(REPO_ROOT / word for word in words[:1] if word.endswith(".sh"))
    entrypoint_text = (DOCKER_DIR / "edge_entrypoint.sh").read_text()
    scripts.update(DOCKER_DIR / name for name in re.findall(r"\$here/([\w.-]+\.sh)", entrypoint_text))
    return scripts


def test_referenced_scripts_exist_and_are_executable():
    scripts = _referenced_scripts()
    assert {REPO_ROOT / "run_cloud.sh", REPO_ROOT / "run_edge.sh", DOCKER_DIR / "edge_entrypoint.sh",
            APPLY_LINK} <= scripts
    for script in scripts:
        assert script.is_file(), f"{script.relative_to(REPO_ROOT)} is missing"
        assert os.access(script, os.X_OK), f"{script.relative_to(REPO_ROOT)} is not executable"


SHELL_SCRIPTS = sorted([*DOCKER_DIR.glob("*.sh"), *REPO_ROOT.glob("*.sh"), *(REPO_ROOT / "scripts").glob("*.sh")])


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_shell_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _apply_link(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {key: value for key, value in os.environ.items()
               if key not in ("IFACE", "LINK_PROFILE", "RATE_MBPS", "RTT_MS", "DST_IP")}
    environ.update({"IFACE": "lo", "PYTHON": sys.executable, **env})
    return subprocess.run(["bash", str(APPLY_LINK), "--dry-run", *args], capture_output=True, text=True,
                          env=environ, timeout=30)


INJECTIONS = ["1;rm -rf /", "$(id)", "`id`", "1 && id", "1|id", "1\nid", "-1", "1e3", "0x10", "", " 5", "5 ",
              "1.2.3", "nan", "inf", "1,5", "１"]


@pytest.mark.parametrize("value", INJECTIONS)
@pytest.mark.parametrize("variable", ["RATE_MBPS", "RTT_MS"])
def test_apply_link_refuses_injected_numbers(variable, value):
    values = {"RATE_MBPS": "8", "RTT_MS": "20", variable: value}
    result = _apply_link(**values)
    assert result.returncode != 0, result.stdout
    assert "tc " not in result.stdout


@pytest.mark.parametrize("argv", [
    ["--iface", "lo;id", "--rate-mbps", "8", "--rtt-ms", "20"],
    ["--iface", "$(id)", "--rate-mbps", "8", "--rtt-ms", "20"],
    ["--iface", "a-very-long-interface", "--rate-mbps", "8", "--rtt-ms", "20"],
    ["--profile", "wifi;id"],
    ["--profile", "--list"],
    ["--profile", "no-such-profile"],
    ["--rate-mbps", "8", "--rtt-ms", "20", "--dst", "1.2.3.4;id"],
    ["--rate-mbps", "8", "--rtt-ms", "20", "--dst", "256.1.1.1"],
    ["--rate-mbps", "0", "--rtt-ms", "20"],
    ["--rate-mbps", "100001", "--rtt-ms", "20"],
    ["--rate-mbps", "8", "--rtt-ms", "60001"],
    ["--rate-mbps", "8"],
    ["--profile", "wifi", "--rate-mbps", "8"],
    ["--unknown-option"],
])
def test_apply_link_refuses_bad_arguments(argv):
    result = _apply_link(*argv)
    assert result.returncode != 0, result.stdout
    assert "tc " not in result.stdout


def _dry_run_commands(result: subprocess.CompletedProcess) -> list[list[str]]:
    assert result.returncode == 0, result.stderr
    return [line.split(" ") for line in result.stdout.splitlines() if line and not line.startswith("#")]


@pytest.mark.parametrize("dst_ip", [None, "172.18.0.2"])
def test_apply_link_builds_the_same_commands_as_python(dst_ip):
    dst_args = [] if dst_ip is None else ["--dst", dst_ip]
    for profile in load_link_profiles().values():
        expected = tc_commands("lo", uplink_mbps=profile.uplink_mbps, rtt_ms=profile.rtt_ms, netem=True,
                               dst_ip=dst_ip)
        assert _dry_run_commands(_apply_link("--profile", profile.name, *dst_args)) == expected, profile.name
        by_numbers = _apply_link("--rate-mbps", format_number(profile.uplink_mbps),
                                 "--rtt-ms", format_number(profile.rtt_ms), *dst_args)
        assert _dry_run_commands(by_numbers) == expected, profile.name


def test_apply_link_dry_run_prints_the_documented_netem_command():
    commands = _dry_run_commands(_apply_link(RATE_MBPS="5.85", RTT_MS="50"))
    assert commands == [["tc", "qdisc", "replace", "dev", "lo", "root", "netem", "delay", "50000us",
                         "rate", "5850kbit", "limit", "1000"]]
