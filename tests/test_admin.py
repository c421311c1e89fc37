"""``/api/v1/admin/link``: token, strict validation, and the link put in force (emulated, tc mocked, tc real)."""

from __future__ import annotations

import subprocess

import pytest

from edge_api import close_app, create_app, get_node
from edge_api.config import load_config
from popex.edge.fake_cloud import FakeCloud
from popex.errors import ConfigError
from popex.link.control import LinkController, LinkNotAdjustable, check_link_numbers
from popex.link.profiles import load_link_profiles
from popex.testbed.netns import EMULATED_RATE_MBPS, HarnessUnavailable, shaped_link
from popex.link.shaping import Shaping, ShapingError
from popex.link.emulation import LinkEmulator

TOKEN = "shared-test-token-0123"
ADMIN_TOKEN = "admin-test-token-0123"
URL = "/api/v1/admin/link"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _app(tmp_path, link: LinkEmulator | None, **config):
    values = {"token": TOKEN, "admin_token": ADMIN_TOKEN, "state_dir": str(tmp_path / "state"),
              "default_model_dir": str(tmp_path / "none"), "start_background": False, **config}
    return create_app(values, cloud_client=FakeCloud(link=link))


@pytest.fixture
def emulated(tmp_path):
    link = LinkEmulator(10.0, 20.0)
    app = _app(tmp_path, link)
    yield app, link
    close_app(app)


@pytest.fixture
def client(emulated):
    return emulated[0].test_client()


class _FakeTc:
    """apply_shaping's stand-in: records the calls, answers like the real one."""

    def __init__(self, *, fail: bool = False) -> None:
        self.calls: list[dict] = []
        self.fail = fail

    def __call__(self, iface, *, uplink_mbps, rtt_ms, netem, dst_ip):
        if self.fail:
            raise ShapingError("`tc qdisc replace ...` failed: Operation not permitted")
        self.calls.append({"iface": iface, "uplink_mbps": uplink_mbps, "rtt_ms": rtt_ms, "netem": netem,
                           "dst_ip": dst_ip})
        return Shaping(iface=iface, uplink_mbps=uplink_mbps, rtt_ms=rtt_ms, rtt_in_kernel=netem or rtt_ms == 0,
                       dst_ip=dst_ip, netns=None, commands=())


# -- the token -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["get", "put"])
@pytest.mark.parametrize("header", [None, "Bearer wrong-token-000000", f"Basic {ADMIN_TOKEN}", ADMIN_TOKEN,
                                    "Bearer ", f"Bearer {TOKEN}"])
def test_without_the_token_it_is_a_401_and_nothing_changes(emulated, method, header):
    app, link = emulated
    headers = {} if header is None else {"Authorization": header}
    response = getattr(app.test_client(), method)(URL, json={"uplink_mbps": 1.0, "rtt_ms": 5.0}, headers=headers)
    assert response.status_code == 401
    assert response.json["error"]["code"] == "unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert (link.uplink_mbps, link.rtt_ms) == (10.0, 20.0)


# -- emulation mode --------------------------------------------------------------------------------------


def test_put_numbers_changes_the_emulated_link_and_get_reports_it(emulated):
    app, link = emulated
    client = app.test_client()
    before = client.get(URL, headers=AUTH)
    assert before.status_code == 200 and before.json["mode"] == "emulation"
    assert (before.json["uplink_mbps"], before.json["rtt_ms"]) == (10.0, 20.0)
    response = client.put(URL, json={"uplink_mbps": 2.5, "rtt_ms": 0}, headers=AUTH)
    assert response.status_code == 200
    assert response.json["uplink_mbps"] == 2.5 and response.json["rtt_ms"] == 0.0
    assert response.json["rtt_by"] == "emulation" and response.json["changed_at_s"] > 0
    assert (link.uplink_mbps, link.rtt_ms) == (2.5, 0.0)
    assert link.serialisation_ms(1000) == pytest.approx(3.2)  # 8000 bits at 2.5 Mbit/s
    assert client.get(URL, headers=AUTH).json == response.json


def test_put_a_profile_applies_its_numbers(emulated):
    app, link = emulated
    lte = load_link_profiles()["lte"]
    response = app.test_client().put(URL, json={"profile": "lte"}, headers=AUTH)
    assert response.status_code == 200 and response.json["profile"] == "lte"
    assert (link.uplink_mbps, link.rtt_ms) == (lte.uplink_mbps, lte.rtt_ms)


