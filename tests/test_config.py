"""The services' configs: defaults in one place, the YAML files agreeing with them, no leaks into tests.

The YAML files document every key with its default commented out; these
tests parse those comments, so a default changed in a dataclass and not in
its file (or the other way round) fails here. A config built from a mapping
(``from_mapping``, ``create_app(mapping)``) must not see the YAML file or the
environment: the leak test points both at a file that changes every number.
"""

import dataclasses
from pathlib import Path

import pytest
import yaml

from cloud_api import create_app as create_cloud_app
from cloud_api.config import CloudConfig
from cloud_api.config import load_config as load_cloud_config
from edge_api.config import EdgeConfig
from edge_api.config import load_config as load_edge_config
from popex.errors import ConfigError
from popex.constraints import Nullable
from popex.settings import documented_settings

REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789"
CONFIGS = [(EdgeConfig, REPO / "configs" / "edge.yaml"), (CloudConfig, REPO / "configs" / "cloud.yaml")]


def _commented_keys(path: Path) -> dict[str, object]:
    """Every ``# key: value`` line of a config file, parsed as YAML; a key twice fails."""
    return documented_settings(path.read_text(), where=path.name)


def _numeric_fields(cls):
    defaults = cls.from_mapping({"token": TOKEN})
    return {field.name: getattr(defaults, field.name) for field in dataclasses.fields(cls)
            if isinstance(getattr(defaults, field.name), (int, float))
            and not isinstance(getattr(defaults, field.name), bool)}


def _changed(value):
    """Another valid value: one more (ints) or a tenth more (floats), kept inside every bound here."""
    if isinstance(value, int):
        return value + 1
    return value * 1.1 if value > 0 else 0.5


@pytest.mark.parametrize("cls, path", CONFIGS, ids=["edge", "cloud"])
def test_the_yaml_file_sets_nothing_and_documents_every_default(cls, path):
    assert yaml.safe_load(path.read_text()) is None, f"{path.name} must set no key: defaults live in {cls.__name__}"
    documented = _commented_keys(path)
    names = [field.name for field in dataclasses.fields(cls)]
    assert sorted(documented) == sorted(names), f"{path.name} must document exactly the keys of {cls.__name__}"
    defaults = cls.from_mapping({"token": TOKEN, **{key: value for key, value in documented.items()
                                                     if key != "token"}})
    expected = cls.from_mapping({"token": TOKEN})
    for name in names:
        assert getattr(defaults, name) == getattr(expected, name), \
            f"{path.name} shows {name}: {documented[name]!r}; {cls.__name__} defaults to {getattr(expected, name)!r}"
    assert documented["token"] is None  # the secret has no default


@pytest.mark.parametrize("cls", [EdgeConfig, CloudConfig], ids=["edge", "cloud"])
def test_the_constraint_table_covers_every_field(cls):
    assert set(cls._constraints) == {field.name for field in dataclasses.fields(cls)}
    nullable = {name for name, rule in cls._constraints.items() if isinstance(rule, Nullable)}
    for field in dataclasses.fields(cls):
        if field.default is None:
            assert field.name in nullable, f"{field.name} defaults to None, so its rule must be Nullable"


@pytest.fixture
def leaky_environment(tmp_path, monkeypatch):
    """A YAML file changing every numeric default of both configs, named by both env variables."""
    edge_values = {name: _changed(value) for name, value in _numeric_fields(EdgeConfig).items()}
    cloud_values = {name: _changed(value) for name, value in _numeric_fields(CloudConfig).items()}
    assert len(edge_values) > 10 and len(cloud_values) >= 3
    edge_path, cloud_path = tmp_path / "edge.yaml", tmp_path / "cloud.yaml"
    edge_path.write_text(yaml.safe_dump(edge_values))
    cloud_path.write_text(yaml.safe_dump(cloud_values))
    monkeypatch.setenv("POPEX_EDGE_CONFIG", str(edge_path))
    monkeypatch.setenv("POPEX_CLOUD_CONFIG", str(cloud_path))
    monkeypatch.setenv("POPEX_TOKEN", "leaked-token-from-env")
    monkeypatch.setenv("POPEX_CLOUD_STATE_DIR", str(tmp_path / "leaked-cloud-state"))
    monkeypatch.setenv("POPEX_EDGE_STATE_DIR", str(tmp_path / "leaked-edge-state"))
    monkeypatch.setenv("POPEX_CLOUD_URL", "http://leaked:9")
    monkeypatch.setenv("POPEX_DEFAULT_MODEL_DIR", str(tmp_path / "leaked-model"))
    return {"edge": edge_values, "cloud": cloud_values}


