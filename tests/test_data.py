"""Tests for popex.data: readers on files written here, safe decoding, preprocessing, the shipped subset."""

import gzip
import shutil
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from popex.data import (
    CIFAR10_CLASSES,
    FASHION_MNIST_CLASSES,
    Dataset,
    Preprocessing,
    decode_image,
    encode_png,
    load_cifar10_binary,
    load_fashion_mnist,
    load_image_folder,
    preprocess,
    read_idx,
    read_image_header,
    write_idx,
)
from popex.data import images as images_module
from popex.data.subset import (
    SHIPPED_SUBSET_ROOT,
    default_test_set,
    load_subset_indices,
    main as subset_main,
    stratified_indices,
    write_fashion_mnist_subset,
)
from popex.errors import DataError, SpecError

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
HAS_DEBIAN = (DEBIAN_ROOT / "t10k-images-idx3-ubyte.gz").is_file()


# ---------------------------------------------------------------- helpers


def _rng(seed=0):
    return np.random.default_rng(seed)


def _png_chunk(chunk_type: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + chunk_type + payload + struct.pack(">I", zlib.crc32(chunk_type + payload))


def _handmade_png(width_px: int, height_px: int) -> bytes:
    """A PNG whose header declares width x height RGB, with a tiny (bogus) IDAT."""
    ihdr = struct.pack(">IIBBBBB", width_px, height_px, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + _png_chunk(b"IEND", b"")
    )


def _jpeg_bytes(image_rgb: np.ndarray, quality: int = 95) -> bytes:
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return encoded.tobytes()


def _write_fashion_split(root: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    prefix = "train" if split == "train" else "t10k"
    write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
    write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels.astype(np.uint8))


@pytest.fixture
def small_fashion_root(tmp_path):
    """Fake Fashion-MNIST: 30 test images (3 per class) and 20 train images."""
    rng = _rng(1)
    test_labels = np.repeat(np.arange(10), 3)
    rng.shuffle(test_labels)
    _write_fashion_split(tmp_path, "test", rng.integers(0, 256, (30, 28, 28), dtype=np.uint8), test_labels)
    _write_fashion_split(tmp_path, "train", rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), np.arange(20) % 10)
    return tmp_path


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("name", ["x-idx3-ubyte.gz", "x-idx3-ubyte"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, name, dtype):
    array = (_rng().standard_normal((3, 4, 5)) * 100).astype(dtype)
    write_idx(tmp_path / name, array)
    raw = (tmp_path / name).read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == name.endswith(".gz")
    back = read_idx(tmp_path / name)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    np.testing.assert_array_equal(back, array)


def test_idx_header_is_big_endian(tmp_path):
    write_idx(tmp_path / "a", np.array([1, 256], dtype=np.int32))
    assert (tmp_path / "a").read_bytes() == bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 2) + struct.pack(">ii", 1, 256)


def test_idx_gzip_detected_by_magic_not_name(tmp_path):
    write_idx(tmp_path / "a.gz", np.arange(10, dtype=np.uint8))
    (tmp_path / "a.gz").rename(tmp_path / "plain-name")
    np.testing.assert_array_equal(read_idx(tmp_path / "plain-name"), np.arange(10))


def test_idx_gzip_is_deterministic(tmp_path):
    write_idx(tmp_path / "a.gz", np.arange(10, dtype=np.uint8))
    write_idx(tmp_path / "b.gz", np.arange(10, dtype=np.uint8))
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()


@pytest.mark.parametrize("n_cut_bytes", [1, 100, 110])
def test_idx_truncated_plain(tmp_path, n_cut_bytes):
    write_idx(tmp_path / "a", np.zeros((10, 10), np.uint8))
    raw = (tmp_path / "a").read_bytes()
    (tmp_path / "a").write_bytes(raw[:-n_cut_bytes])
    with pytest.raises(DataError, match="truncated") as info:
        read_idx(tmp_path / "a")
    assert str(tmp_path / "a") in str(info.value)


