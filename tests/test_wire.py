"""The edge <-> cloud wire format: round trips, sizes, and refusal of everything malformed."""

import io
import json
import pickle
import struct
import zlib

import pytest
import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_save

from popex.errors import ConfigError, PopexError
from popex.wire import (
    WIRE_DTYPES,
    OffloadRequest,
    UnsupportedEncodingError,
    WireError,
    compress_payload,
    decode_offload,
    decompress_payload,
    encode_offload,
)

MODEL_ID = "ab" * 32
HEADER_BOUND_BYTES = 320  # fixed cost of the safetensors header with our metadata


def _payload(tensor=None, **overrides):
    kwargs = {"model_id": MODEL_ID, "split": 2, "request_id": "req-1", "wire_dtype": "float32"}
    kwargs.update(overrides)
    return encode_offload(torch.randn(1, 16, 14, 14) if tensor is None else tensor, **kwargs)


def _metadata(**changes):
    metadata = {"popex_wire": "1", "model_id": MODEL_ID, "split": "2", "wire_dtype": "float32",
                "request_id": "req-1"}
    metadata.update(changes)
    return {key: value for key, value in metadata.items() if value is not None}


@pytest.mark.parametrize("wire_dtype", WIRE_DTYPES)
def test_round_trip_each_dtype(wire_dtype):
    torch.manual_seed(0)
    x = torch.randn(1, 16, 14, 14) * 3
    request = decode_offload(_payload(x, wire_dtype=wire_dtype, head="expert-a"))
    assert isinstance(request, OffloadRequest)
    assert (request.model_id, request.split, request.request_id, request.head) == (MODEL_ID, 2, "req-1", "expert-a")
    assert request.wire_dtype == wire_dtype
    assert request.tensor.dtype == np.float32 and request.tensor.shape == tuple(x.shape)
    if wire_dtype == "float32":
        assert np.array_equal(request.tensor, x.numpy())
    elif wire_dtype == "float16":
        assert np.allclose(request.tensor, x.numpy(), rtol=1e-3, atol=1e-3)
    else:
        step = x.abs().max() / 127
        assert np.abs(request.tensor - x.numpy()).max() <= step / 2 + 1e-6


def test_head_is_optional_and_int8_of_zeros_round_trips():
    request = decode_offload(_payload(torch.zeros(1, 3), wire_dtype="int8"))
    assert request.head is None
    assert np.array_equal(request.tensor, np.zeros((1, 3), np.float32))


def test_payload_bytes_close_to_raw_tensor_bytes():
    x = torch.randn(1, 32, 16, 16)  # e.g. a B-ResNet split tensor
    n_raw_bytes = x.numel() * 4
    sizes = {dtype: len(_payload(x, wire_dtype=dtype)) for dtype in WIRE_DTYPES}
    assert sizes["float32"] <= 1.01 * n_raw_bytes
    assert sizes["float16"] <= 0.51 * n_raw_bytes
    assert sizes["int8"] <= 0.26 * n_raw_bytes
    for dtype, n_bytes_per_value in (("float32", 4), ("float16", 2), ("int8", 1)):
        small = torch.randn(1, 16, 14, 14)
        assert len(_payload(small, wire_dtype=dtype)) - small.numel() * n_bytes_per_value <= HEADER_BOUND_BYTES
    assert decode_offload(_payload(x)).n_bytes == sizes["float32"]


