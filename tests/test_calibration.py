"""Calibration arrays: validation, save/load round trip, hostile files."""

import io
import pickle
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popex.decision.calibration import Calibration, load_calibration, save_calibration
from popex.errors import CalibrationError


def _arrays(n_samples=6, n_exits=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n_samples)
    predicted = rng.integers(0, 4, (n_samples, n_exits))
    return {
        "confidence": rng.random((n_samples, n_exits)).astype(np.float32),
        "predicted": predicted,
        "correct": predicted == labels[:, None],
        "labels": labels,
        "temperature": rng.uniform(0.5, 2.0, n_exits).astype(np.float32),
    }


def _write_npz(path, **arrays):
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def test_properties_and_dtypes():
    raw = _arrays(n_samples=5, n_exits=4)
    raw["confidence"] = raw["confidence"].astype(np.float64)
    raw["predicted"] = raw["predicted"].astype(np.int32)
    raw["correct"] = raw["correct"].astype(np.uint8)
    cal = Calibration(**raw, confidence_method="entropy")
    assert (cal.n_samples, cal.n_exits, cal.n_branches) == (5, 4, 3)
    assert cal.confidence.dtype == np.float32
    assert cal.predicted.dtype == np.int64
    assert cal.correct.dtype == np.bool_
    assert cal.labels.dtype == np.int64
    assert cal.temperature.dtype == np.float32
    assert not cal.confidence.flags.writeable
    np.testing.assert_array_equal(cal.correct, raw["predicted"] == raw["labels"][:, None])


def test_arrays_are_copied():
    raw = _arrays()
    cal = Calibration(**raw)
    raw["confidence"][0, 0] = 0.123
    assert cal.confidence[0, 0] != np.float32(0.123)


@settings(max_examples=25, deadline=None)
@given(
    n_samples=st.integers(1, 50),
    n_exits=st.integers(1, 5),
    seed=st.integers(0, 2**32 - 1),
    method=st.sampled_from(["max_softmax", "entropy"]),
)
def test_save_load_round_trip(tmp_path_factory, n_samples, n_exits, seed, method):
    cal = Calibration(**_arrays(n_samples, n_exits, seed), confidence_method=method)
    path = tmp_path_factory.mktemp("cal") / "calibration.bin"
    save_calibration(cal, path)
    assert path.exists()  # written at exactly that path, no ".npz" appended
    loaded = load_calibration(path)
    for name in ("confidence", "predicted", "correct", "labels", "temperature"):
        original, restored = getattr(cal, name), getattr(loaded, name)
        assert restored.dtype == original.dtype, name
        np.testing.assert_array_equal(restored, original, err_msg=name)
    assert loaded.confidence_method == method


def test_saved_file_loads_without_pickle(tmp_path):
    path = tmp_path / "c.npz"
    save_calibration(Calibration(**_arrays()), path)
    with np.load(path, allow_pickle=False) as archive:
        assert archive["confidence_method"].dtype.kind == "U"
        assert archive["confidence_method"].shape == ()


def test_pickle_file_is_rejected(tmp_path):
    path = tmp_path / "evil.npz"
    with open(path, "wb") as handle:
        pickle.dump(_arrays(), handle)
    with pytest.raises(CalibrationError, match="pickle") as info:
        load_calibration(path)
    assert info.value.__cause__ is not None


def test_object_array_is_rejected(tmp_path):
    raw = _arrays()
    raw["confidence"] = raw["confidence"].astype(object)
    path = tmp_path / "object.npz"
    _write_npz(path, **raw, confidence_method=np.array("max_softmax"))
    with pytest.raises(CalibrationError, match="holds Python objects"):
        load_calibration(path)  # refused from its header, before numpy would unpickle or allocate


