"""Array helpers the loaders share: seeded (stratified) held-out splits, atomic ``.npz`` writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compressm_tune._io import atomic_write
from compressm_tune.errors import DataError


def _split(x: np.ndarray, y: np.ndarray, fraction: float, rng: np.random.Generator, held: str):
    """Move ``round(n * fraction)`` samples to a held-out split; both keep >= 2.

    Class labels ``y`` (n,) are split stratified: each class sends its share of the held-out
    count (largest remainders settle the rounding), so a small validation split holds every
    class in proportion instead of whatever a random draw gives (a handful of samples chosen
    at random can miss a class entirely, and ``best.pt`` is picked on them). Other targets
    are split at random.
    """
    n = len(x)
    n_held = round(n * fraction)
    if n_held < 2 or n - n_held < 2:
        raise DataError(
            f"every split needs at least 2 samples, but moving {fraction:g} of {n} samples to "
            f"'{held}' leaves {n - n_held} / {n_held}; provide more data"
        )
    perm = rng.permutation(n)
    if y.ndim == 1 and y.dtype.kind in "iub":
        out = _stratified(y[perm], n_held)
        held_mask = np.zeros(n, dtype=bool)
        held_mask[out] = True
        keep, out = perm[~held_mask], perm[held_mask]
    else:
        keep, out = perm[n_held:], perm[:n_held]
    return (x[keep], y[keep]), (x[out], y[out])


def _stratified(y: np.ndarray, n_held: int) -> np.ndarray:
    """Positions in ``y`` (already shuffled) of ``n_held`` samples, each class's first ones,
    in proportion to its count (largest remainder rounding), leaving every class at least one
    sample to train on (so the held-out split may fall short of ``n_held`` when nearly every
    class is a singleton)."""
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    quota = n_held * counts / len(y)  # (K,) ideal held count per class
    room = np.maximum(counts - 1, 0)  # a class keeps one sample on the training side
    take = np.minimum(np.floor(quota).astype(int), room)
    while take.sum() < n_held and (take < room).any():  # largest remainders first
        left = np.where(take < room, quota - take, -np.inf)
        take[np.argmax(left)] += 1
    rank = np.empty(len(y), dtype=int)  # position of each sample within its class
    for k in range(len(classes)):
        members = np.flatnonzero(inverse == k)
        rank[members] = np.arange(len(members))
    return np.flatnonzero(rank < take[inverse])


def _savez_atomic(target: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``target`` via a temp file in the same folder and ``os.replace``."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to a name
            np.savez(fh, **arrays)

    atomic_write(target, write)