def test_idx_truncated_gzip(tmp_path):
    write_idx(tmp_path / "a.gz", _rng().integers(0, 256, (50, 50), dtype=np.uint8))
    raw = (tmp_path / "a.gz").read_bytes()
    (tmp_path / "a.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="gzip"):
        read_idx(tmp_path / "a.gz")


def test_idx_complete_gzip_of_truncated_idx(tmp_path):
    write_idx(tmp_path / "a", np.zeros((10, 10), np.uint8))
    (tmp_path / "b.gz").write_bytes(gzip.compress((tmp_path / "a").read_bytes()[:-5]))
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "b.gz")


def test_idx_trailing_bytes(tmp_path):
    write_idx(tmp_path / "a", np.zeros(4, np.uint8))
    (tmp_path / "a").write_bytes((tmp_path / "a").read_bytes() + b"\x00")
    with pytest.raises(DataError, match="longer than its header"):
        read_idx(tmp_path / "a")


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"\x01\x00\x08\x01", "magic"),
        (b"PK\x03\x04", "magic"),
        (b"\x00\x00\x07\x01", "dtype code"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (b"\x00\x00", "too short"),
        (b"\x00\x00\x08\x03\x00\x00", "header alone"),
    ],
)
def test_idx_bad_header(tmp_path, header, message):
    (tmp_path / "bad").write_bytes(header)
    with pytest.raises(DataError, match=message):
        read_idx(tmp_path / "bad")


def test_idx_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_idx(tmp_path / "nope.gz")


@pytest.mark.parametrize("array", [np.zeros(3, np.int64), np.zeros(3, np.float16), np.zeros(3, bool), np.uint8(3)])
def test_write_idx_rejects_unsupported(tmp_path, array):
    with pytest.raises(DataError):
        write_idx(tmp_path / "a", array)


def test_load_fashion_mnist(small_fashion_root):
    test = load_fashion_mnist(small_fashion_root, split="test")
    train = load_fashion_mnist(small_fashion_root, split="train")
    assert (len(test), len(train)) == (30, 20)
    assert test.images.shape == (30, 28, 28) and test.images.dtype == np.uint8
    assert test.labels.dtype == np.int64
    assert test.class_names == FASHION_MNIST_CLASSES and len(FASHION_MNIST_CLASSES) == 10
    assert FASHION_MNIST_CLASSES[0] == "T-shirt/top" and FASHION_MNIST_CLASSES[9] == "Ankle boot"
    np.testing.assert_array_equal(train.labels, np.arange(20) % 10)


def test_load_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(DataError) as info:
        load_fashion_mnist(tmp_path, split="test")
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message and "--data-root" in message
    assert "t10k-images-idx3-ubyte.gz" in message


def test_load_fashion_mnist_bad_split(small_fashion_root):
    with pytest.raises(DataError, match="split"):
        load_fashion_mnist(small_fashion_root, split="val")


def test_load_fashion_mnist_inconsistent(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((5, 28, 28), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))
    with pytest.raises(DataError, match="5 images .* 4 labels"):
        load_fashion_mnist(tmp_path, split="test")
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(5, 10, np.uint8))
    with pytest.raises(DataError, match="label 10"):
        load_fashion_mnist(tmp_path, split="test")


# ---------------------------------------------------------------- Dataset


def _toy_dataset(n=20):
    images = np.arange(n, dtype=np.uint8)[:, None, None] * np.ones((1, 2, 3), np.uint8)
    return Dataset(images, np.arange(n) % 4, ("a", "b", "c", "d"))


def test_dataset_validates():
    with pytest.raises(DataError, match="uint8"):
        Dataset(np.zeros((2, 3, 3), np.float32), np.zeros(2, np.int64), ("a",))
    with pytest.raises(DataError, match="2 images but 3 labels"):
        Dataset(np.zeros((2, 3, 3), np.uint8), np.zeros(3, np.int64), ("a",))
    with pytest.raises(DataError, match="0..1"):
        Dataset(np.zeros((2, 3, 3), np.uint8), np.array([0, 2]), ("a", "b"))
    with pytest.raises(DataError, match="class_names"):
        Dataset(np.zeros((2, 3, 3), np.uint8), np.zeros(2, np.int64), ())


def test_dataset_normalises_labels_and_names():
    ds = Dataset(np.zeros((2, 3, 3), np.uint8), np.array([0, 1], np.uint8), ["a", "b"])
    assert ds.labels.dtype == np.int64 and ds.class_names == ("a", "b") and len(ds) == 2