def test_encode_refuses_bad_input():
    with pytest.raises(ConfigError, match="wire_dtype"):
        _payload(wire_dtype="bfloat16")
    with pytest.raises(WireError, match="NaN"):
        _payload(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(WireError, match="floating-point"):
        _payload(torch.ones(1, 3, dtype=torch.int64))
    with pytest.raises(WireError, match="batch"):
        _payload(torch.tensor(1.0))
    with pytest.raises(WireError, match="split"):
        _payload(split=-1)
    with pytest.raises(WireError, match="request_id"):
        _payload(request_id="")


def _pickled_tensor():
    buffer = io.BytesIO()
    torch.save(torch.ones(2), buffer)
    return buffer.getvalue()


MALFORMED = {
    "empty": b"",
    "random bytes": bytes(range(256)) * 4,
    "short": b"\x01\x02",
    "pickle of a tensor": pickle.dumps(torch.ones(1, 3)),
    "torch.save zip": _pickled_tensor(),
    "json list": json.dumps([[1.0, 2.0, 3.0]]).encode(),
    "header length beyond the end": struct.pack("<Q", 10**9) + b"{}",
    "header not json": struct.pack("<Q", 4) + b"nope",
    "header a list": struct.pack("<Q", 2) + b"[]",
    "wrong key": safetensors_save({"x": torch.ones(1, 3)}, metadata=_metadata()),
    "extra key": safetensors_save({"tensor": torch.ones(1, 3), "other": torch.ones(1)}, metadata=_metadata()),
    "no metadata": safetensors_save({"tensor": torch.ones(1, 3)}),
    "missing model_id": safetensors_save({"tensor": torch.ones(1, 3)}, metadata=_metadata(model_id=None)),
    "unexpected metadata": safetensors_save({"tensor": torch.ones(1, 3)}, metadata=_metadata(code="x")),
    "wrong version": safetensors_save({"tensor": torch.ones(1, 3)}, metadata=_metadata(popex_wire="2")),
    "unknown wire dtype": safetensors_save({"tensor": torch.ones(1, 3)}, metadata=_metadata(wire_dtype="f64")),
    "dtype mismatch": safetensors_save({"tensor": torch.ones(1, 3, dtype=torch.float16)}, metadata=_metadata()),
    "float64 tensor": safetensors_save({"tensor": torch.ones(1, 3, dtype=torch.float64)}, metadata=_metadata()),
    "split not an int": safetensors_save({"tensor": torch.ones(1, 3)}, metadata=_metadata(split="1.5")),
    "negative split": safetensors_save({"tensor": torch.ones(1, 3)}, metadata=_metadata(split="-1")),
    "empty request id": safetensors_save({"tensor": torch.ones(1, 3)}, metadata=_metadata(request_id="")),
    "nan": safetensors_save({"tensor": torch.tensor([[1.0, float("nan")]])}, metadata=_metadata()),
    "inf": safetensors_save({"tensor": torch.tensor([[float("inf")]])}, metadata=_metadata()),
    "scalar": safetensors_save({"tensor": torch.tensor(1.0)}, metadata=_metadata()),
    "zero-size": safetensors_save({"tensor": torch.ones(1, 0)}, metadata=_metadata()),
    "int8 without scale": safetensors_save({"tensor": torch.ones(1, 3, dtype=torch.int8)},
                                           metadata=_metadata(wire_dtype="int8")),
    "int8 bad scale": safetensors_save({"tensor": torch.ones(1, 3, dtype=torch.int8)},
                                       metadata=_metadata(wire_dtype="int8", scale="nan")),
    "scale on float32": safetensors_save({"tensor": torch.ones(1, 3)}, metadata=_metadata(scale="1.0")),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_payloads_raise_wire_error(name):
    with pytest.raises(WireError) as info:
        decode_offload(MALFORMED[name])
    assert info.value.code == "bad_tensor" and isinstance(info.value, PopexError)


def test_pickle_is_named_never_read():
    with pytest.raises(WireError, match="pickle"):
        decode_offload(pickle.dumps(torch.ones(1, 3)))
    with pytest.raises(WireError, match="JSON"):
        decode_offload(json.dumps([[1.0]]).encode())


def test_oversized_and_non_bytes_bodies():
    payload = _payload()
    with pytest.raises(WireError, match="at most"):
        decode_offload(payload, max_bytes=len(payload) - 1)
    assert decode_offload(bytearray(payload), max_bytes=len(payload)).split == 2
    with pytest.raises(WireError):
        decode_offload("not bytes")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes_only_raise_wire_error(data):
    try:
        decode_offload(data)
    except WireError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512), st.integers(0, 600))
