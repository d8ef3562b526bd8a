"""Rank policies: how many states a layer keeps at a reduction step, and whether to cut at all."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from compressm_tune.errors import ConfigError, ReductionError
from compressm_tune.reduction._truncation import SELECTS

__all__ = ["ReductionPolicy", "plan_rank", "rank_for_tolerance", "round_up_to"]

KINDS = ("tau", "rank", "fraction")
WEIGHTINGS = ("none", "input")
RoundTo = Callable[[int, int], int]


def _hsv_array(g: Any) -> np.ndarray:
    """Validate Hankel singular values and return them as float64, sorted descending."""
    if isinstance(g, torch.Tensor):
        g = g.detach().cpu().numpy()
    g = np.asarray(g, dtype=np.float64)
    if g.ndim != 1 or g.size == 0:
        raise ReductionError(f"g must be a non-empty 1-D array, got shape {g.shape}")
    if not np.isfinite(g).all() or (g < 0).any():
        raise ReductionError(f"g must be finite and >= 0, got min {g.min()} and max {g.max()}")
    return np.sort(g)[::-1]  # (N,) descending


def rank_for_tolerance(g: Any, tau: float) -> int:
    """Smallest rank ``r`` whose leading Hankel singular values hold a ``1 - tau`` share.

    ``r = min{r : sum(g[:r]) / sum(g) >= 1 - tau}``: the HSVs are summed linearly, as in
    the CompreSSM paper, so ``tau`` is the fraction of the HSV *sum* that is discarded
    (not of the energy ``sum(g**2)``). By the balanced-truncation bound the transfer function
    error of the cut is then at most ``2 * tau * sum(g)``.

    Parameters
    ----------
    g : array_like or torch.Tensor, shape (N,), real, >= 0
        Hankel singular values; sorted descending here if they are not already.
    tau : float
        Discarded fraction, ``0 <= tau < 1``. ``tau = 0`` keeps every nonzero HSV.

    Returns
    -------
    int
        ``r`` in ``[1, N]``; 1 if every HSV is zero.

    Raises
    ------
    ReductionError
        If ``g`` is not a non-empty 1-D array of finite non-negative values, or ``tau`` is
        outside ``[0, 1)``.

    Examples
    --------
    >>> rank_for_tolerance([4.0, 3.0, 2.0, 1.0], tau=0.15)  # shares .4 .7 .9 1.
    3
    """
    if not 0.0 <= tau < 1.0:
        raise ReductionError(f"tau must satisfy 0 <= tau < 1, got {tau=}")
    g = _hsv_array(g)  # (N,)
    cum = np.cumsum(g)  # (N,)
    if cum[-1] == 0.0:
        return 1
    share = cum / cum[-1]  # (N,) ends at exactly 1, flat over trailing zeros
    r = int(np.searchsorted(share, 1.0 - tau, side="left")) + 1
    return min(max(r, 1), len(g))


@dataclass
class ReductionPolicy:
    """How a layer's new state width is chosen at a reduction step.

    Attributes
    ----------
    kind : {"tau", "rank", "fraction"}
        ``"tau"``: :func:`rank_for_tolerance` with ``tau = value``; ``"rank"``: keep
        ``value`` states; ``"fraction"``: keep ``ceil(value * N)`` states.
    value : float
        ``tau`` in ``[0, 1)``, a rank ``>= 1`` (an integer), or a fraction in ``(0, 1]``.
    gate : float
        A cut is applied only when the new rank ``r < gate * N``, in ``(0, 1]``.
    select : {"largest", "smallest", "random", "magnitude"}
        Passed to :func:`balanced_truncation`.
    seed : int or None
        Seed for ``select="random"``.
    weighting : {"none", "input"}
        LRU layers: ``"none"`` ranks states by the layer's own HSVs (as the paper);
        ``"input"`` weights the controllability Gramian with the second moment of the
        layer's inputs on the calibration sequences, so that states reached only through
        input directions the data leaves unexcited count for nothing (see
        :func:`~compressm_tune.reduction.hankel_singular_values`). Selective and Mamba layers are
        always scored on data.

    Examples
    --------
    >>> ReductionPolicy.parse("tau=0.04")
    ReductionPolicy(kind='tau', value=0.04, gate=0.95, select='largest', seed=None, \
weighting='none')
    >>> ReductionPolicy.parse("rank=16,select=random,seed=3").seed
    3
    """

    kind: str = "tau"
    value: float = 0.04  # the paper's sMNIST setting: discard 4% of the HSV sum
    gate: float = 0.95  # skip cuts that would remove fewer than 5% of the states (paper)
    select: str = "largest"
    seed: int | None = None
    weighting: str = "none"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"kind must be one of {KINDS}, got kind={self.kind!r}")
        v = self.value
        valid = {
            "tau": 0.0 <= v < 1.0,
            "rank": v >= 1 and float(v).is_integer(),
            "fraction": 0.0 < v <= 1.0,
        }[self.kind]
        if not valid:
            rule = {"tau": "0 <= tau < 1", "rank": "an integer >= 1", "fraction": "0 < f <= 1"}
            raise ConfigError(f"{self.kind} must be {rule[self.kind]}, got value={v!r}")
        if not 0.0 < self.gate <= 1.0:
            raise ConfigError(f"gate must satisfy 0 < gate <= 1, got gate={self.gate!r}")
        if self.select not in SELECTS:
            raise ConfigError(f"select must be one of {SELECTS}, got select={self.select!r}")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(
                f"weighting must be one of {WEIGHTINGS}, got weighting={self.weighting!r}")

    @classmethod
    def parse(cls, spec: str) -> ReductionPolicy:
        """Build a policy from a command-line string.

        Parameters
        ----------
        spec : str
            Comma-separated ``key=value`` pairs: exactly one of ``tau=``, ``rank=`` or
            ``fraction=``, optionally ``gate=``, ``select=``, ``seed=``, ``weighting=``; e.g.
            ``"tau=0.04"``, ``"fraction=0.25,gate=0.9"``, ``"tau=0.1,weighting=input"``.

        Returns
        -------
        ReductionPolicy

        Raises
        ------
        ConfigError
            On a malformed pair, an unknown or repeated key, not exactly one policy kind,
            or a value that breaks a rule of the dataclass.
        """
        fields: dict[str, str] = {}
        for item in spec.split(","):
            key, sep, val = (part.strip() for part in item.partition("="))
            if not sep or not key or not val:
                raise ConfigError(f"reduction policy must be key=value pairs, got {spec=}")
            if key not in (*KINDS, "gate", "select", "seed", "weighting") or key in fields:
                raise ConfigError(
                    f"reduction policy keys are one of {KINDS} plus gate, select, seed, "
                    f"weighting, each at most once; got {key=} in {spec=}"
                )
            fields[key] = val
        kinds = [k for k in KINDS if k in fields]
        if len(kinds) != 1:
            raise ConfigError(f"reduction policy needs exactly one of {KINDS}, got {spec=}")
        try:
            value = float(fields[kinds[0]])
            gate = float(fields.get("gate", cls.gate))
            seed = int(fields["seed"]) if "seed" in fields else None
        except ValueError as exc:
            raise ConfigError(f"reduction policy has a non-numeric value in {spec=}") from exc
        return cls(kinds[0], value, gate, fields.get("select", cls.select), seed,
                   fields.get("weighting", cls.weighting))


def round_up_to(widths: Sequence[int]) -> RoundTo:
    """A ``round_to`` hook for :func:`plan_rank` that rounds a rank up to a fast width.

    Parameters
    ----------
    widths : sequence of int
        State widths the device runs fast (any order), each ``>= 1``.

    Returns
    -------
    callable ``(r, N) -> int``
        The smallest width ``>= r``, capped at ``N``; ``N`` when no width is ``>= r``.

    Raises
    ------
    ConfigError
        If ``widths`` is empty or holds a non-integer or a value ``< 1``.

    Examples
    --------
    >>> f = round_up_to([16, 32, 64])
    >>> f(17, 100), f(16, 100), f(70, 100), f(20, 24)
    (32, 16, 100, 24)
    """
    ws = list(widths)
    if not ws or any(isinstance(w, bool) or not isinstance(w, (int, np.integer)) for w in ws):
        raise ConfigError(f"widths must be a non-empty sequence of integers, got {widths=}")
    if min(ws) < 1:
        raise ConfigError(f"widths must all be >= 1, got {widths=}")
    table = np.unique(np.asarray(ws, dtype=np.int64))  # (W,) ascending

    def _round(r: int, N: int) -> int:
        i = int(np.searchsorted(table, r, side="left"))
        return N if i == len(table) else min(int(table[i]), N)

    return _round


def plan_rank(g: Any, policy: ReductionPolicy, round_to: RoundTo | None = None) -> int | None:
    """New rank for a layer with Hankel singular values ``g``, or None when no cut is due.

    The policy gives ``r``; ``round_to(r, N)`` (a hardware profile's hook, e.g.
    :func:`round_up_to`) may raise it to a fast width, and the result is clipped to
    ``[r, N]``. The cut is applied only when the final ``r < policy.gate * N``.

    Parameters
    ----------
    g : array_like or torch.Tensor, shape (N,), real, >= 0
        The layer's Hankel singular values (only ``N`` matters for ``"rank"``/``"fraction"``).
    policy : ReductionPolicy
    round_to : callable ``(r, N) -> int``, optional

    Returns
    -------
    int or None
        The rank to truncate to, in ``[1, N)``, or None if the gate says no cut.

    Raises
    ------
    ReductionError
        If ``g`` is not a non-empty 1-D array of finite non-negative values.

    Examples
    --------
    >>> g = [4.0, 3.0, 2.0, 1.0] + [0.0] * 16
    >>> plan_rank(g, ReductionPolicy("tau", 0.15))
    3
    >>> plan_rank(g, ReductionPolicy("tau", 0.15), round_to=round_up_to([8]))
    8
    >>> print(plan_rank(g, ReductionPolicy("rank", 19)))  # 19 >= 0.95 * 20: no cut
    None
    """
    g = _hsv_array(g)  # (N,)
    N = len(g)
    if policy.kind == "tau":
        r = rank_for_tolerance(g, policy.value)
    elif policy.kind == "rank":
        r = min(int(policy.value), N)
    else:  # fraction; the 1e-9 keeps 0.25 * 64 at 16 despite roundoff
        r = max(1, math.ceil(policy.value * N - 1e-9))
    if round_to is not None:
        r = min(max(int(round_to(r, N)), r), N)
    return r if r < policy.gate * N else None