def test_split_holdout_deterministic_disjoint_complete():
    ds = _toy_dataset(20)
    split = ds.split_holdout(0.25, seed=3)
    again = ds.split_holdout(0.25, seed=3)
    other = ds.split_holdout(0.25, seed=4)
    assert (len(split.train), len(split.val)) == (15, 5)
    train_ids, val_ids = split.train.images[:, 0, 0], split.val.images[:, 0, 0]
    assert set(train_ids).isdisjoint(val_ids) and sorted([*train_ids, *val_ids]) == list(range(20))
    np.testing.assert_array_equal(split.val.images, again.val.images)
    assert not np.array_equal(split.val.images, other.val.images)
    np.testing.assert_array_equal(split.val.labels, split.val.images[:, 0, 0] % 4)  # labels follow images


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, 0.01])
def test_split_holdout_rejects(fraction):
    with pytest.raises(DataError, match="fraction"):
        _toy_dataset(20).split_holdout(fraction, seed=0)


def test_subset():
    ds = _toy_dataset(10)
    sub = ds.subset([7, 2])
    np.testing.assert_array_equal(sub.images[:, 0, 0], [7, 2])
    np.testing.assert_array_equal(sub.labels, [3, 2])
    mask = np.zeros(10, bool)
    mask[[1, 5]] = True
    np.testing.assert_array_equal(ds.subset(mask).images[:, 0, 0], [1, 5])
    assert len(ds.subset([])) == 0
    with pytest.raises(DataError, match="0..9"):
        ds.subset([10])
    with pytest.raises(DataError, match="0..9"):
        ds.subset([-1])
    with pytest.raises(DataError, match="mask"):
        ds.subset(np.ones(3, bool))


# ---------------------------------------------------------------- ImageFolder


@pytest.fixture
def image_folder(tmp_path):
    """root/{bird,cat}: three 8x6 images each, PNG and JPEG, plus a stray text file."""
    root = tmp_path / "folder"
    colours_bgr = {"cat": (0, 0, 255), "bird": (255, 0, 0)}  # cat red, bird blue
    for name, bgr in colours_bgr.items():
        (root / name).mkdir(parents=True)
        image = np.empty((8, 6, 3), np.uint8)
        image[:] = bgr
        cv2.imwrite(str(root / name / "a.png"), image)
        cv2.imwrite(str(root / name / "b.JPG"), image, [cv2.IMWRITE_JPEG_QUALITY, 100])
        cv2.imwrite(str(root / name / "c.bmp"), image)
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_colour(image_folder):
    ds = load_image_folder(image_folder)
    assert ds.class_names == ("bird", "cat")
    assert ds.images.shape == (6, 8, 6, 3)
    np.testing.assert_array_equal(ds.labels, [0, 0, 0, 1, 1, 1])
    mean_rgb = ds.images.reshape(6, -1, 3).mean(axis=1)
    np.testing.assert_allclose(mean_rgb[:3], [[0, 0, 255]] * 3, atol=3)  # bird blue, in RGB order
    np.testing.assert_allclose(mean_rgb[3:], [[255, 0, 0]] * 3, atol=3)


def test_image_folder_classes_sorted(tmp_path):
    names = ["zebra", "Yak", "moth", "cat", "bird", "ant", "10", "2"]
    for name in names:  # created in an unsorted order
        (tmp_path / name).mkdir()
        cv2.imwrite(str(tmp_path / name / "x.png"), np.full((2, 2), len(name), np.uint8))
    (tmp_path / ".hidden").mkdir()
    ds = load_image_folder(tmp_path, channels=1)
    assert ds.class_names == tuple(sorted(names))
    np.testing.assert_array_equal(ds.images[:, 0, 0], [len(n) for n in sorted(names)])


def test_image_folder_gray_and_resize(image_folder):
    ds = load_image_folder(image_folder, channels=1, size_hw=(4, 5))
    assert ds.images.shape == (6, 4, 5)
    # cv2 gray of pure red is 76, of pure blue 29
    np.testing.assert_allclose(ds.images[3:].mean(axis=(1, 2)), 76, atol=2)
    np.testing.assert_allclose(ds.images[:3].mean(axis=(1, 2)), 29, atol=2)


