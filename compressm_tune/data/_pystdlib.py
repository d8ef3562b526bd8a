"""``pystdlib-chars``: next-character prediction on the Python standard library's own sources.

Text nobody here wrote that ships with every Python, so a language-modelling run needs no
download. The ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (outside ``test``,
``tests``, ``idle_test`` and ``site-packages`` folders) are split **by file** into
train/validation/test by a hash of each file's relative path (80/10/10), so no file lends text
to two splits and the split does not depend on the seed or on which files exist. Text is read
as UTF-8 bytes; the vocabulary is every byte seen at least ``_MIN_COUNT`` times in the train
files, in byte order, plus one unknown id for the rest.

Sequences are non-overlapping windows of ``seq_len + 1`` bytes inside one file; a fixed
generator (not the run's seed, so every seed trains on the same text) picks ``_N_TRAIN``,
``_N_VAL`` and ``_N_TEST`` of them. Inputs are the one-hot first ``seq_len`` bytes (float32,
``d_input`` = vocabulary size: no embedding layer needed), labels the next byte at every step
(``(n, seq_len)`` int64, scored at every output step). The token ids are cached atomically.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sysconfig
import warnings
import zipfile
from pathlib import Path

import numpy as np

from compressm_tune.errors import DataError

__all__ = ["pystdlib_chars"]

SEQ_LEN = 64  # characters per sequence (the model sees 64, predicts 64)
_N_TRAIN, _N_VAL, _N_TEST = 4000, 500, 1000  # windows per split
_MIN_COUNT = 20  # a byte rarer than this in the train files maps to the unknown id
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
_WINDOW_SEED = 20240601  # fixed: which windows are drawn never depends on the run's seed
_LAYOUT = 1  # bump when the cached arrays change meaning; part of the cache key
_SPLITS = ("train", "val", "test")


def _split_of(rel: str) -> str:
    """80/10/10 by a hash of the file's relative path: stable across machines and versions."""
    bucket = int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def _source_files(root: Path) -> list[tuple[str, Path]]:
    files = [(p.relative_to(root).as_posix(), p) for p in root.rglob("*.py")
             if not _SKIP_DIRS & set(p.relative_to(root).parts[:-1])]
    return sorted(files)


def _cache_key(files: list[tuple[str, Path]]) -> str:
    """Hash of the file list with sizes, the Python version and the sampling settings."""
    listing = [(rel, p.stat().st_size) for rel, p in files]
    blob = json.dumps({"files": listing, "python": platform.python_version(),
                       "sizes": [SEQ_LEN, _N_TRAIN, _N_VAL, _N_TEST, _MIN_COUNT, _WINDOW_SEED],
                       "layout": _LAYOUT})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _windows(texts: list[bytes], n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` distinct non-overlapping ``SEQ_LEN + 1``-byte windows, one file each: (n, L + 1)."""
    width = SEQ_LEN + 1
    starts = [(f, s) for f, text in enumerate(texts) for s in range(0, len(text) - width + 1,
                                                                     width)]
    if len(starts) < n:
        raise DataError(f"pystdlib-chars: the split holds {len(starts)} windows of {width} "
                        f"characters, fewer than the {n} it needs")
    pick = np.sort(rng.choice(len(starts), size=n, replace=False))  # (n,) file order
    return np.stack([np.frombuffer(texts[starts[i][0]], np.uint8,
                                   count=width, offset=starts[i][1]) for i in pick])


def _generate(files: list[tuple[str, Path]]) -> dict[str, np.ndarray]:
    texts: dict[str, list[bytes]] = {split: [] for split in _SPLITS}
    for rel, path in files:
        texts[_split_of(rel)].append(path.read_bytes())
    counts = np.bincount(np.frombuffer(b"".join(texts["train"]), np.uint8), minlength=256)
    vocab = np.flatnonzero(counts >= _MIN_COUNT).astype(np.int64)  # (V - 1,) byte values
    lookup = np.full(256, len(vocab), np.int64)  # unknown id = V - 1
    lookup[vocab] = np.arange(len(vocab))
    rng = np.random.default_rng(_WINDOW_SEED)
    arrays = {"vocab": vocab}
    for split, n in zip(_SPLITS, (_N_TRAIN, _N_VAL, _N_TEST), strict=True):
        arrays[split] = lookup[_windows(texts[split], n, rng)].astype(np.uint8)  # (n, L + 1)
        arrays[f"{split}_files"] = np.array(len(texts[split]))
    return arrays


def _read_cache(target: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when unreadable or inconsistent."""
    try:
        with np.load(target, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    if "vocab" not in arrays or not all(s in arrays for s in _SPLITS):
        return None
    n_ids = len(arrays["vocab"]) + 1
    for split, n in zip(_SPLITS, (_N_TRAIN, _N_VAL, _N_TEST), strict=True):
        ids = arrays[split]
        if ids.shape != (n, SEQ_LEN + 1) or int(ids.max()) >= n_ids:
            return None
    return arrays


def pystdlib_chars(cache_root: Path, save) -> tuple[dict[str, np.ndarray], dict]:
    """Token ids per split ``(n, SEQ_LEN + 1)`` uint8 and the dataset's ``info``.

    ``save(target, arrays)`` writes the cache atomically (shared with mnist1d's)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = _source_files(root)
    if not files:
        raise DataError(f"pystdlib-chars: no .py sources under the standard library at {root}")
    target = cache_root / f"pystdlib-chars-{_cache_key(files)}.npz"
    arrays = _read_cache(target) if target.exists() else None
    if arrays is None:
        arrays = _generate(files)
        try:
            save(target, arrays)
        except OSError as exc:
            warnings.warn(f"cannot write pystdlib-chars cache ({exc}); set cache_dir= or "
                          "COMPRESSM_CACHE", stacklevel=3)
    vocab = [int(b) for b in arrays["vocab"]]
    info = {
        "source": str(root), "python": platform.python_version(),
        "files": {split: int(arrays[f"{split}_files"]) for split in _SPLITS},
        "vocab_bytes": vocab, "unknown_id": len(vocab),
        "split": "by file: sha256(relative path) % 10 -> 0 test, 1 val, else train",
        "bits_name": "bits_per_char",
    }
    return {split: arrays[split] for split in _SPLITS}, info
