"""Benchmark the per-offload overhead O of the wire format against JSON lists.

For each split s in 0..N-1 of a model, the real tensor at that split is sent
N times to a real cloud process on loopback (``run_cloud.sh``, gunicorn, no
link shaping) as a safetensors payload in fp32, fp16 and int8, and, in the
same run, each also deflated (``Content-Encoding: deflate``), and as a JSON
list (``tensor.tolist()``) to a baseline endpoint defined
here (served by the same gunicorn setup) that parses it back with
``torch.tensor`` and runs the same stages.

Per request, with ``cloud_ms`` the server's decode + compute time::

    overhead_ms = encode_ms + (round_trip_ms - cloud_ms) + decode_ms

where ``encode_ms`` is measured on the client, ``round_trip_ms`` around the
HTTP call, and ``decode_ms`` is the median time of the same decoding in
this process (the server's own decode is inside ``cloud_ms``). That is the
O of DESIGN.md §3: serialisation + HTTP + deserialisation, without compute.
Bytes on the wire are compared with the raw fp32 tensor bytes.

Usage::

    .venv/bin/python benchmarks/transport.py [--model-dir models/default] [--n-requests 200] [--json]

The tensors come from the first 50 images of the shipped test subset, so
deflate sees real activations (a random tensor would not compress).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout

import requests  # noqa: E402

from popex.nets import EarlyExitNet, LoadedModel, load_model, weights_to_bytes, zoo_spec  # noqa: E402
from popex.nets.io import SPEC_FILE, WEIGHTS_FILE, compute_model_id  # noqa: E402
from popex.edge.cloud_port import CloudClient  # noqa: E402
from popex.testbed.services import service_environ  # noqa: E402
from popex.data.idx import load_fashion_mnist  # noqa: E402
from popex.data.preprocess import Preprocessing, preprocess  # noqa: E402
from popex.wire import (  # noqa: E402
    WIRE_DTYPES,
    compress_payload,
    decode_offload,
    decompress_payload,
    encode_offload,
)

TARGETS = {"overhead_p50_ms": 3.0, "fp32_bytes_ratio": 1.01, "fp16_bytes_ratio": 0.51}
STARTUP_S = 120.0
TIMEOUT_S = 30.0
N_WARMUP = 10
JSON_MODEL_DIR_ENV = "POPEX_BENCH_MODEL_DIR"
DEFAULT_IMAGES = REPO / "data" / "fashion-mnist-test-subset"
N_IMAGES = 50


# -- the JSON-list baseline endpoint (served by gunicorn from this file) ----------------


def create_json_app():
    """A tiny Flask app: POST /infer_json with {"split", "tensor": nested lists}; only for this benchmark."""
    from flask import Flask, jsonify, request

    loaded = load_model(os.environ[JSON_MODEL_DIR_ENV])
    app = Flask(__name__)

    @app.post("/infer_json")
    def infer_json():
        start_s = time.perf_counter()
        body = request.get_json()
        x = torch.tensor(body["tensor"], dtype=torch.float32)
        with torch.inference_mode():
            logits = loaded.net.run_stages(x, start=int(body["split"]))
            confidence, label = torch.softmax(logits, dim=1).max(dim=1)
        return jsonify({"label": int(label[0]), "confidence": float(confidence[0]),
                        "cloud_ms": (time.perf_counter() - start_s) * 1000.0})

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok"})

    return app


# -- processes -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gunicorn() -> list[str]:
    gunicorn = Path(sys.executable).with_name("gunicorn")
    command = [str(gunicorn) if gunicorn.exists() else "gunicorn"]
    if "--no-control-socket" in subprocess.run(command + ["--help"], capture_output=True, text=True).stdout:
        command.append("--no-control-socket")
    return command


class _Server:
    def __init__(self, command: list[str], url: str, env: dict[str, str], log_path: Path) -> None:
        self.url = url
        self._log = open(log_path, "wb")
        self.log_path = log_path
        self.process = subprocess.Popen(command, cwd=REPO, env=service_environ(env), stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self) -> None:
        deadline_s = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline_s and self.process.poll() is None:
            try:
                if requests.get(f"{self.url}/healthz", timeout=1).ok:
                    return
            except requests.RequestException:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not start:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


# -- measurement -----------------------------------------------------------------------


@dataclass
class Row:
    split: int
    shape: list[int]
    encoding: str
    raw_fp32_bytes: int
    wire_bytes: int
    bytes_ratio: float
    encode_ms_p50: float
    decode_ms_p50: float
    http_ms_p50: float
    overhead_ms_p50: float
    overhead_ms_p95: float


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _median_ms(fn, n_repeats: int) -> float:
    times_ms = []
    for _ in range(n_repeats):
        start_s = time.perf_counter()
        fn()
        times_ms.append((time.perf_counter() - start_s) * 1000.0)
    return statistics.median(times_ms)


def _row(split: int, h: torch.Tensor, encoding: str, n_bytes: int, encode_ms: list[float], http_ms: list[float],
         decode_ms: float) -> Row:
    raw = h.numel() * 4
    overhead_ms = [e + t + decode_ms for e, t in zip(encode_ms, http_ms)]
    return Row(split=split, shape=list(h.shape[1:]), encoding=encoding, raw_fp32_bytes=raw, wire_bytes=n_bytes,
               bytes_ratio=n_bytes / raw, encode_ms_p50=statistics.median(encode_ms), decode_ms_p50=decode_ms,
               http_ms_p50=statistics.median(http_ms), overhead_ms_p50=statistics.median(overhead_ms),
               overhead_ms_p95=_percentile(overhead_ms, 0.95))


class _Variant:
    """One way of sending a split's tensors; ``send(i)`` does request i and keeps its timings."""

    def __init__(self, encoding: str, send_one) -> None:
        self.encoding = encoding
        self._send_one = send_one
        self.encode_ms: list[float] = []
        self.http_ms: list[float] = []
        self.n_bytes: list[int] = []
        self.last_body = b""
        self.last_encoding: str | None = None

    def send(self, i: int, *, record: bool) -> None:
        encode_ms, http_ms, body, encoding = self._send_one(i)
        self.last_body, self.last_encoding = body, encoding
        if record:
            self.encode_ms.append(encode_ms)
            self.http_ms.append(http_ms)
            self.n_bytes.append(len(body))