def test_fuzz_corrupted_payloads_only_raise_wire_error(noise, position):
    payload = bytearray(_payload(torch.ones(1, 4)))
    position = min(position, len(payload))
    corrupted = bytes(payload[:position]) + noise + bytes(payload[position + len(noise):])
    try:
        request = decode_offload(corrupted)
    except WireError:
        return
    assert request.tensor.dtype == np.float32 and np.isfinite(request.tensor).all()


_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=8))
_dims = st.lists(st.one_of(st.integers(-2, 2**40), _json_scalars), max_size=9)


@st.composite
def _headers(draw):
    """safetensors-shaped headers with hostile shapes, offsets, dtypes and metadata."""
    metadata = draw(st.one_of(
        st.just(_metadata()),
        st.dictionaries(st.sampled_from(["popex_wire", "model_id", "split", "wire_dtype", "request_id", "scale",
                                         "head", "x"]), st.one_of(st.text(max_size=6), _json_scalars)),
        _json_scalars,
    ))
    entry = {"dtype": draw(st.sampled_from(["F32", "F16", "I8", "F64", "BOOL", "XX", 3])),
             "shape": draw(_dims), "data_offsets": draw(st.lists(st.integers(-1, 2**66), max_size=3))}
    header = {draw(st.sampled_from(["tensor", "other"])): entry, "__metadata__": metadata}
    return json.dumps(header).encode(), draw(st.binary(max_size=64))


@settings(max_examples=400, deadline=None)
@given(_headers())
def test_fuzz_hostile_headers_only_raise_wire_error(header_and_body):
    header, body = header_and_body
    try:
        decode_offload(struct.pack("<Q", len(header)) + header + body)
    except WireError:
        pass


# -- deflate on the HTTP hop ---------------------------------------------------------


@pytest.mark.parametrize("wire_dtype", WIRE_DTYPES)
def test_deflate_round_trip_shrinks_relu_activations(wire_dtype):
    torch.manual_seed(0)
    x = torch.relu(torch.randn(1, 32, 7, 7))  # half zeros, like a feature map after ReLU
    payload = _payload(x, wire_dtype=wire_dtype)
    body = compress_payload(payload)
    assert body is not None and len(body) < 0.9 * len(payload)
    restored = decode_offload(decompress_payload(body, encoding="deflate"))
    assert np.array_equal(restored.tensor, decode_offload(payload).tensor)


def test_compress_gives_up_when_it_does_not_help():
    assert compress_payload(bytes(range(256))) is None


@pytest.mark.parametrize("encoding", [None, "identity", "IDENTITY"])
def test_identity_bodies_pass_through(encoding):
    payload = _payload()
    assert decompress_payload(payload, encoding=encoding) == payload


@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate, gzip", "x" * 500])
def test_other_encodings_are_refused_with_415(encoding):
    with pytest.raises(UnsupportedEncodingError) as info:
        decompress_payload(_payload(), encoding=encoding)
    assert info.value.http_status == 415 and len(str(info.value)) < 200


def test_inflating_stops_at_the_limit():
    bomb = zlib.compress(bytes(50 * 2**20), 9)  # 50 MB of zeros in ~50 KB
    with pytest.raises(WireError, match="limit"):
        decompress_payload(bomb, encoding="deflate", max_bytes=2**20)


@pytest.mark.parametrize("body", [b"", b"not zlib at all", None])
def test_broken_deflate_bodies_are_wire_errors(body):
    if body is None:  # truncated stream
        body = zlib.compress(_payload())[:-20]
    with pytest.raises(WireError):
        decompress_payload(body, encoding="deflate")