def test_image_folder_mixed_sizes_need_resize(image_folder):
    cv2.imwrite(str(image_folder / "cat" / "d.png"), np.zeros((9, 9, 3), np.uint8))
    with pytest.raises(DataError, match="size_hw"):
        load_image_folder(image_folder)
    assert load_image_folder(image_folder, size_hw=(8, 6)).images.shape == (7, 8, 6, 3)


@pytest.mark.parametrize("content", [b"garbage, not a png", b""])
def test_image_folder_corrupt_file_named(image_folder, content):
    bad = image_folder / "cat" / "broken.png"
    bad.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_image_folder(image_folder)
    assert str(bad) in str(info.value)
    assert isinstance(info.value.__cause__, DataError)


def test_image_folder_truncated_jpeg_named(image_folder):
    good = (image_folder / "cat" / "b.JPG").read_bytes()
    (image_folder / "cat" / "b.JPG").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="b.JPG"):
        load_image_folder(image_folder)


def test_image_folder_structure_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(DataError, match="no class subfolders"):
        load_image_folder(tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="empty_class"):
        load_image_folder(tmp_path)
    with pytest.raises(DataError, match="channels"):
        load_image_folder(tmp_path, channels=2)


# ---------------------------------------------------------------- CIFAR-10


def _cifar_records(labels, rng):
    images_chw = rng.integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8)
    records = np.concatenate([np.asarray(labels, np.uint8)[:, None], images_chw.reshape(len(labels), -1)], axis=1)
    return records.tobytes(), images_chw


@pytest.fixture
def cifar_root(tmp_path):
    root = tmp_path / "cifar-10-batches-bin"
    root.mkdir()
    rng = _rng(2)
    expected = {}
    for i in range(1, 6):
        raw, chw = _cifar_records([i, 9 - i], rng)
        (root / f"data_batch_{i}.bin").write_bytes(raw)
        expected[f"data_batch_{i}"] = chw
    raw, chw = _cifar_records([0, 3, 9], rng)
    (root / "test_batch.bin").write_bytes(raw)
    expected["test"] = chw
    return root, expected


def test_cifar_binary(cifar_root):
    root, expected = cifar_root
    test = load_cifar10_binary(root, split="test")
    assert test.images.shape == (3, 32, 32, 3) and test.images.dtype == np.uint8
    np.testing.assert_array_equal(test.labels, [0, 3, 9])
    assert test.class_names == CIFAR10_CLASSES
    chw = expected["test"]
    # pixel (y=5, x=7) of image 1 is (R, G, B) from the three planes
    np.testing.assert_array_equal(test.images[1, 5, 7], chw[1, :, 5, 7])
    np.testing.assert_array_equal(test.images, chw.transpose(0, 2, 3, 1))
    train = load_cifar10_binary(root.parent, split="train")  # the folder holding cifar-10-batches-bin works too
    assert len(train) == 10
    np.testing.assert_array_equal(train.labels, [1, 8, 2, 7, 3, 6, 4, 5, 5, 4])
    np.testing.assert_array_equal(train.images[8:], expected["data_batch_5"].transpose(0, 2, 3, 1))


def test_cifar_class_names_from_meta(cifar_root):
    root, _ = cifar_root
    (root / "batches.meta.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n\n")
    assert load_cifar10_binary(root, split="test").class_names[3] == "c3"


@pytest.mark.parametrize("n_cut_bytes", [1, 3072, 3073 + 5])
def test_cifar_wrong_length(cifar_root, n_cut_bytes):
    root, _ = cifar_root
    raw = (root / "test_batch.bin").read_bytes()
    (root / "test_batch.bin").write_bytes(raw[:-n_cut_bytes])
    with pytest.raises(DataError, match="test_batch.bin .*3073"):
        load_cifar10_binary(root, split="test")


def test_cifar_errors(cifar_root):
    root, _ = cifar_root
    (root / "data_batch_3.bin").unlink()
    with pytest.raises(DataError, match="data_batch_3.bin"):
        load_cifar10_binary(root, split="train")
    with pytest.raises(DataError, match="split"):
        load_cifar10_binary(root, split="validation")
    raw, _ = _cifar_records([10], _rng())
    (root / "test_batch.bin").write_bytes(raw)
    with pytest.raises(DataError, match="label 10"):
        load_cifar10_binary(root, split="test")