def _wire_variant(client: CloudClient, loaded: LoadedModel, split: int, hs: torch.Tensor, wire_dtype: str,
                  deflate: bool) -> _Variant:
    encoding = "deflate" if deflate else None

    def send_one(i: int) -> tuple[float, float, bytes, str | None]:
        h = hs[i % len(hs)].unsqueeze(0)
        start_s = time.perf_counter()
        body = encode_offload(h, model_id=loaded.model_id, split=split, request_id=f"bench-{i}",
                              wire_dtype=wire_dtype)
        sent_encoding = None
        if deflate:
            compressed = compress_payload(body)
            if compressed is not None:
                body, sent_encoding = compressed, encoding
        encoded_s = time.perf_counter()
        reply = client.infer(body, timeout_s=TIMEOUT_S, content_encoding=sent_encoding)
        return (encoded_s - start_s) * 1000.0, reply.round_trip_ms - reply.cloud_ms, body, sent_encoding

    return _Variant(wire_dtype + ("+deflate" if deflate else ""), send_one)


def _json_variant(session: requests.Session, url: str, split: int, hs: torch.Tensor) -> _Variant:
    def send_one(i: int) -> tuple[float, float, bytes, str | None]:
        h = hs[i % len(hs)].unsqueeze(0)
        start_s = time.perf_counter()
        body = json.dumps({"split": split, "request_id": f"bench-{i}", "tensor": h.tolist()}).encode()
        encoded_s = time.perf_counter()
        response = session.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=TIMEOUT_S)
        reply = response.json()
        return (encoded_s - start_s) * 1000.0, (time.perf_counter() - encoded_s) * 1000.0 - reply["cloud_ms"], body, None

    return _Variant("json", send_one)


def _measure_split(variants: list[_Variant], split: int, hs: torch.Tensor, n_requests: int) -> list[Row]:
    """Every variant's request i back to back, for i in turn: all of them see the same machine state."""
    for i in range(N_WARMUP + n_requests):
        for variant in variants:
            variant.send(i, record=i >= N_WARMUP)
    rows = []
    for variant in variants:
        body, encoding = variant.last_body, variant.last_encoding
        if variant.encoding == "json":
            decode_ms = _median_ms(lambda: torch.tensor(json.loads(body)["tensor"], dtype=torch.float32), 50)
        else:
            decode_ms = _median_ms(lambda: decode_offload(decompress_payload(body, encoding=encoding)), 50)
        rows.append(_row(split, hs[:1], variant.encoding, int(statistics.median(variant.n_bytes)), variant.encode_ms,
                         variant.http_ms, decode_ms))
    return rows


