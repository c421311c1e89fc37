"""``popex predict``: Scission's published answer, and top-K against an independent brute force."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popex.errors import BenchmarkError
from popex.tiers.benchmark_file import load_benchmark_dir
from popex.tiers.network import load_network_csv
from popex.tiers.predict import enumerate_cuts, format_line, predict
from popex.tiers.query import Query, TierCriteria, parse_criteria
from tests.tiers_data import HAVE_SCISSION, REPO, SCISSION, SKIP_REASON, WIRELESS, block_dicts, write_network, write_system

SCISSION_README = [
    "[1] 9.0106s - 2.4087MB - Device(raspi4) = 0 - 6, Edge(vm2Core) = 7 - 11, Cloud(6700k(GPU)) = 12 - 25",
    "[2] 9.0594s - 2.4087MB - Device(raspi4) = 0 - 6, Edge(2500) = 7 - 11, Cloud(6700k(GPU)) = 12 - 25",
    "[3] 9.0721s - 2.4087MB - Device(raspi4) = 0 - 6, Edge(vm2Core) = 7 - 11, Cloud(6700k(NoGPU)) = 12 - 25",
    "[4] 9.1209s - 2.4087MB - Device(raspi4) = 0 - 6, Edge(2500) = 7 - 11, Cloud(6700k(NoGPU)) = 12 - 25",
    "[5] 9.1511s - 3.2115MB - Device(raspi4) = 0 - 6, Edge(vm2Core) = 7 - 12, Cloud(6700k(GPU)) = 13 - 25",
]


def _popex(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "popex.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.mark.skipif(not HAVE_SCISSION, reason=SKIP_REASON)
def test_the_command_prints_scissions_published_readme_answer_exactly(tmp_path):
    done = _popex("predict", str(SCISSION), str(WIRELESS), "vgg19", "-d", "!-1", "-e", "10", "-c", "16",
                  "--plot", str(tmp_path / "best.png"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == SCISSION_README
    assert (tmp_path / "best.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not HAVE_SCISSION, reason=SKIP_REASON)
def test_json_holds_the_same_answers_and_their_parts(tmp_path):
    done = _popex("predict", str(SCISSION), str(WIRELESS), "vgg19", "-d", "!-1", "-e", "10", "-c", "16", "--json",
                  "--no-plot")
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)["results"]
    assert [round(r["latency_s"], 4) for r in results] == [9.0106, 9.0594, 9.0721, 9.1209, 9.1511]
    best = results[0]
    assert best["device"] == {"system": "raspi4", "first_layer": 0, "last_layer": 6,
                              "compute_s": pytest.approx(best["device"]["compute_s"])}
    assert (best["edge"]["system"], best["edge"]["first_layer"], best["cloud"]["last_layer"]) == ("vm2Core", 7, 25)
    total = best["device"]["compute_s"] + best["edge"]["compute_s"] + best["cloud"]["compute_s"] + best["transfer_s"]
    assert total == pytest.approx(best["latency_s"])
    assert round(best["upload_mb"], 4) == 2.4087


@pytest.mark.skipif(not HAVE_SCISSION, reason=SKIP_REASON)
def test_options_of_scission_narrow_the_answer():
    bench, net = load_benchmark_dir(SCISSION), load_network_csv(WIRELESS)
    fastest = predict(bench, net, Query(model="vgg19", n_results=1))[0]
    # wireless: 0.15 MB straight to the GPU cloud beats computing anything on the Pi
    assert (fastest.device.first_layer, fastest.edge.system, fastest.cloud.system) == (-1, None, "6700k(GPU)")
    assert fastest.upload_mb == pytest.approx(0.15)
    only_device = predict(bench, net, Query(model="vgg19", edge=parse_criteria("-1", tier="edge"),
                                            cloud=parse_criteria("-1", tier="cloud"), n_results=10))
    assert len(only_device) == 1 and only_device[0].upload_mb == 0 and only_device[0].transfer_s == 0
    small = predict(bench, net, Query(model="vgg19", device=TierCriteria(upload_limit_bytes=0.2e6), input_bytes=0.3e6,
                                      n_results=50))
    assert small and all(c.device.first_layer >= 0 for c in small)  # the 0.3 MB input cannot leave the device
    named = predict(bench, net, Query(model="vgg19", edge=parse_criteria("!vm2Core", tier="edge"), n_results=50))
    assert {c.edge.system for c in named} == {"2500"}
    capped = predict(bench, net, Query(model="vgg19", device=TierCriteria(time_limit_percent=0.0), n_results=50))
    assert all(c.device.compute_s == 0 for c in capped)
    assert predict(bench, net, Query(model="vgg19", device=parse_criteria("-1,!-1", tier="device"))) == []


def test_no_results_and_bad_queries_are_one_clear_line(tmp_path):
    write_system(tmp_path, "device", "pi", {"m": block_dicts([1.0, 2.0], [10, 5])})
    write_system(tmp_path, "cloud", "big", {"m": block_dicts([0.1, 0.2], [10, 5])})
    net = write_network(tmp_path / "net.csv", [("pi", "big", 10, 8)])
    done = _popex("predict", str(tmp_path), str(net), "m", "--device=-1,!-1", "--no-plot")
    assert (done.returncode, done.stdout) == (0, "No results for the specified configuration\n")
    done = _popex("predict", str(tmp_path), str(net), "nope")
    assert done.returncode == 2 and "no benchmark of model 'nope'" in done.stderr
    done = _popex("predict", str(tmp_path), str(net), "m", "-r", "0")
    assert done.returncode == 2 and "--result-count must be >= 1" in done.stderr
    done = _popex("predict", str(tmp_path), str(net), "m", "--edge-time", "soon")
    assert done.returncode == 2 and "--edge-time must be seconds" in done.stderr
    write_system(tmp_path, "edge", "vm", {"m": block_dicts([0.5, 0.5], [10, 5])})
    done = _popex("predict", str(tmp_path), str(net), "m", "-e", "!-1", "--no-plot")
    assert done.returncode == 2 and "net.csv has no row for pi -> vm" in done.stderr


def test_a_missing_pair_no_kept_configuration_needs_is_no_error(tmp_path):
    write_system(tmp_path, "device", "pi", {"m": block_dicts([1.0], [10])})
    write_system(tmp_path, "edge", "vm", {"m": block_dicts([1.0], [10])})
    bench = load_benchmark_dir(tmp_path)
    net = load_network_csv(write_network(tmp_path / "net.csv", [("x", "y", 1, 1)]))
    (only,) = predict(bench, net, Query(model="m", edge=parse_criteria("-1", tier="edge")))
    assert (only.device.last_layer, only.latency_s) == (0, pytest.approx(0.001))
    with pytest.raises(BenchmarkError, match="no row for pi -> vm"):
        predict(bench, net, Query(model="m"))


@pytest.mark.parametrize("n_blocks", [1, 2, 5, 25, 92])
def test_cuts_per_triple_are_l_plus_1_plus_l_times_l_plus_1_over_2(n_blocks):
    x, y = enumerate_cuts(n_blocks)
    assert len(x) == (n_blocks + 1) + n_blocks * (n_blocks + 1) // 2
    assert len(set(zip(x.tolist(), y.tolist()))) == len(x)


# --- an independent brute force, written from the definition, one configuration at a time ---

def _brute_force(systems: dict, hops: dict, query: Query, input_bytes: float) -> list[tuple[float, tuple]]:
    """Every configuration meeting ``query`` as (latency_s, key), by plain loops over systems and cuts."""
    devices = [s for s in systems if s[0] == "device"]
    edges = [s for s in systems if s[0] == "edge"] or [None]
    clouds = [s for s in systems if s[0] == "cloud"] or [None]
    n = len(next(iter(systems.values())))
    found = {}
    for d in devices:
        for e in edges:
            for c in clouds:
                for x in range(-1, n):
                    for y in [-1] + list(range(x + 1, n)):
                        dev = list(range(0, x + 1))
                        edg = list(range(x + 1, y + 1)) if y >= 0 else []
                        cld = list(range(max(x, y) + 1, n)) if (x != n - 1 and y != n - 1) else []
                        if (edg and e is None) or (cld and c is None):
                            continue
                        names = (d[1], e[1] if edg else None, c[1] if cld else None)
                        key = (names, tuple(dev[:1] + dev[-1:]), tuple(edg[:1] + edg[-1:]), tuple(cld[:1] + cld[-1:]))
                        parts = {"device": (dev, systems[d]), "edge": (edg, systems[e] if edg else None),
                                 "cloud": (cld, systems[c] if cld else None)}
                        seconds = {t: sum(parts[t][1][i][0] / 1000 for i in parts[t][0]) if parts[t][0] else 0.0
                                   for t in parts}
                        sent_dev = 0.0 if not (edg or cld) else (systems[d][x][1] if dev else input_bytes)
                        sent_edge = systems[e][y][1] if (edg and cld) else 0.0
                        transfer = 0.0
                        if edg:
                            transfer += hops[(names[0], names[1])][0] / 1000 + sent_dev / hops[(names[0], names[1])][1]
                            if cld:
                                transfer += (hops[(names[1], names[2])][0] / 1000
                                             + sent_edge / hops[(names[1], names[2])][1])
                        elif cld:
                            transfer += hops[(names[0], names[2])][0] / 1000 + sent_dev / hops[(names[0], names[2])][1]
                        total_compute = sum(seconds.values())
                        ok = True
                        for tier, idx, criteria, sent in (("device", dev, query.device, sent_dev),
                                                          ("edge", edg, query.edge, sent_edge),
                                                          ("cloud", cld, query.cloud, None)):
                            layers = set(range(idx[0], idx[-1] + 1)) if idx else {-1}  # layer i = block i here
                            system = names[("device", "edge", "cloud").index(tier)]
                            ok &= all(layer in layers for layer in criteria.layers_in)
                            ok &= all(layer not in layers for layer in criteria.layers_out)
                            if criteria.systems_in:
                                ok &= bool(idx) and system in criteria.systems_in
                            if criteria.systems_out:
                                ok &= bool(idx) and system not in criteria.systems_out
                            if criteria.upload_limit_bytes is not None and sent is not None:
                                ok &= sent <= criteria.upload_limit_bytes
                            if criteria.time_limit_s is not None:
                                ok &= seconds[tier] <= criteria.time_limit_s
                            if criteria.time_limit_percent is not None:
                                share = seconds[tier] / total_compute * 100 if total_compute else 0.0
                                ok &= share <= criteria.time_limit_percent
                        if ok:
                            found[key] = total_compute + transfer
    return sorted(((latency, key) for key, latency in found.items()), key=lambda item: item[0])


@st.composite
def _scenarios(draw):
    n = draw(st.integers(1, 6))
    names = {"device": draw(st.lists(st.sampled_from(["pi", "pi-2", "cam 1"]), min_size=1, max_size=2, unique=True)),
             "edge": draw(st.lists(st.sampled_from(["vm", "e-2"]), max_size=2, unique=True)),
             "cloud": draw(st.lists(st.sampled_from(["gpu", "cpu x"]), max_size=2, unique=True))}
    time_ms = st.one_of(st.just(0.0), st.floats(0.01, 500, allow_nan=False))
    systems = {(tier, name): [(draw(time_ms), draw(st.integers(0, 5_000_000))) for _ in range(n)]
               for tier, group in names.items() for name in group}
    out_bytes = [b for _, b in systems[next(iter(systems))]]  # one layout and output size per model, all systems
    systems = {key: [(t, out_bytes[i]) for i, (t, _) in enumerate(blocks)] for key, blocks in systems.items()}
    every = [name for group in names.values() for name in group]
    hops = {(a, b): (draw(st.floats(0, 200)), round(draw(st.floats(0.1, 100)) * 125_000)) for a in every for b in every
            if a != b}
    layer = st.integers(-1, n)

    def criteria(tier: str) -> TierCriteria:
        if draw(st.integers(0, 2)):  # two in three tiers unconstrained, so that most queries have answers
            return TierCriteria()
        maybe = st.booleans()
        return TierCriteria(
            layers_in=(draw(layer),) if draw(maybe) else (), layers_out=(draw(layer),) if draw(maybe) else (),
            systems_in=(draw(st.sampled_from(names[tier] or ["none"])),) if draw(maybe) else (),
            systems_out=(draw(st.sampled_from(names[tier] or ["none"])),) if draw(maybe) else (),
            time_limit_s=draw(st.floats(0, 2)) if draw(maybe) else None,
            time_limit_percent=draw(st.floats(0, 100)) if draw(maybe) else None,
            upload_limit_bytes=draw(st.sampled_from(out_bytes) | st.floats(0, 5e6)) if tier != "cloud" and draw(maybe) else None)

    query = Query(model="m", device=criteria("device"), edge=criteria("edge"), cloud=criteria("cloud"),
                  input_bytes=draw(st.floats(0, 1e6)), n_results=draw(st.integers(1, 400)))
    return systems, hops, query


@settings(max_examples=120, deadline=None)
@given(_scenarios())
def test_top_k_equals_an_independent_brute_force(tmp_path_factory, scenario):
    systems, hops, query = scenario
    directory = tmp_path_factory.mktemp("bench")
    for (tier, name), blocks in systems.items():
        write_system(directory, tier, name, {"m": block_dicts([t for t, _ in blocks], [b for _, b in blocks])})
    rows = [(a, b, ping, bytes_per_s / 125_000) for (a, b), (ping, bytes_per_s) in hops.items()]
    net = load_network_csv(write_network(directory / "net.csv", rows))
    hops = {pair: (hop.ping_ms, hop.bytes_per_s) for pair, hop in net.hops.items()}  # what the CSV round trip keeps
    expected = _brute_force(systems, hops, query, query.input_bytes)
    got = predict(load_benchmark_dir(directory), net, query)
    assert len(got) == min(query.n_results, len(expected))
    assert [c.latency_s for c in got] == pytest.approx([lat for lat, _ in expected[:len(got)]], rel=1e-9, abs=1e-12)
    by_key = dict((key, lat) for lat, key in expected)
    for config in got:
        key = ((config.device.system, config.edge.system, config.cloud.system),
               *[(p.first_block, p.last_block) if p.first_block >= 0 else () for p in (config.device, config.edge,
                                                                                         config.cloud)])
        assert key in by_key and by_key[key] == pytest.approx(config.latency_s, rel=1e-9, abs=1e-12)
        assert format_line(1, config).startswith("[1] ")
