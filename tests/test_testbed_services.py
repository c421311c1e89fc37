"""The service launcher gives each service its own config; the caller's POPEX_* environment never leaks in."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from popex.errors import ConfigError
from popex.testbed import services
from popex.testbed.services import REPO_ROOT, service_environ, start_cloud, start_edge, write_service_config

# What a developer may have exported; none of it may reach a launched service.
DEVELOPER_ENV = {
    "POPEX_EDGE_CONFIG": "/home/dev/my-edge.yaml",
    "POPEX_CLOUD_CONFIG": "/home/dev/my-cloud.yaml",
    "POPEX_TOKEN": "the-developers-own-token",
    "POPEX_EMULATE_LINK": "1,500",
    "POPEX_CLOUD_URL": "http://10.9.9.9:8001",
    "POPEX_EMULATE_EDGE_SLOWDOWN": "7",
}


class _CapturedPopen:
    """Stands in for subprocess.Popen: records the command and its environment, starts nothing."""

    calls: list[dict] = []

    def __init__(self, argv, **kwargs):
        self.argv, self.env = list(argv), dict(kwargs["env"])
        self.pid, self.returncode = 0, 0
        _CapturedPopen.calls.append({"argv": self.argv, "env": self.env})

    def poll(self):
        return 0


@pytest.fixture
def captured(monkeypatch):
    for key, value in DEVELOPER_ENV.items():
        monkeypatch.setenv(key, value)
    _CapturedPopen.calls = []
    monkeypatch.setattr(services.subprocess, "Popen", _CapturedPopen)
    return _CapturedPopen.calls


def test_service_environ_drops_every_popex_variable_and_keeps_the_rest():
    base = {"PATH": "/usr/bin", "HOME": "/root", **DEVELOPER_ENV}
    env = service_environ({"POPEX_TOKEN": "testbed-token"}, base=base)
    assert env == {"PATH": "/usr/bin", "HOME": "/root", "POPEX_TOKEN": "testbed-token"}


def test_the_written_config_is_the_checkouts_file_with_the_overrides(tmp_path):
    path = write_service_config(REPO_ROOT / "configs" / "edge.yaml", {"probe_interval_s": 0.5},
                                tmp_path / "edge.yaml")
    shipped = yaml.safe_load((REPO_ROOT / "configs" / "edge.yaml").read_text()) or {}  # it documents, sets none
    assert yaml.safe_load(path.read_text()) == {**shipped, "probe_interval_s": 0.5}
    with pytest.raises(ConfigError, match="unknown edge config keys \\['no_such_key'\\]"):
        write_service_config(REPO_ROOT / "configs" / "edge.yaml", {"no_such_key": 1}, tmp_path / "x.yaml")


def test_launched_services_get_the_testbeds_config_not_the_callers(captured, tmp_path):
    cloud = start_cloud(token="testbed-token", state_dir=tmp_path / "cloud", log_path=tmp_path / "cloud.log",
                        port=1, config={"profile_n_repeats": 5})
    edge = start_edge(token="testbed-token", cloud_url="http://127.0.0.1:1", state_dir=tmp_path / "edge",
                      log_path=tmp_path / "edge.log", port=2, config={"probe_interval_s": 0.5})
    cloud.stop(), edge.stop()
    cloud_env, edge_env = captured[0]["env"], captured[1]["env"]
    assert {k: v for k, v in cloud_env.items() if k.startswith("POPEX_")} == {
        "POPEX_TOKEN": "testbed-token", "POPEX_CLOUD_CONFIG": str(tmp_path / "cloud.yaml")}
    assert {k: v for k, v in edge_env.items() if k.startswith("POPEX_")} == {
        "POPEX_TOKEN": "testbed-token", "POPEX_ADMIN_TOKEN": edge.admin_token,
        "POPEX_EDGE_CONFIG": str(tmp_path / "edge.yaml")}
    assert len(edge.admin_token) == 32 and edge.admin_token != "testbed-token"  # a fresh one of its own
    assert yaml.safe_load(Path(tmp_path / "cloud.yaml").read_text())["profile_n_repeats"] == 5
    assert yaml.safe_load(Path(tmp_path / "edge.yaml").read_text())["probe_interval_s"] == 0.5
    assert "--emulate-link" not in captured[1]["argv"]