def _measure_floor(client: CloudClient, n_requests: int) -> dict[str, float]:
    """Round trip of an empty probe: what HTTP alone costs on this machine, for reading the rows."""
    round_trip_ms = [client.probe(0, timeout_s=TIMEOUT_S).round_trip_ms for _ in range(N_WARMUP + n_requests)]
    round_trip_ms = round_trip_ms[N_WARMUP:]
    return {"p50_ms": statistics.median(round_trip_ms), "p95_ms": _percentile(round_trip_ms, 0.95),
            "min_ms": min(round_trip_ms)}


def _load(model_dir: Path) -> tuple[LoadedModel, str]:
    if model_dir.is_dir():
        return load_model(model_dir), f"{model_dir} (trained weights)"
    torch.manual_seed(0)
    spec = zoo_spec("b-alexnet", width=0.5)
    net = EarlyExitNet(spec).eval()
    weights_bytes = weights_to_bytes(net)
    loaded = LoadedModel(net=net, spec=spec, model_id=compute_model_id(spec, weights_bytes),
                         weights_bytes=weights_bytes)
    return loaded, f"{model_dir} does not exist: zoo b-alexnet (width 0.5) with random weights"


def _images(loaded: LoadedModel, images_dir: Path) -> torch.Tensor:
    """The model's inputs for the first test images (real activations: what compression sees)."""
    dataset = load_fashion_mnist(images_dir, split="test")
    images = dataset.images[:N_IMAGES]
    return torch.from_numpy(preprocess(images, Preprocessing.from_spec_dict(loaded.spec), is_batch=True))


def run(model_dir: Path, n_requests: int, images_dir: Path = DEFAULT_IMAGES) -> dict:
    # As the edge does for batch-1 work. With torch's default pool, its OpenMP threads spin on the
    # second core after every torch op here and slow the cloud process each request waits for:
    # the empty-POST floor was 4.2 ms p50 that way, 1.35 ms with this.
    torch.set_num_threads(1)
    loaded, model_note = _load(model_dir)
    net = loaded.net
    spec_bytes = json.dumps(loaded.spec).encode()
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="popex-transport-") as tmp:
        tmp_dir = Path(tmp)
        (tmp_dir / "model").mkdir()
        (tmp_dir / "model" / SPEC_FILE).write_bytes(spec_bytes)
        (tmp_dir / "model" / WEIGHTS_FILE).write_bytes(loaded.weights_bytes)
        cloud_port, json_port = _free_port(), _free_port()
        servers = [
            _Server([str(REPO / "run_cloud.sh"), "--port", str(cloud_port), "--state-dir", str(tmp_dir / "state"),
                     "--threads", "4"], f"http://127.0.0.1:{cloud_port}",
                    {"POPEX_TOKEN": token, "POPEX_CLOUD_CONFIG": str(REPO / "configs" / "cloud.yaml")},
                    tmp_dir / "cloud.log"),
            _Server(_gunicorn() + ["--bind", f"127.0.0.1:{json_port}", "--worker-class", "gthread", "--workers", "1",
                                   "--threads", "4", "--keep-alive", "30", "--pythonpath", f"{REPO / 'benchmarks'},{REPO}",
                                   "transport:create_json_app()"],
                    f"http://127.0.0.1:{json_port}", {JSON_MODEL_DIR_ENV: str(tmp_dir / "model")},
                    tmp_dir / "json.log"),
        ]
        try:
            for server in servers:
                server.wait_ready()
            rows = []
            with CloudClient(servers[0].url, token=token) as client, requests.Session() as session:
                session.trust_env = False  # as CloudClient does: no per-request proxy/netrc lookups
                client.put_model(loaded.model_id, spec_bytes, loaded.weights_bytes, timeout_s=TIMEOUT_S)
                floor = _measure_floor(client, n_requests)
                x = _images(loaded, images_dir)
                for split in range(net.n_stages):
                    with torch.inference_mode():
                        hs = net.run_stages(x, stop=split).clone()
                    variants = [_wire_variant(client, loaded, split, hs, wire_dtype, deflate)
                                for wire_dtype in WIRE_DTYPES for deflate in (False, True)]
                    rows.extend(_measure_split(variants, split, hs, n_requests))
                    # JSON on its own: interleaved, its 4-10 ms of parsing in another process slows the others
                    json_variant = _json_variant(session, f"{servers[1].url}/infer_json", split, hs)
                    rows.extend(_measure_split([json_variant], split, hs, n_requests))
                    print(f"split {split} done", file=sys.stderr)
        finally:
            for server in servers:
                server.stop()
    return {"model": model_note, "model_id": loaded.model_id, "n_requests": n_requests,
            "http_floor_ms": floor, "targets": TARGETS, "rows": [asdict(row) for row in rows]}


