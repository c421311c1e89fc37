"""Benchmark and network files: what loads, and every bad file refused with a message naming it."""

from __future__ import annotations

import json
import pickle

import pytest

from popex.errors import BenchmarkError
from popex.tiers.benchmark_file import (BenchmarkSet, load_benchmark_dir, load_benchmark_file, parse_benchmark,
                                        write_benchmark_file)
from popex.tiers.network import load_network_csv, parse_network_csv
from tests.tiers_data import HAVE_SCISSION, SCISSION, SKIP_REASON, block_dicts, write_network, write_system


def _bench(directory, **kwargs) -> BenchmarkSet:
    write_system(directory, "device", "pi-4 b", {"m": block_dicts([1.0, 2.0], [10, 5])}, **kwargs)
    return load_benchmark_dir(directory)


def test_a_valid_file_loads_with_names_holding_dashes_and_spaces(tmp_path):
    bench = _bench(tmp_path, input_bytes=300)
    (system,) = bench.systems
    assert (system.tier, system.system) == ("device", "pi-4 b")
    model = system.models["m"]
    assert model.input_bytes == 300 and model.layout == ((0, 0), (1, 1))
    assert [b.time_ms for b in model.blocks] == [1.0, 2.0]


def test_write_then_load_is_the_same_benchmark(tmp_path):
    original = load_benchmark_file(write_system(tmp_path, "edge", "vm", {"m": block_dicts([0.5], [7])},
                                                input_bytes=9))
    again = load_benchmark_file(write_benchmark_file(original, tmp_path / "copy" / "edge-vm.json"))
    assert again.models == original.models and (again.tier, again.system) == ("edge", "vm")


@pytest.mark.skipif(not HAVE_SCISSION, reason=SKIP_REASON)
def test_scissions_published_data_loads():
    bench = load_benchmark_dir(SCISSION)
    assert sorted((s.tier, s.system) for s in bench.systems) == [
        ("cloud", "6700k(GPU)"), ("cloud", "6700k(NoGPU)"), ("device", "raspi4"), ("edge", "2500"), ("edge", "vm2Core")]
    assert len(bench.model_names()) == 18
    assert max(len(s.models[m].blocks) for s in bench.systems for m in s.models) == 92  # mobilenet


def test_a_pickle_is_refused_unread_even_named_json(tmp_path):
    # Scission's .dat files and its fork's pickled proxies: the bytes are recognised, never unpickled.
    payload = pickle.dumps({"vgg19": [object.__name__]})
    for name in ("device-raspi4.dat", "device-raspi4.json"):
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(BenchmarkError, match=f"{name}: is a Python pickle: refused, never unpickled"):
            load_benchmark_dir(tmp_path)
        path.unlink()


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(format="scission/0"), "format: must be 'popex-benchmark/1', got 'scission/0'"),
    (lambda d: d.update(tier="phone"), "tier: must be one of device, edge, cloud, got 'phone'"),
    (lambda d: d["models"]["m"]["blocks"][1].update(time_ms=-1.0), r"blocks\[1\].time_ms: must be a finite non-neg"),
    (lambda d: d["models"]["m"]["blocks"][0].update(output_bytes=-5), r"blocks\[0\].output_bytes: must be a non-neg"),
    (lambda d: d["models"]["m"]["blocks"][1].update(input_layer=3, output_layer=3), "not contiguous: block 0 ends at "
                                                                                     "layer 0, block 1 starts at 3"),
    (lambda d: d["models"]["m"]["blocks"][1].update(input_layer=1, output_layer=0), "layer range 1..0 decreases"),
    (lambda d: d["models"]["m"]["blocks"][0].update(time_s=1), "unknown time_s"),
    (lambda d: d["models"]["m"].update(blocks=[]), "must be a non-empty list"),
    (lambda d: d.update(system="a,b"), "system: must be a printable name without commas"),
])
def test_bad_files_are_refused_naming_file_and_place(tmp_path, mutate, message):
    body = {"format": "popex-benchmark/1", "tier": "edge", "system": "vm",
            "models": {"m": {"blocks": block_dicts([1.0, 2.0], [10, 5])}}}
    mutate(body)
    path = tmp_path / "edge-vm.json"
    path.write_text(json.dumps(body))
    with pytest.raises(BenchmarkError, match=f"edge-vm.json: .*{message}"):
        load_benchmark_file(path)