# ---------------------------------------------------------------- decode_image


def test_decode_png_rgb_exact():
    image = _rng().integers(0, 256, (7, 5, 3), dtype=np.uint8)
    decoded = decode_image(encode_png(image))
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, image)


def test_decode_png_grayscale():
    image = _rng().integers(0, 256, (7, 5), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(encode_png(image)), image)
    np.testing.assert_array_equal(decode_image(encode_png(image), channels=3), np.repeat(image[..., None], 3, axis=2))


def test_decode_png_rgba_drops_alpha():
    image = _rng().integers(0, 256, (6, 4, 4), dtype=np.uint8)
    decoded = decode_image(encode_png(image))
    assert decoded.shape == (6, 4, 3)
    np.testing.assert_array_equal(decoded, image[..., :3])


def test_decode_jpeg_rgb_order_and_gray():
    image = np.zeros((16, 16, 3), np.uint8)
    image[..., 0] = 200  # red
    data = _jpeg_bytes(image)
    assert read_image_header(data).format == "jpeg"
    decoded = decode_image(bytearray(data))
    assert decoded.shape == (16, 16, 3)
    np.testing.assert_allclose(decoded.reshape(-1, 3).mean(axis=0), [200, 0, 0], atol=4)
    gray = decode_image(data, channels=1)
    assert gray.shape == (16, 16)
    np.testing.assert_allclose(gray.mean(), 0.299 * 200, atol=4)


def test_decode_bmp_and_truncated_bmp():
    image = _rng().integers(0, 256, (5, 7, 3), dtype=np.uint8)
    ok, encoded = cv2.imencode(".bmp", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    data = encoded.tobytes()
    np.testing.assert_array_equal(decode_image(data), image)
    with pytest.raises(DataError, match="truncated BMP"):
        decode_image(data[:-10])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"hello, this is text", "not a supported image"),
        (b"GIF89a\x01\x00\x01\x00", "not a supported image"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "truncated PNG"),
        (b"\xff\xd8\xff", "truncated JPEG"),
    ],
)
def test_decode_rejects_junk(data, message):
    with pytest.raises(DataError, match=message):
        decode_image(data)


def test_decode_rejects_non_bytes():
    with pytest.raises(DataError, match="bytes"):
        decode_image("a string")  # type: ignore[arg-type]