def _print_table(result: dict) -> None:
    print(f"model: {result['model']}")
    print(f"{result['n_requests']} requests per row on loopback; overhead = encode + (round trip - cloud_ms) + decode")
    header = (f"{'split':>5} {'shape':>12} {'enc':>7} {'bytes':>8} {'x raw':>6} {'enc ms':>7} {'dec ms':>7} "
              f"{'http ms':>8} {'O p50':>7} {'O p95':>7}")
    print(header)
    print("-" * len(header))
    rows = result["rows"]
    for row in rows:
        print(f"{row['split']:>5} {'x'.join(map(str, row['shape'])):>12} {row['encoding']:>7} {row['wire_bytes']:>8} "
              f"{row['bytes_ratio']:>6.3f} {row['encode_ms_p50']:>7.3f} {row['decode_ms_p50']:>7.3f} "
              f"{row['http_ms_p50']:>8.3f} {row['overhead_ms_p50']:>7.3f} {row['overhead_ms_p95']:>7.3f}")
    floor = result["http_floor_ms"]
    print(f"\nHTTP floor on this machine (empty POST /probe round trip): p50 {floor['p50_ms']:.3f} ms, "
          f"p95 {floor['p95_ms']:.3f} ms, min {floor['min_ms']:.3f} ms")
    print()
    print("ratios ours / JSON (same split): overhead p50, bytes")
    by_key = {(row["split"], row["encoding"]): row for row in rows}
    encodings = [row["encoding"] for row in rows if row["split"] == rows[0]["split"] and row["encoding"] != "json"]
    for split in sorted({row["split"] for row in rows}):
        json_row = by_key[(split, "json")]
        parts = [f"{name}: {by_key[(split, name)]['overhead_ms_p50'] / json_row['overhead_ms_p50']:.2f}x time, "
                 f"{by_key[(split, name)]['wire_bytes'] / json_row['wire_bytes']:.3f}x bytes" for name in encodings]
        print(f"  split {split}: " + "; ".join(parts))
    print()
    for deflate in ("", "+deflate"):
        ours = [row for row in rows if row["encoding"] in {dtype + deflate for dtype in WIRE_DTYPES}]
        worst_p50 = max(row["overhead_ms_p50"] for row in ours)
        fp32_ratio = max(row["bytes_ratio"] for row in ours if row["encoding"] == "float32" + deflate)
        fp16_ratio = max(row["bytes_ratio"] for row in ours if row["encoding"] == "float16" + deflate)
        print(f"targets{deflate or ' (no compression)'}: overhead p50 <= {TARGETS['overhead_p50_ms']} ms "
              f"(worst split: {worst_p50:.3f}); fp32 bytes <= {TARGETS['fp32_bytes_ratio']}x raw "
              f"(worst: {fp32_ratio:.3f}x); fp16 <= {TARGETS['fp16_bytes_ratio']}x (worst: {fp16_ratio:.3f}x)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "b-alexnet")
    parser.add_argument("--n-requests", type=int, default=200, help="timed requests per split and encoding")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES,
                        help="Fashion-MNIST folder whose first test images make the tensors (default: the shipped "
                             "subset)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    args = parser.parse_args(argv)
    if args.n_requests < 1:
        parser.error("--n-requests must be >= 1")
    result = run(args.model_dir, args.n_requests, args.images)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
