"""Datasets from the user's files: ``npz`` (arrays of any labels, optional padding) and
``smnist`` (sequential MNIST from the four IDX files). Each loader returns ``(task, train, test,
d_output, info)`` for :func:`~compressm_tune.data.load_dataset` to split and normalize.
"""

from __future__ import annotations

import gzip
import zipfile
import zlib
from pathlib import Path

import numpy as np

from compressm_tune.data._arrays import _split
from compressm_tune.errors import DataError

_NPZ_TEST_FRACTION = 0.2  # test split carved from an .npz that has no x_test/y_test
_MAX_CLASSES = 2**16  # class ids beyond this are an encoding bug, not a label space
_MNIST_CLASSES = 10
_IDX_MAGIC = {3: 2051, 1: 2049}  # ndim -> magic number (unsigned bytes, 3-D images / 1-D labels)
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# ----------------------------------------------------------------------------- npz


def _npz(path: str | None, rng: np.random.Generator):
    """User arrays: classification when ``y`` is (n,), regression when it is (n, L, d_out).

    Class labels may be of any kind (strings, 1..K, -1/+1, arbitrary integers): the distinct
    labels of ``y``, sorted, become class ids 0..K-1, and ``info["labels"]`` lists them (id ->
    original label), so a checkpoint and an export bundle can report the user's own labels.
    Labels of ``y_test`` that ``y`` never has are refused: no model could learn them.
    """
    if path is None:
        raise DataError("dataset 'npz' needs path= pointing to an .npz file with keys 'x', 'y'")
    arrays = _read_npz(path)
    x, y = _check_pair(arrays["x"], arrays["y"], "", path)
    task = "classification" if y.ndim == 1 else "regression"
    info: dict = {"path": str(Path(path).resolve())}
    lengths = (~np.isnan(x).all(axis=2)).sum(axis=1)  # (n,) see _padding
    if (lengths < x.shape[1]).any():
        info["padding"] = {"kind": "trailing NaN", "min_length": int(lengths.min()),
                           "max_length": int(x.shape[1])}
    if task == "classification":
        labels, y = np.unique(y, return_inverse=True)  # (K,) sorted; y -> ids (n,)
        if len(labels) < 2:
            raise DataError(f"classification needs at least 2 distinct labels in y, got only "
                            f"{labels.tolist()} in {path}")
        if len(labels) > _MAX_CLASSES:
            raise DataError(f"y in {path} holds {len(labels)} distinct labels, more than "
                            f"{_MAX_CLASSES} classes (the output layer would not fit)")
        info["labels"] = labels.tolist()  # JSON-ready: str, int or float per class id
    d_output = len(info["labels"]) if task == "classification" else y.shape[2]
    if "x_test" in arrays:
        x_test, y_test = _check_pair(arrays["x_test"], arrays["y_test"], "_test", path)
        if x_test.shape[1:] != x.shape[1:] or y_test.shape[1:] != y.shape[1:]:
            raise DataError(
                f"x_test/y_test in {path} must match x/y in all but the first axis: "
                f"x {x.shape}, y {y.shape} vs x_test {x_test.shape}, y_test {y_test.shape}"
            )
        if task == "classification":
            y_test = _label_ids(y_test, labels, path)
        test_split = "file"
    else:
        (x, y), (x_test, y_test) = _split(x, y, _NPZ_TEST_FRACTION, rng, "test")
        test_split = f"random {_NPZ_TEST_FRACTION:.0%}"
    info["test_split"] = test_split
    return task, (x, y), (x_test, y_test), d_output, info