def test_a_mapping_config_ignores_the_yaml_file_and_the_environment(leaky_environment, tmp_path):
    edge = EdgeConfig.from_mapping({"token": TOKEN})
    cloud = CloudConfig.from_mapping({"token": TOKEN, "state_dir": tmp_path / "cloud"})
    for config, changed in ((edge, leaky_environment["edge"]), (cloud, leaky_environment["cloud"])):
        default = type(config).from_mapping({"token": TOKEN})
        for name in changed:
            assert getattr(config, name) == getattr(default, name) != changed[name], name
    assert edge.token == cloud.token == TOKEN and edge.cloud_url == "http://127.0.0.1:8001"
    app = create_cloud_app({"token": TOKEN, "state_dir": str(tmp_path / "cloud")})
    assert app.extensions["popex_cloud_config"] == cloud
    assert app.config["MAX_CONTENT_LENGTH"] == CloudConfig.from_mapping({"token": TOKEN}).max_body_bytes


def test_the_production_loader_honours_the_yaml_file_and_the_environment(leaky_environment, tmp_path):
    edge, cloud = load_edge_config(), load_cloud_config()
    for config, changed in ((edge, leaky_environment["edge"]), (cloud, leaky_environment["cloud"])):
        for name, value in changed.items():
            assert getattr(config, name) == value, name
    assert edge.token == cloud.token == "leaked-token-from-env" and edge.cloud_url == "http://leaked:9"
    assert cloud.state_dir == tmp_path / "leaked-cloud-state"
    assert str(edge.default_model_dir) == str(tmp_path / "leaked-model")
    assert load_cloud_config({"max_body_bytes": 4096}).max_body_bytes == 4096  # overrides win


@pytest.mark.parametrize("cls", [EdgeConfig, CloudConfig], ids=["edge", "cloud"])
def test_from_mapping_refuses_unknown_keys_and_names_the_bound(cls):
    with pytest.raises(ConfigError, match="unknown .* config keys \\['timeout'\\]"):
        cls.from_mapping({"token": TOKEN, "timeout": 3})
    with pytest.raises(ConfigError, match="refuses to start without a token"):
        cls.from_mapping({})
    with pytest.raises(ConfigError, match=r"profile_n_repeats must be an int in 1\.\.1000, got 0"):
        cls.from_mapping({"token": TOKEN, "profile_n_repeats": 0})
    assert TOKEN not in repr(cls.from_mapping({"token": TOKEN})) and "token='***'" in repr(cls.from_mapping(
        {"token": TOKEN}))


def test_yaml_null_means_none_only_where_a_key_allows_it(tmp_path):
    path = tmp_path / "edge.yaml"
    path.write_text("n_threads:\ndefault_model_dir:\ntoken: ''\n")
    config = load_edge_config(environ={"POPEX_EDGE_CONFIG": str(path), "POPEX_TOKEN": TOKEN})
    assert (config.n_threads, config.default_model_dir, config.token) == (None, None, TOKEN)
    path.write_text("probe_interval_s:\n")
    with pytest.raises(ConfigError, match="probe_interval_s is empty in the YAML file"):
        load_edge_config(environ={"POPEX_EDGE_CONFIG": str(path), "POPEX_TOKEN": TOKEN})
    with pytest.raises(ConfigError, match="POPEX_EDGE_CONFIG names"):
        load_edge_config(environ={"POPEX_EDGE_CONFIG": str(tmp_path / "missing.yaml"), "POPEX_TOKEN": TOKEN})


@pytest.mark.parametrize("name, value, message", [
    ("initial_uplink_mbps", 0, r"initial_uplink_mbps must be in \(0, 1e\+06\], got 0"),
    ("initial_rtt_ms", float("inf"), "initial_rtt_ms must be a finite number, got inf"),
    ("default_deadline_ms", "50", "default_deadline_ms must be a number, got '50'"),
    ("uplink_window_n", 2.0, r"uplink_window_n must be an int in 1\.\.10000, got 2\.0"),
    ("wire_dtype", "bf16", r"wire_dtype must be one of \['float32', 'float16', 'int8'\], got 'bf16'"),
    ("start_background", 1, "start_background must be true or false, got 1"),
    ("shaping_interface", "eth0; rm", "shaping_interface must be an interface name matching"),
    ("state_dir", "", "state_dir must be a directory path, got ''"),
])
def test_edge_messages_name_the_key_the_bound_and_the_value(name, value, message):
    with pytest.raises(ConfigError, match=message):
        EdgeConfig.from_mapping({"token": TOKEN, name: value})