def test_a_header_declaring_more_than_the_member_holds_is_refused_before_allocation(tmp_path):
    """An .npy member declaring (2**40, 3) float64 (24 TiB) in 100 bytes: a CalibrationError, not a MemoryError."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (2**40, 3)})
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("confidence.npy", header.getvalue() + bytes(48))
    with pytest.raises(CalibrationError, match=r"declares shape \(1099511627776, 3\).*holds 48 bytes"):
        load_calibration(path)


@pytest.mark.parametrize("missing", ["confidence", "labels", "confidence_method"])
def test_missing_key_is_named(tmp_path, missing):
    raw = {**_arrays(), "confidence_method": np.array("max_softmax")}
    del raw[missing]
    path = tmp_path / "c.npz"
    _write_npz(path, **raw)
    with pytest.raises(CalibrationError, match=missing):
        load_calibration(path)


@pytest.mark.parametrize(
    "name, value, shape_text",
    [
        ("predicted", np.zeros((6, 2), dtype=np.int64), r"\(6, 2\)"),
        ("labels", np.zeros(5, dtype=np.int64), r"\(5,\)"),
        ("temperature", np.ones(4, dtype=np.float32), r"\(4,\)"),
    ],
)
def test_mismatched_shapes_name_the_shapes(tmp_path, name, value, shape_text):
    raw = {**_arrays(), "confidence_method": np.array("max_softmax")}
    raw[name] = value
    if name in ("predicted", "labels"):
        raw["correct"] = np.zeros((6, 3), dtype=bool)
    path = tmp_path / "c.npz"
    _write_npz(path, **raw)
    with pytest.raises(CalibrationError, match=shape_text):
        load_calibration(path)


@pytest.mark.parametrize(
    "content", [b"", b"not an archive at all", b"PK\x03\x04garbage-zip"]
)
def test_unreadable_files(tmp_path, content):
    path = tmp_path / "bad.npz"
    path.write_bytes(content)
    with pytest.raises(CalibrationError):
        load_calibration(path)


def test_single_npy_array_is_rejected(tmp_path):
    path = tmp_path / "single.npy"
    np.save(path, np.zeros((3, 2)))
    with pytest.raises(CalibrationError, match="npz"):
        load_calibration(path)


def test_missing_file(tmp_path):
    with pytest.raises(CalibrationError, match="not found"):
        load_calibration(tmp_path / "nope.npz")


def test_bad_confidence_method_in_file(tmp_path):
    path = tmp_path / "c.npz"
    _write_npz(path, **_arrays(), confidence_method=np.array(3))
    with pytest.raises(CalibrationError, match="confidence_method"):
        load_calibration(path)


def test_zip_member_that_is_not_npy(tmp_path):
    path = tmp_path / "c.npz"
    _write_npz(path, **_arrays(), confidence_method=np.array("max_softmax"))
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("extra.txt", "ignored")
    assert load_calibration(path).n_exits == 3


@pytest.mark.parametrize(
    "change, pattern",
    [
        ({"confidence": np.full((6, 3), 1.5)}, r"\[0, 1\]"),
        ({"confidence": np.full((6, 3), -0.1)}, r"\[0, 1\]"),
        ({"confidence": np.full((6, 3), np.nan)}, "NaN"),
        ({"confidence": np.zeros(6)}, "n_samples, n_exits"),
        ({"predicted": np.zeros((6, 3))}, "integers"),
        ({"correct": np.full((6, 3), 2)}, "boolean"),
        ({"temperature": np.zeros(3)}, "> 0"),
        ({"confidence_method": "softmax"}, "softmax"),
    ],
)
def test_constructor_rejects(change, pattern):
    raw = _arrays()
    if "predicted" in change:
        raw["correct"] = raw["labels"][:, None] == 0
    with pytest.raises(CalibrationError, match=pattern):
        Calibration(**{**raw, **change})


def test_correct_must_match_predictions():
    raw = _arrays()
    raw["correct"] = ~raw["correct"]
    with pytest.raises(CalibrationError, match="disagrees"):
        Calibration(**raw)


def test_save_rejects_non_calibration(tmp_path):
    with pytest.raises(CalibrationError):
        save_calibration(_arrays(), tmp_path / "c.npz")