def _label_ids(y: np.ndarray, labels: np.ndarray, path: str) -> np.ndarray:
    """Class ids of ``y`` under the train labels ``labels`` (sorted); unknown labels refused."""
    if y.dtype.kind in "US" and labels.dtype.kind not in "US" or (
            labels.dtype.kind in "US" and y.dtype.kind not in "US"):
        raise DataError(f"y_test in {path} holds {y.dtype} labels but y holds {labels.dtype}; "
                        "give both the same kind of label")
    ids = np.clip(np.searchsorted(labels, y), 0, len(labels) - 1)  # (n,)
    unknown = labels[ids] != y
    if unknown.any():
        raise DataError(f"y_test in {path} holds label {y[unknown][0].item()!r}, which y never has "
                        f"(its labels: {labels.tolist()[:20]})")
    return ids


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """The ``x``, ``y`` (and ``x_test``, ``y_test`` when present) arrays of an .npz file."""
    if not Path(path).is_file():
        raise DataError(f"npz file not found: {path}")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path} as an .npz archive: {exc}") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"{path} is a single .npy array, not an .npz archive with keys 'x', 'y'")
    with npz:
        present = sorted(npz.files)
        missing = [k for k in ("x", "y") if k not in present]
        if missing:
            raise DataError(
                f"{path} must contain keys 'x', 'y'; missing {missing}, found {present}"
            )
        if ("x_test" in present) != ("y_test" in present):
            raise DataError(f"{path} must hold both x_test, y_test or neither; found {present}")
        keys = [k for k in ("x", "y", "x_test", "y_test") if k in present]
        try:
            return {k: npz[k] for k in keys}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"cannot read arrays {keys} from {path}: {exc}") from exc


def _check_pair(x: np.ndarray, y: np.ndarray, suffix: str, path: str):
    """Validate one (x, y) pair; return x float64 (n, L, d) and y, either class labels (n,)
    as given (numbers, strings or booleans; mapped to ids by the caller) or float32 targets
    (n, L, d). Trailing NaNs of a sequence are its padding (see :func:`_padding`)."""
    xn, yn = f"x{suffix}", f"y{suffix}"
    for key, arr, ndims in ((xn, x, (2, 3)), (yn, y, (1, 3))):
        labels = key == yn and arr.ndim == 1
        if arr.dtype.kind not in ("iufbUS" if labels else "iuf"):
            kinds = "numbers, strings or booleans" if labels else "a real numeric array"
            raise DataError(f"{key} in {path} must be {kinds}, got dtype {arr.dtype}")
        if arr.ndim not in ndims:
            raise DataError(f"{key} in {path} must have ndim in {ndims}, got shape {arr.shape}")
        if arr.size == 0:
            raise DataError(f"{key} in {path} must be non-empty, got shape {arr.shape}")
        if key == xn or arr.dtype.kind not in "f":
            continue  # x: see _padding
        finite = np.isfinite(arr)
        x3 = x if x.ndim == 3 else x[..., None]  # (n, L, d)
        if arr.ndim == 3 and arr.shape[:2] == x3.shape[:2]:  # NaN targets where x is padding
            finite |= np.isnan(arr) & np.isnan(x3).all(axis=2, keepdims=True)
        if not finite.all():
            first = tuple(int(i) for i in np.argwhere(~finite)[0])
            raise DataError(f"{key} in {path} must be finite, found {arr[first]} at {first}")
    _padding(x, xn, path)
    x = x[..., None] if x.ndim == 2 else x  # (n, L) -> (n, L, 1)
    if len(x) != len(y):
        raise DataError(f"{xn} and {yn} in {path} must have equal length, got {len(x)} vs {len(y)}")
    if y.ndim == 3:
        if y.shape[1] != x.shape[1]:
            raise DataError(
                f"{yn} in {path} must have length {x.shape[1]} on axis 1, got {y.shape}"
            )
        y = y.astype(np.float32)
        y[np.isnan(x).all(axis=2)] = np.nan  # padded steps: left out of loss and metrics
        return x.astype(np.float64), y
    if y.dtype.kind == "f" and (y != np.round(y)).any():
        raise DataError(f"class labels {yn} in {path} must be whole numbers or strings, found "
                        f"{y[y != np.round(y)][0]} (a regression target needs shape (n, L, d))")
    if y.dtype.kind == "f":
        y = y.astype(np.int64)  # whole-number labels: ids print as 1, not 1.0
    return x.astype(np.float64), y