BAD_BODIES = [
    ('{"uplink_mbps": NaN, "rtt_ms": 10}', "NaN is not JSON"),  # refused by the parser (api_common.json_io)
    ('{"uplink_mbps": Infinity, "rtt_ms": 10}', "Infinity is not JSON"),
    ('{"uplink_mbps": 5, "rtt_ms": -Infinity}', "-Infinity is not JSON"),
    ('{"uplink_mbps": 1e400, "rtt_ms": 10}', "uplink_mbps"),
    ('{"uplink_mbps": 0, "rtt_ms": 10}', "uplink_mbps"),
    ('{"uplink_mbps": -3, "rtt_ms": 10}', "uplink_mbps"),
    ('{"uplink_mbps": 100001, "rtt_ms": 10}', "uplink_mbps"),
    ('{"uplink_mbps": 5, "rtt_ms": -1}', "rtt_ms"),
    ('{"uplink_mbps": 5, "rtt_ms": 60001}', "rtt_ms"),
    ('{"uplink_mbps": true, "rtt_ms": 10}', "uplink_mbps"),
    ('{"uplink_mbps": "5", "rtt_ms": 10}', "uplink_mbps"),
    ('{"uplink_mbps": "5;rm -rf /", "rtt_ms": 10}', "uplink_mbps"),
    ('{"uplink_mbps": null, "rtt_ms": 10}', "uplink_mbps"),
    ('{"uplink_mbps": [5], "rtt_ms": 10}', "uplink_mbps"),
    ('{"uplink_mbps": 5}', "expected the keys"),
    ('{"uplink_mbps": 5, "rtt_ms": 10, "iface": "eth0"}', "expected the keys"),
    ('{"profile": "lte", "uplink_mbps": 5, "rtt_ms": 10}', "expected the keys"),
    ('{"profile": "moon"}', "unknown link profile"),
    ('{"profile": "lte; reboot"}', "unknown link profile"),
    ('{"profile": 3}', "unknown link profile"),
    ("{}", "expected the keys"),
    ("[5, 10]", "JSON object"),
    ('"lte"', "JSON object"),
    ("{not json", "not valid JSON"),
    ("[" * 2000 + "]" * 2000, "2000 levels deep"),
]


