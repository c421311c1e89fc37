"""Soak: real edge and cloud processes under 8 client threads for 2 minutes, bad inputs and a slow client mixed in.

The acceptance of issue 15: no 5xx, no request left unanswered, and the
services' resident memory and open file descriptors flat (the medians of the
last and the first 30 s after a warm-up within 10%). Also the edge's memory
high-water mark when 4 clients send large images at once, just under and
over ``max_image_pixels`` (the figure in README's security section).
Numbers are printed (``pytest -s``).
"""

from __future__ import annotations

import os
import random
import socket
import statistics
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import requests

from popex.data import encode_png
from popex.wire import encode_offload
from test_slow_clients import _default_model, services  # noqa: F401  (the module's real edge and cloud)

pytestmark = pytest.mark.slow

SOAK_S = 120.0
WARMUP_S = 20.0
N_CLIENTS = 8
SAMPLE_EVERY_S = 2.0
FLAT_FRACTION = 0.10
WINDOW_S = 30.0
_TIMEOUT_S = 30.0
_RNG = np.random.default_rng(0)
GOOD_PNG = encode_png(_RNG.integers(0, 256, (28, 28), dtype=np.uint8))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` 8-bit grey and carries a few rows: refused from its header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    rows = zlib.compress(bytes(width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _footprint(service) -> tuple[float, int]:
    """(resident MB, open fds) of every process of a service (run_*.sh, gunicorn, its worker)."""
    rss_kb, n_fds = 0, 0
    for pid in service.pids():
        try:
            rss_kb += _status_kb(pid, "VmRSS")
            n_fds += len(os.listdir(f"/proc/{pid}/fd"))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return rss_kb / 1024.0, n_fds


def _requests(services) -> list[tuple[str, float, dict]]:
    """(name, weight, requests.request keyword arguments): the mix each client draws from."""
    edge, cloud, token = services["edge"], services["cloud"], services["token"]
    model = _default_model(edge)
    png = {"Content-Type": "image/png"}
    payload = encode_offload(np.zeros((1, *model["input_shape"]), np.float32) if "input_shape" in model
                             else np.zeros((1, 1, 28, 28), np.float32), model_id=model["model_id"], split=0,
                             request_id="soak")
    cloud_auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}
    classify = edge.url + "/api/v1/classify"
    return [
        ("classify", 40, dict(method="POST", url=classify + "?deadline_ms=200", data=GOOD_PNG, headers=png)),
        ("classify cloud-only", 8, dict(method="POST", url=classify + "?policy=cloud-only&deadline_ms=500",
                                        data=GOOD_PNG, headers=png)),
        ("batch", 4, dict(method="POST", url=classify + "/batch",
                          files=[("images", ("a.png", GOOD_PNG)), ("images", ("b.png", GOOD_PNG))])),
        ("not an image", 4, dict(method="POST", url=classify, data=b"\x00" * 500, headers=png)),
        ("truncated png", 4, dict(method="POST", url=classify, data=GOOD_PNG[:60], headers=png)),
        ("empty body", 2, dict(method="POST", url=classify, data=b"", headers=png)),
        ("too many pixels", 3, dict(method="POST", url=classify, data=_png_header_only(8192, 8192), headers=png)),
        ("bad deadline", 2, dict(method="POST", url=classify + "?deadline_ms=nan", data=GOOD_PNG, headers=png)),
        ("unknown model", 2, dict(method="POST", url=classify + "?model=nope", data=GOOD_PNG, headers=png)),
        ("json body", 2, dict(method="POST", url=classify, data=b'{"a": 1}', headers={"Content-Type":
                                                                                     "application/json"})),
        ("unauthenticated write", 2, dict(method="POST", url=edge.url + "/api/v1/models", files={"spec": b"{}"})),
        ("deep json", 2, dict(method="PUT", url=edge.url + "/api/v1/admin/link", data=b"[" * 2000 + b"]" * 2000,
                              headers={**edge.admin_headers(), "Content-Type": "application/json"})),
        ("status", 4, dict(method="GET", url=edge.url + "/api/v1/status")),
        ("strategies", 2, dict(method="GET", url=f"{edge.url}/api/v1/models/{model['model_id']}/strategies"
                                                 "?limit=50")),
        ("cloud offload", 8, dict(method="POST", url=cloud.url + "/api/v1/infer", data=payload, headers=cloud_auth)),
        ("cloud bad token", 2, dict(method="POST", url=cloud.url + "/api/v1/infer", data=payload,
                                    headers={"Authorization": "Bearer wrong-token-0000"})),
        ("cloud garbage", 2, dict(method="POST", url=cloud.url + "/api/v1/infer", data=os.urandom(300),
                                  headers=cloud_auth)),
    ]


def _slow_client(urls: list[str], stop: threading.Event, held: list[int]) -> None:
    """One client that opens a connection, sends half its headers and stalls, over and over."""
    while not stop.is_set():
        for url in urls:
            host, port = url.removeprefix("http://").split(":")
            try:
                sock = socket.create_connection((host, int(port)), timeout=5)
                sock.sendall(b"POST /api/v1/classify HTTP/1.1\r\nHost: x\r\nContent-Le")
                held.append(1)
                stop.wait(3.0)
                sock.close()
            except OSError:
                continue


def test_eight_clients_for_two_minutes_no_5xx_none_unanswered_memory_and_fds_flat(services):
    mix = _requests(services)
    names, weights = [m[0] for m in mix], [m[1] for m in mix]
    by_name = {m[0]: m[2] for m in mix}
    outcomes: Counter[tuple[str, str]] = Counter()
    lock = threading.Lock()
    stop = threading.Event()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            name = rng.choices(names, weights)[0]
            try:
                status = str(requests.request(timeout=_TIMEOUT_S, **by_name[name]).status_code)
            except requests.RequestException as err:
                status = type(err).__name__
            with lock:
                outcomes[(name, status)] += 1

    held: list[int] = []
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(N_CLIENTS)]
    threads.append(threading.Thread(target=_slow_client, daemon=True,
                                    args=([services["edge"].url, services["cloud"].url], stop, held)))
    for thread in threads:
        thread.start()
    samples: list[tuple[float, float, int, float, int]] = []  # t, edge MB, edge fds, cloud MB, cloud fds
    started_s = time.monotonic()
    while (elapsed_s := time.monotonic() - started_s) < WARMUP_S + SOAK_S:
        if elapsed_s >= WARMUP_S:
            samples.append((elapsed_s - WARMUP_S, *_footprint(services["edge"]), *_footprint(services["cloud"])))
        time.sleep(SAMPLE_EVERY_S)
    stop.set()
    for thread in threads:
        thread.join(timeout=_TIMEOUT_S + 5)

    total = sum(outcomes.values())
    statuses = Counter(status for (_, status), n in outcomes.items() for _ in range(n))
    first = [s for s in samples if s[0] < WINDOW_S]
    last = [s for s in samples if s[0] >= SOAK_S - WINDOW_S]
    medians = {label: (statistics.median(s[i] for s in first), statistics.median(s[i] for s in last))
               for i, label in ((1, "edge MB"), (2, "edge fds"), (3, "cloud MB"), (4, "cloud fds"))}
    print(f"\nsoak: {total} requests in {SOAK_S + WARMUP_S:.0f} s by {N_CLIENTS} clients "
          f"(+ {len(held)} stalled connections); statuses {dict(statuses)}")
    for label, (before, after) in medians.items():
        print(f"soak: {label}: first {WINDOW_S:.0f} s median {before:.1f}, last {WINDOW_S:.0f} s median {after:.1f} "
              f"({(after - before) / before:+.1%}); max {max(s[list(medians).index(label) + 1] for s in samples):.1f}")
    unanswered = {k: n for k, n in outcomes.items() if not k[1].isdigit()}
    server_errors = {k: n for k, n in outcomes.items() if k[1].isdigit() and int(k[1]) >= 500}
    assert not server_errors, server_errors
    assert not unanswered, unanswered
    assert outcomes[("classify", "200")] > 100 and outcomes[("cloud offload", "200")] > 10, outcomes
    for label, (before, after) in medians.items():
        assert abs(after - before) <= FLAT_FRACTION * before, (label, before, after)


def test_the_edge_memory_high_water_with_four_clients_sending_large_images(services):
    """4 clients, each sending a just-under-cap image (2048 x 2048, 4 MP of noise) and an over-cap one (8192 x 8192
    declared): the under-cap ones are answered, the over-cap ones are 400, and the edge's peak RSS is printed."""
    edge = services["edge"]
    under = encode_png(_RNG.integers(0, 256, (2048, 2048), dtype=np.uint8))
    over = _png_header_only(8192, 8192)
    worker_pids = edge.pids()
    before_mb = max(_status_kb(pid, "VmHWM") for pid in worker_pids) / 1024
    statuses: list[tuple[str, int]] = []

    def client() -> None:
        for _ in range(5):
            for name, body in (("under", under), ("over", over)):
                response = requests.post(edge.url + "/api/v1/classify?deadline_ms=5000", data=body,
                                         headers={"Content-Type": "image/png"}, timeout=120)
                statuses.append((name, response.status_code))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    after_mb = max(_status_kb(pid, "VmHWM") for pid in worker_pids) / 1024
    rss_mb = max(_status_kb(pid, "VmRSS") for pid in worker_pids) / 1024
    print(f"\nlarge images: {len(under):,}-byte 2048x2048 PNG and {len(over):,}-byte 8192x8192 header; edge worker "
          f"VmHWM {before_mb:.1f} MB before, {after_mb:.1f} MB after (+{after_mb - before_mb:.1f} MB); "
          f"VmRSS after {rss_mb:.1f} MB")
    assert sorted(set(statuses)) == [("over", 400), ("under", 200)], Counter(statuses)
    assert after_mb - before_mb < 512  # generous: 4 decodes of 4 MP are ~16 MB of pixels