def _padding(x: np.ndarray, name: str, path: str) -> np.ndarray:
    """Each sequence's true length from trailing NaN padding of ``x`` (n, L, d).

    Variable-length series are brought padded to the longest with NaN at the end: a step whose
    channels are all NaN is padding; it must come after every real step, and a sequence needs
    at least one real step. Any other non-finite value (inf, a NaN among real steps or in some
    channels only) is refused, naming the first one. Returns lengths (n,) int64.
    """
    x3 = x if x.ndim == 3 else x[..., None]  # (n, L, d)
    pad = np.isnan(x3).all(axis=2)  # (n, L) padded steps
    lengths = (~pad).sum(axis=1)  # (n,)
    trailing = np.arange(x.shape[1])[None, :] >= lengths[:, None]  # (n, L)
    bad = ~np.isfinite(x3) & ~(pad & trailing)[..., None]  # (n, L, d)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])[:x.ndim]  # in the user's shape
        hint = (" (NaN is allowed only as trailing padding of a whole step)"
                if np.isnan(x[first]) else "")
        raise DataError(f"{name} in {path} must be finite, found {x[first]} at {first}{hint}")
    if (lengths == 0).any():
        empty = int(np.flatnonzero(lengths == 0)[0])
        raise DataError(f"{name} in {path}: sequence {empty} is all NaN padding (no real step)")
    return lengths


# ----------------------------------------------------------------------------- smnist


def _smnist(data_dir: str | None):
    """Sequential MNIST: pixels / 255 read row-major into (n, rows * cols, 1) sequences."""
    expected = [n for pair in _IDX_FILES.values() for n in pair]
    hint = f"expected {expected} (each optionally .gz)"
    if data_dir is None:
        raise DataError(f"dataset 'smnist' needs data_dir= holding the MNIST IDX files; {hint}")
    if not Path(data_dir).is_dir():
        raise DataError(f"smnist data_dir {data_dir} is not a folder; {hint}")
    files = {base: _find_idx(Path(data_dir), base) for base in expected}
    missing = [base for base, found in files.items() if found is None]
    if missing:
        raise DataError(f"missing MNIST IDX files {missing} in {data_dir}; {hint}")
    train = _read_idx_pair(*(files[base] for base in _IDX_FILES["train"]))
    test = _read_idx_pair(*(files[base] for base in _IDX_FILES["test"]))
    if train[0].shape[1] != test[0].shape[1]:
        sizes = f"{train[0].shape[1]} vs {test[0].shape[1]}"
        raise DataError(f"train and test images in {data_dir} must match in size, got {sizes}")
    info = {"data_dir": str(Path(data_dir).resolve()), "files": [f.name for f in files.values()]}
    return "classification", train, test, _MNIST_CLASSES, info


def _find_idx(data_dir: Path, base: str) -> Path | None:
    """``data_dir / base``, else its ``.gz`` sibling, else None."""
    for candidate in (data_dir / base, data_dir / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_idx_pair(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 (n, rows * cols, 1) in [0, 1] and labels int64 (n,) in [0, 10)."""
    x = _read_idx(images, ndim=3)  # (n, rows, cols) uint8
    y = _read_idx(labels, ndim=1)  # (n,) uint8
    if len(x) != len(y):
        raise DataError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels")
    if (y >= _MNIST_CLASSES).any():
        bad = int(y[y >= _MNIST_CLASSES][0])
        raise DataError(f"labels must lie in [0, {_MNIST_CLASSES}), found {bad!r} in {labels}")
    return x.reshape(len(x), -1, 1) / np.float32(255), y.astype(np.int64)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file (big-endian header: magic, then ``ndim`` sizes)."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    header_len = 4 * (ndim + 1)
    if len(raw) < header_len:
        raise DataError(f"IDX file {path} is truncated: {len(raw)} bytes < {header_len} of header")
    magic, *dims = np.frombuffer(raw[:header_len], dtype=">u4").tolist()
    if magic != _IDX_MAGIC[ndim]:
        raise DataError(f"IDX file {path} must start with magic {_IDX_MAGIC[ndim]}, got {magic}")
    n_bytes = int(np.prod(dims))
    if n_bytes == 0:
        raise DataError(f"IDX file {path} must be non-empty, got sizes {dims}")
    if len(raw) - header_len != n_bytes:
        raise DataError(
            f"IDX file {path} with sizes {dims} must hold {n_bytes} data bytes, "
            f"got {len(raw) - header_len} (truncated or corrupted)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)