@pytest.mark.parametrize("body, message", BAD_BODIES)
def test_bad_bodies_are_400_with_the_error_json_and_change_nothing(emulated, body, message):
    app, link = emulated
    response = app.test_client().put(URL, data=body, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 400, response.json
    assert set(response.json["error"]) == {"code", "message"} and message in response.json["error"]["message"]
    assert (link.uplink_mbps, link.rtt_ms) == (10.0, 20.0)


def test_not_json_is_415_and_a_large_body_is_413(client):
    response = client.put(URL, data="uplink_mbps=5&rtt_ms=10", headers=AUTH,
                          content_type="application/x-www-form-urlencoded")
    assert response.status_code == 415 and response.json["error"]["code"] == "unsupported_media_type"
    response = client.put(URL, data='{"profile": "' + "x" * 10_000 + '"}', headers=AUTH,
                          content_type="application/json")
    assert response.status_code == 413


def test_an_edge_without_emulation_or_interface_answers_409(tmp_path):
    app = _app(tmp_path, None)
    try:
        client = app.test_client()
        assert client.get(URL, headers=AUTH).json["mode"] == "none"
        response = client.put(URL, json={"uplink_mbps": 5, "rtt_ms": 10}, headers=AUTH)
        assert response.status_code == 409 and response.json["error"]["code"] == "link_not_adjustable"
    finally:
        close_app(app)


# -- tc mode, tc mocked ------------------------------------------------------------------------------------


def _with_fake_tc(app, *, netem: bool, emulator: LinkEmulator | None, fail: bool = False) -> _FakeTc:
    fake = _FakeTc(fail=fail)
    get_node(app).link_controller = LinkController(profiles=load_link_profiles(), interface="veth7",
                                                   emulator=emulator, dst_ip="10.1.2.3", apply=fake,
                                                   has_netem=lambda: netem)
    return fake


def test_tc_mode_without_netem_shapes_the_rate_and_emulates_only_the_rtt(tmp_path):
    emulator = LinkEmulator(EMULATED_RATE_MBPS, 40.0)
    app = _app(tmp_path, emulator)
    try:
        fake = _with_fake_tc(app, netem=False, emulator=emulator)
        response = app.test_client().put(URL, json={"uplink_mbps": 3.5, "rtt_ms": 80}, headers=AUTH)
        assert response.status_code == 200
        assert response.json["mode"] == "tc" and response.json["rtt_by"] == "emulation"
        assert response.json["interface"] == "veth7" and response.json["dst_ip"] == "10.1.2.3"
        assert fake.calls == [{"iface": "veth7", "uplink_mbps": 3.5, "rtt_ms": 80.0, "netem": False,
                               "dst_ip": "10.1.2.3"}]
        assert (emulator.uplink_mbps, emulator.rtt_ms) == (EMULATED_RATE_MBPS, 80.0)
    finally:
        close_app(app)


def test_tc_mode_with_netem_leaves_the_rtt_to_the_kernel(tmp_path):
    emulator = LinkEmulator(EMULATED_RATE_MBPS, 40.0)
    app = _app(tmp_path, emulator)
    try:
        _with_fake_tc(app, netem=True, emulator=emulator)
        response = app.test_client().put(URL, json={"profile": "paris"}, headers=AUTH)
        assert response.status_code == 200 and response.json["rtt_by"] == "netem"
        assert emulator.rtt_ms == 0.0
    finally:
        close_app(app)


def test_tc_mode_refuses_an_rtt_it_cannot_add_and_reports_tc_failures_as_409(tmp_path):
    app = _app(tmp_path, None)
    try:
        fake = _with_fake_tc(app, netem=False, emulator=None)
        client = app.test_client()
        response = client.put(URL, json={"uplink_mbps": 3.5, "rtt_ms": 80}, headers=AUTH)
        assert response.status_code == 409 and "netem" in response.json["error"]["message"]
        assert fake.calls == []  # refused before anything was applied
        assert client.put(URL, json={"uplink_mbps": 3.5, "rtt_ms": 0}, headers=AUTH).status_code == 200
        _with_fake_tc(app, netem=True, emulator=None, fail=True)
        response = client.put(URL, json={"uplink_mbps": 3.5, "rtt_ms": 0}, headers=AUTH)
        assert response.status_code == 409 and "Operation not permitted" in response.json["error"]["message"]
    finally:
        close_app(app)


# -- tc mode, real (root) --------------------------------------------------------------------------------------


def test_real_tc_on_a_veth_pair(tmp_path):
    """Root only: the endpoint reshapes the harness's veth; `tc` shows the new rate."""
    try:
        context = shaped_link(uplink_mbps=20.0, rtt_ms=30.0, name_prefix="pxadm")
        link = context.__enter__()
    except HarnessUnavailable as err:
        pytest.skip(f"network-namespace harness unavailable: {err}")
    try:
        emulator = LinkEmulator(EMULATED_RATE_MBPS, 30.0)
        app = _app(tmp_path, emulator, shaping_interface=link.edge_iface,
                   cloud_url=f"http://{link.cloud_ip}:8001")
        try:
            response = app.test_client().put(URL, json={"uplink_mbps": 3.0, "rtt_ms": 45}, headers=AUTH)
            assert response.status_code == 200, response.json
            assert response.json["dst_ip"] == link.cloud_ip
            classes = subprocess.run(["tc", "class", "show", "dev", link.edge_iface], capture_output=True,
                                     text=True, timeout=10).stdout
            assert "rate 3Mbit" in classes
            filters = subprocess.run(["tc", "filter", "show", "dev", link.edge_iface], capture_output=True,
                                     text=True, timeout=10).stdout
            assert "flowid 1:10" in filters
            if response.json["rtt_by"] == "emulation":
                assert emulator.rtt_ms == 45.0
        finally:
            close_app(app)
    finally:
        context.__exit__(None, None, None)


# -- the pieces -----------------------------------------------------------------------------------------------


def test_link_emulator_set_link_changes_both_values_or_nothing():
    now = [0.0]
    link = LinkEmulator(8.0, 10.0, clock_s=lambda: now[0], sleep_s=lambda _: None)
    assert link.delay_ms(1000) == pytest.approx(11.0)
    link.set_link(1.0, 0.0)
    assert link.delay_ms(1000) == pytest.approx(8.0)
    for bad in ((0.0, 1.0), (float("nan"), 1.0), (1.0, -1.0), (True, 1.0), (1.0, float("inf"))):
        with pytest.raises(ConfigError):
            link.set_link(*bad)
        assert (link.uplink_mbps, link.rtt_ms) == (1.0, 0.0)


def test_link_numbers_are_checked_strictly():
    assert check_link_numbers(5, 0) == (5.0, 0.0)
    with pytest.raises(ConfigError, match="uplink_mbps"):
        check_link_numbers(0.001, 0)
    with pytest.raises(LinkNotAdjustable):
        LinkController(profiles={}, interface=None, emulator=None).set_link(1.0, 1.0)


@pytest.mark.parametrize("value", ["eth0; reboot", "x" * 16, "", 3])
def test_shaping_interface_is_checked_at_startup(tmp_path, value):
    with pytest.raises(ConfigError, match="shaping_interface"):
        load_config({"token": TOKEN, "shaping_interface": value}, environ={})


def test_shaping_interface_comes_from_the_environment_like_the_docker_entrypoint():
    config = load_config({"token": TOKEN}, environ={"POPEX_LINK_IFACE": "eth0"})
    assert config.shaping_interface == "eth0"
    assert load_config({"token": TOKEN}, environ={}).shaping_interface is None


def test_profiles_are_read_once_when_the_edge_starts(emulated, monkeypatch):
    """A PUT of a profile uses what was read at start; configs/links.yaml is not read per request."""
    app, link = emulated

    def refuse(*args, **kwargs):
        raise AssertionError("link profiles re-read on a request")

    monkeypatch.setattr("popex.link.profiles.load_link_profiles", refuse)
    monkeypatch.setattr("popex.edge.node.load_link_profiles", refuse)
    response = app.test_client().put(URL, json={"profile": "lte"}, headers=AUTH)
    assert response.status_code == 200 and response.json["profile"] == "lte"