@pytest.mark.parametrize("keep_fraction", [0.5, 0.9])
def test_decode_truncated_png(keep_fraction):
    data = encode_png(_rng().integers(0, 256, (32, 32, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="truncated PNG"):
        decode_image(data[: int(len(data) * keep_fraction)])


def test_decode_png_missing_iend_or_bad_crc():
    data = encode_png(_rng().integers(0, 256, (8, 8), dtype=np.uint8))
    with pytest.raises(DataError, match="truncated PNG"):
        decode_image(data[:-12])  # exactly the IEND chunk removed
    corrupt = bytearray(data)
    corrupt[45] ^= 0xFF  # a byte inside IDAT
    with pytest.raises(DataError, match="checksum"):
        decode_image(bytes(corrupt))


@pytest.mark.parametrize("keep_fraction", [0.3, 0.6, 0.95])
def test_decode_truncated_jpeg(keep_fraction):
    data = _jpeg_bytes(_rng().integers(0, 256, (64, 64, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="JPEG"):
        decode_image(data[: int(len(data) * keep_fraction)])


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_truncation_caught_even_if_decoder_returns_partial_image(monkeypatch, fmt):
    """Some libjpeg/libpng builds fill a cut-off image with grey instead of failing."""
    image = _rng().integers(0, 256, (32, 32, 3), dtype=np.uint8)
    data = encode_png(image) if fmt == "png" else _jpeg_bytes(image)
    monkeypatch.setattr(images_module.cv2, "imdecode", lambda buf, flags: np.zeros((32, 32, 3), np.uint8))
    assert decode_image(data).shape == (32, 32, 3)  # the stub decodes complete data
    with pytest.raises(DataError, match=f"truncated {fmt.upper()}"):
        decode_image(data[: len(data) * 3 // 4])


def test_decoder_failure_becomes_data_error(monkeypatch):
    data = encode_png(np.zeros((4, 4), np.uint8))
    monkeypatch.setattr(images_module.cv2, "imdecode", lambda buf, flags: None)
    with pytest.raises(DataError, match="could not be decoded"):
        decode_image(data)
    monkeypatch.setattr(images_module.cv2, "imdecode", lambda buf, flags: np.zeros((3, 4), np.uint8))
    with pytest.raises(DataError, match="header declares 4x4"):
        decode_image(data)


def test_decode_jpeg_with_trailing_bytes_after_eoi():
    data = _jpeg_bytes(np.full((8, 8, 3), 90, np.uint8)) + b"\x00\x00trailer"
    assert decode_image(data).shape == (8, 8, 3)


def test_decode_huge_png_header_rejected_before_decoding(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("cv2.imdecode must not be reached")

    monkeypatch.setattr(images_module.cv2, "imdecode", fail)
    data = _handmade_png(20_000, 20_000)
    assert len(data) < 100
    assert read_image_header(data).n_pixels == 400_000_000
    with pytest.raises(DataError, match=r"20000x20000 = 400000000 pixels, the limit is 16777216"):
        decode_image(data)


def test_decode_huge_jpeg_header_rejected():
    data = bytearray(_jpeg_bytes(np.zeros((8, 8, 3), np.uint8)))
    sof = data.find(b"\xff\xc0")
    assert sof > 0
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60_000, 60_000)  # height, width
    with pytest.raises(DataError, match="too large.*60000x60000"):
        decode_image(bytes(data))


def test_decode_max_pixels_is_a_parameter():
    data = encode_png(np.zeros((10, 10), np.uint8))
    assert decode_image(data, max_pixels=100).shape == (10, 10)
    with pytest.raises(DataError, match="too large"):
        decode_image(data, max_pixels=99)


def test_decode_zero_size_header():
    with pytest.raises(DataError, match="empty image"):
        decode_image(_handmade_png(0, 5))


def test_encode_png_rejects_bad_input():
    with pytest.raises(DataError, match="uint8"):
        encode_png(np.zeros((2, 2), np.float32))
    with pytest.raises(DataError, match="shape"):
        encode_png(np.zeros((2, 2, 2), np.uint8))


# ---------------------------------------------------------------- preprocessing

GRAY = Preprocessing((1, 28, 28), mean=(0.25,), std=(0.5,))
RGB = Preprocessing((3, 8, 8), mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))


def test_preprocess_single_gray_normalisation():
    image = np.zeros((28, 28), np.uint8)
    image[0, 0], image[0, 1] = 255, 51
    x = preprocess(image, GRAY)
    assert x.shape == (1, 1, 28, 28) and x.dtype == np.float32
    assert x[0, 0, 0, 0] == pytest.approx((1 - 0.25) / 0.5)
    assert x[0, 0, 0, 1] == pytest.approx((0.2 - 0.25) / 0.5)
    assert x[0, 0, 1, 1] == pytest.approx(-0.5)


def test_preprocess_batch_matches_singles_and_formula():
    batch = _rng().integers(0, 256, (5, 28, 28), dtype=np.uint8)
    x = preprocess(batch, GRAY)
    assert x.shape == (5, 1, 28, 28)
    np.testing.assert_allclose(x[:, 0], (batch / 255 - 0.25) / 0.5, rtol=1e-6, atol=1e-6)
    for i in range(5):
        np.testing.assert_array_equal(preprocess(batch[i], GRAY)[0], x[i])
    np.testing.assert_array_equal(preprocess(batch[..., None], GRAY), x)


def test_preprocess_rgb_channels_normalised_separately():
    image = _rng().integers(0, 256, (8, 8, 3), dtype=np.uint8)
    x = preprocess(image, RGB)
    assert x.shape == (1, 3, 8, 8)
    for c in range(3):
        np.testing.assert_allclose(x[0, c], (image[..., c] / 255 - RGB.mean[c]) / RGB.std[c], rtol=1e-6, atol=1e-6)


def test_preprocess_colour_to_gray_uses_cv2_weights():
    batch = _rng().integers(0, 256, (3, 28, 28, 3), dtype=np.uint8)
    x = preprocess(batch, GRAY)
    expected = np.stack([cv2.cvtColor(im, cv2.COLOR_RGB2GRAY) for im in batch])
    np.testing.assert_allclose(x[:, 0], (expected / 255 - 0.25) / 0.5, rtol=1e-6, atol=1e-6)
    red = np.zeros((28, 28, 3), np.uint8)
    red[..., 0] = 255
    assert preprocess(red, GRAY)[0, 0, 0, 0] == pytest.approx((76 / 255 - 0.25) / 0.5)


def test_preprocess_gray_to_colour_repeats():
    image = _rng().integers(0, 256, (8, 8), dtype=np.uint8)
    x = preprocess(image, RGB)
    for c in range(3):
        np.testing.assert_allclose(x[0, c], (image / 255 - RGB.mean[c]) / RGB.std[c], rtol=1e-6, atol=1e-6)


def test_preprocess_rgba_drops_alpha():
    image = _rng().integers(0, 256, (8, 8, 4), dtype=np.uint8)
    np.testing.assert_array_equal(preprocess(image, RGB), preprocess(image[..., :3], RGB))


@pytest.mark.parametrize("size_hw", [(32, 32), (14, 14), (20, 30)])
def test_preprocess_resizes_with_inter_area(size_hw):
    batch = _rng().integers(0, 256, (4, *size_hw), dtype=np.uint8)
    x = preprocess(batch, GRAY)
    assert x.shape == (4, 1, 28, 28)
    expected = np.stack([cv2.resize(im, (28, 28), interpolation=cv2.INTER_AREA) for im in batch])
    np.testing.assert_allclose(x[:, 0], (expected / 255 - 0.25) / 0.5, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(preprocess(batch[2], GRAY)[0], x[2])


def test_preprocess_sequence_of_mixed_sizes():
    images = [np.zeros((10, 12, 3), np.uint8), np.full((28, 28), 255, np.uint8)]
    x = preprocess(images, GRAY)
    assert x.shape == (2, 1, 28, 28)
    assert x[1].min() == pytest.approx(1.5)


def test_preprocess_ambiguous_3d_and_is_batch():
    three_wide = np.zeros((28, 28, 3), np.uint8)
    assert preprocess(three_wide, GRAY).shape == (1, 1, 28, 28)  # one RGB image
    assert preprocess(three_wide, GRAY, is_batch=True).shape == (28, 1, 28, 28)  # 28 gray images 28x3
    assert preprocess(np.zeros((2, 28, 28), np.uint8), GRAY).shape == (2, 1, 28, 28)


def test_preprocess_channel_mismatch_policy_error():
    strict = Preprocessing((1, 28, 28), mean=(0.0,), std=(1.0,), on_channel_mismatch="error")
    preprocess(np.zeros((28, 28), np.uint8), strict)
    with pytest.raises(DataError, match="3 channel"):
        preprocess(np.zeros((28, 28, 3), np.uint8), strict)


@pytest.mark.parametrize(
    "images",
    [np.zeros((28, 28), np.float32), np.zeros((2, 28, 28, 2), np.uint8), np.zeros((1, 1, 28, 28, 1), np.uint8), []],
)
def test_preprocess_rejects_bad_images(images):
    with pytest.raises(DataError):
        preprocess(images, GRAY)


def test_preprocessing_spec_round_trip():
    spec = {"input_shape": [3, 32, 32], "mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.243, 0.261], "layers": []}
    p = Preprocessing.from_spec_dict(spec)
    assert p.input_shape == (3, 32, 32) and p.n_channels == 3 and p.on_channel_mismatch == "convert"
    assert p.to_dict() == {k: spec[k] for k in ("input_shape", "mean", "std")}
    strict = Preprocessing((1, 2, 2), (0.0,), (1.0,), on_channel_mismatch="error")
    assert Preprocessing.from_spec_dict(strict.to_dict()) == strict


@pytest.mark.parametrize(
    "spec",
    [
        {"input_shape": [1, 28, 28], "mean": [0.5]},
        {"input_shape": [2, 28, 28], "mean": [0.5, 0.5], "std": [1, 1]},
        {"input_shape": [1, 28, 28], "mean": [0.5, 0.5], "std": [1]},
        {"input_shape": [1, 28, 28], "mean": [0.5], "std": [0]},
        {"input_shape": [1, 0, 28], "mean": [0.5], "std": [1]},
        {"input_shape": "1,28,28", "mean": [0.5], "std": [1]},
        {"input_shape": [1, 28, 28], "mean": ["x"], "std": [1]},
        {"input_shape": [1, 28, 28], "mean": [0.5], "std": [1], "on_channel_mismatch": "ignore"},
        ["not", "a", "dict"],
    ],
)
def test_preprocessing_bad_spec(spec):
    with pytest.raises(SpecError):
        Preprocessing.from_spec_dict(spec)


# ---------------------------------------------------------------- shipped subset


def test_shipped_subset_is_stratified():
    subset = load_fashion_mnist(SHIPPED_SUBSET_ROOT, split="test")
    assert len(subset) == 1000 and subset.images.shape == (1000, 28, 28)
    np.testing.assert_array_equal(np.bincount(subset.labels, minlength=10), [100] * 10)
    indices = load_subset_indices(SHIPPED_SUBSET_ROOT)
    assert indices.shape == (1000,) and np.all(np.diff(indices) > 0) and indices.max() < 10_000
    assert subset.images.std() > 10  # real pictures, not zeros


@pytest.mark.skipif(not HAS_DEBIAN, reason="dataset-fashion-mnist not installed")
def test_shipped_subset_rows_come_from_test_split(tmp_path):
    full = load_fashion_mnist(DEBIAN_ROOT, split="test")
    subset = load_fashion_mnist(SHIPPED_SUBSET_ROOT, split="test")
    indices = load_subset_indices(SHIPPED_SUBSET_ROOT)
    np.testing.assert_array_equal(subset.images, full.images[indices])
    np.testing.assert_array_equal(subset.labels, full.labels[indices])
    # and the generator reproduces the shipped files byte for byte
    write_fashion_mnist_subset(tmp_path, n_samples=1000, seed=0, source_root=DEBIAN_ROOT)
    for path in SHIPPED_SUBSET_ROOT.glob("*.gz"):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


def test_stratified_indices():
    labels = np.repeat(np.arange(10), [5, 6, 7, 8, 9, 10, 11, 12, 13, 14])
    idx = stratified_indices(labels, n_samples=40, seed=1)
    np.testing.assert_array_equal(np.bincount(labels[idx]), [4] * 10)
    np.testing.assert_array_equal(idx, stratified_indices(labels, n_samples=40, seed=1))
    assert not np.array_equal(idx, stratified_indices(labels, n_samples=40, seed=2))
    with pytest.raises(DataError, match="multiple of 10"):
        stratified_indices(labels, n_samples=45, seed=0)
    with pytest.raises(DataError, match="fewer than"):
        stratified_indices(labels, n_samples=60, seed=0)


def test_subset_cli(small_fashion_root, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--out", str(out), "--n", "20", "--seed", "0", "--data-root", str(small_fashion_root)]
    assert subset_main(argv) == 0
    subset = load_fashion_mnist(out, split="test")
    full = load_fashion_mnist(small_fashion_root, split="test")
    np.testing.assert_array_equal(np.bincount(subset.labels), [2] * 10)
    np.testing.assert_array_equal(subset.images, full.images[load_subset_indices(out)])
    assert subset_main(["--out", str(out), "--n", "15", "--data-root", str(small_fashion_root)]) == 1
    assert "multiple of 10" in capsys.readouterr().err


def test_default_test_set_prefers_debian(tmp_path, small_fashion_root):
    found = default_test_set(debian_root=small_fashion_root, subset_root=tmp_path / "none")
    assert found.source == "debian" and len(found.dataset) == 30


def test_default_test_set_falls_back_to_shipped(tmp_path):
    found = default_test_set(debian_root=tmp_path)
    assert found.source == "shipped-subset" and len(found.dataset) == 1000
    assert found.root == SHIPPED_SUBSET_ROOT
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        default_test_set(debian_root=tmp_path, subset_root=tmp_path)


def test_shipped_subset_copy_loads(tmp_path):
    shutil.copytree(SHIPPED_SUBSET_ROOT, tmp_path / "copy")
    assert len(load_fashion_mnist(tmp_path / "copy", split="test")) == 1000