def test_nan_and_non_json_are_refused(tmp_path):
    with pytest.raises(BenchmarkError, match="time_ms: must be a finite"):
        parse_benchmark(b'{"format": "popex-benchmark/1", "tier": "edge", "system": "v", "models": {"m": {"blocks": '
                        b'[{"input_layer": 0, "output_layer": 0, "time_ms": NaN, "output_bytes": 1}]}}}')
    with pytest.raises(BenchmarkError, match="x.json: is not popex-benchmark/1 JSON"):
        parse_benchmark(b"source,destination\n", source="x.json")


def test_two_systems_with_different_layouts_for_a_model_are_refused_naming_both(tmp_path):
    write_system(tmp_path, "device", "pi", {"m": block_dicts([1.0, 2.0], [10, 5])})
    write_system(tmp_path, "edge", "vm", {"m": block_dicts([1.0, 2.0], [10, 5], layers=[(0, 1), (2, 2)])})
    with pytest.raises(BenchmarkError, match=r"device-pi.json and edge-vm.json disagree on the block layout of model "
                                             r"'m' \(block 0 covers layers 0..0 vs 0..1\)"):
        load_benchmark_dir(tmp_path)
    write_system(tmp_path, "edge", "vm", {"m": block_dicts([1.0], [10])})
    with pytest.raises(BenchmarkError, match=r"\(2 vs 1 blocks\)"):
        load_benchmark_dir(tmp_path)


def test_one_system_twice_and_an_empty_directory_are_refused(tmp_path):
    with pytest.raises(BenchmarkError, match="no benchmark files"):
        load_benchmark_dir(tmp_path)
    write_system(tmp_path, "edge", "vm", {"m": block_dicts([1.0], [1])})
    write_system(tmp_path, "edge", "vm", {"m": block_dicts([1.0], [1])}, filename="edge-vm-again.json")
    with pytest.raises(BenchmarkError, match="edge-vm-again.json and edge-vm.json both benchmark the edge system 'vm'"):
        load_benchmark_dir(tmp_path)


def test_network_file_with_leading_spaces_loads_and_a_missing_pair_is_named(tmp_path):
    net = load_network_csv(write_network(tmp_path / "net.csv", [("raspi4", "6700k(GPU)", 100, 1.6)]))
    hop = net.hop("raspi4", "6700k(GPU)")
    assert (hop.ping_ms, hop.bandwidth_mbps, hop.bytes_per_s) == (100.0, 1.6, 200_000)
    with pytest.raises(BenchmarkError, match=r"net.csv has no row for raspi4 -> vm2Core, which this query needs"):
        net.hop("raspi4", "vm2Core")


@pytest.mark.parametrize("text, message", [
    ("src,dst,ping,bw\n", "the header must be source,destination,ping"),
    ("source,destination,ping(ms),bandwidth(mbps)\na,b,1\n", "line 2 must have 4 fields"),
    ("source,destination,ping(ms),bandwidth(mbps)\na,b,x,1\n", "line 2: ping and bandwidth must be numbers"),
    ("source,destination,ping(ms),bandwidth(mbps)\na,b,1,0\n", "bandwidth > 0"),
    ("source,destination,ping(ms),bandwidth(mbps)\na,b,-1,2\n", "ping must be >= 0"),
    ("source,destination,ping(ms),bandwidth(mbps)\na,b,1,2\na,b,1,2\n", "line 3: the pair a -> b is given twice"),
])
def test_bad_network_files_are_refused(text, message):
    with pytest.raises(BenchmarkError, match=message):
        parse_network_csv(text, source="n.csv")


def test_a_pickled_network_file_is_refused(tmp_path):
    (tmp_path / "n.csv").write_bytes(pickle.dumps([("a", "b", 1, 2)]))
    with pytest.raises(BenchmarkError, match="n.csv: is a Python pickle"):
        load_network_csv(tmp_path / "n.csv")
