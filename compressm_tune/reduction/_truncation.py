"""Square-root balanced truncation with re-diagonalization, and the LRU parameterization."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from compressm_tune.errors import ReductionError
from compressm_tune.reduction._gramians import (
    _balance,
    _Balancing,
    _System,
    _torch_device,
    _validate,
    _wrap,
    one_blas_thread,
)

__all__ = ["balanced_truncation", "to_lru_params", "from_lru_params"]

SELECTS = ("largest", "smallest", "random", "magnitude")

# Balanced states whose HSV is below this fraction of g[0] are numerically uncontrollable or
# unobservable: their balancing columns scale like g_i^(-1/2) and would amplify roundoff by
# g[0]/g_i, so they are not balanced but replaced by inert states (see balanced_truncation).
# At 1e-11, ||Ti T - I|| measured below ~1e-6, while each such state changes G by at most
# 2e-11 * g[0].
_NEGLIGIBLE_RTOL = 1e-11
# Above this condition number the reduced A is treated as defective: B' = V^-1 B_r and
# C' = C_r V would carry cancelling entries of size cond(V) and relative error eps * cond(V).
_MAX_EIGVEC_COND = 1e8
# Reduced eigenvalues pushed to |lam'| >= 1 by roundoff are pulled back to this radius.
_STABLE_RADIUS = 1.0 - 1e-6
# to_lru_params clamps nu = -log|lam| into [_NU_MIN, _NU_MAX] and the phase to >= _THETA_MIN.
_NU_MIN = 1e-12  # |lam| <= 1 - 1e-12: nu_log >= -27.6 instead of -inf
_NU_MAX = 50.0  # |lam| >= exp(-50) ~ 2e-22: nu_log <= 3.9 instead of +inf at lam = 0
_THETA_MIN = 1e-7  # phase 0 (a real eigenvalue) -> 1e-7 rad: theta_log >= -16.1, not -inf
_TWO_PI = 2.0 * np.pi


def _magnitude_scores(sys: _System) -> np.ndarray:
    """``|b_i| |c_i| / (1 - |lam_i|^2)`` per diagonal state (row / column 2-norms, ``b`` of
    the input-weighted ``B W`` when weighted), (N,)."""
    b = np.linalg.norm(sys.Bw, axis=1)  # (N,)
    c = np.linalg.norm(sys.C, axis=0)  # (N,)
    return b * c / (1.0 - np.abs(sys.lam) ** 2)  # (N,)


def _pick(s: np.ndarray, rank: int, select: str, seed: int | None) -> np.ndarray:
    """Indices (ascending) of the balanced states to keep."""
    N = len(s)
    if select == "largest":
        return np.arange(rank)
    if select == "smallest":
        return np.arange(N - rank, N)
    return np.sort(np.random.default_rng(seed).choice(N, size=rank, replace=False))  # random


def _project(
    sys: _System, bal: _Balancing, keep: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Square-root balanced projection onto the balanced states ``keep`` -> (A_r, B_r, C_r)."""
    d = 1.0 / np.sqrt(bal.s[keep])  # (r,) S_r^(-1/2)
    T = (bal.Lc @ bal.Vh[keep].conj().T) * d[None, :]  # (N, r) Lc V_r S_r^(-1/2)
    Ti = d[:, None] * (bal.U[:, keep].conj().T @ bal.Lo.conj().T)  # (r, N) S^(-1/2) U_r^H Lo^H
    A_r = (Ti * sys.lam[None, :]) @ T  # (r, r) Ti diag(lam) T
    return A_r, Ti @ sys.B, sys.C @ T  # (r, r), (r, H), (H, r)


def _rediagonalize(
    A_r: np.ndarray, B_r: np.ndarray, C_r: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``A_r = V diag(lam) V^-1`` -> (lam, V^-1 B_r, C_r V), each state scaled so |b_i| = |c_i|."""
    lam, V = np.linalg.eig(A_r)  # (r,), (r, r)
    cond = np.linalg.cond(V) if len(lam) else 1.0
    if not np.isfinite(cond) or cond > _MAX_EIGVEC_COND:
        raise ReductionError(
            "the reduced state matrix must be diagonalizable with a well-conditioned "
            f"eigenvector matrix, cond(V) <= {_MAX_EIGVEC_COND:.0e}; got cond(V)={cond:.3e} "
            f"for rank {len(lam)} (A_r is defective or nearly so); try another rank"
        )
    B_d = np.linalg.solve(V, B_r)  # (r, H)
    C_d = C_r @ V  # (H, r)
    b = np.linalg.norm(B_d, axis=1)  # (r,)
    c = np.linalg.norm(C_d, axis=0)  # (r,)
    both = (b > 0) & (c > 0)  # (r,)
    scale = np.sqrt(np.divide(b, c, out=np.ones_like(b), where=both))  # (r,)
    return lam, B_d / scale[:, None], C_d * scale[None, :]  # (r,), (r, H), (H, r)


def _clamp_unstable(lam: np.ndarray) -> np.ndarray:
    """Pull roundoff-unstable eigenvalues back inside the unit disk, warning with the count."""
    mag = np.abs(lam)  # (r,)
    bad = mag >= 1.0  # (r,)
    if bad.any():
        warnings.warn(
            f"{int(bad.sum())} reduced eigenvalue(s) reached |lam| >= 1 through roundoff "
            f"(max |lam| = {mag.max():.17g}); clamped to |lam| = {_STABLE_RADIUS}",
            RuntimeWarning,
            stacklevel=3,
        )
        lam = np.where(bad, lam / np.where(bad, mag, 1.0) * _STABLE_RADIUS, lam)  # (r,)
    return lam


@one_blas_thread
def balanced_truncation(
    lam: Any,
    B: Any,
    C: Any,
    rank: int,
    select: str = "largest",
    seed: int | None = None,
    input_cov: Any = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | tuple[torch.Tensor, ...]:
    """Reduce a diagonal discrete-time system to ``rank`` states; the result is diagonal again.

    Square-root balanced truncation: with ``P = Lc Lc^H``, ``Q = Lo Lo^H`` and
    ``Lo^H Lc = U S V^H`` (S the Hankel singular values, descending), the kept balanced
    states ``K`` give ``T = Lc V_K S_K^(-1/2)`` and ``Ti = S_K^(-1/2) U_K^H Lo^H``, so
    ``A_r = Ti diag(lam) T``, ``B_r = Ti B``, ``C_r = C T``. ``A_r`` is then re-diagonalized,
    ``A_r = V diag(lam') V^-1``, ``B' = V^-1 B_r``, ``C' = C_r V``, with each new state scaled
    so that its row of ``B'`` and column of ``C'`` have equal 2-norms.

    For ``select="largest"`` the transfer function error obeys
    ``max_|z|=1 ||G(z) - G_r(z)||_2 <= 2 * sum(g[rank:])``, plus at most ``2e-11 * g[0]`` per
    inert state. With ``input_cov = R = W W^H`` the balancing uses ``P`` of ``B R B^H`` (and
    ``g`` are the input-weighted HSVs) while the projection still acts on ``B``: the bound then
    holds for ``||(G(z) - G_r(z)) W||_2``, the error on inputs shaped like the data.

    Balanced states with ``g_i <= 1e-11 * g[0]`` cannot be balanced accurately; when such a
    state is kept (``rank`` above the numerical order, or the ``"smallest"`` / ``"random"``
    ablations) it is replaced by an inert state that leaves the transfer function unchanged:
    the eigenvalue and ``C`` column of one of the original diagonal states (lowest
    ``|b_i| |c_i| / (1 - |lam_i|^2)`` first) with a zero ``B`` row, which training can revive
    through the gradient of ``B``.

    Cost: ``O(N^2 H + N^3)``; the Gramians and their factors are recomputed here, not shared
    with :func:`hankel_singular_values`.

    Parameters
    ----------
    lam : array_like or torch.Tensor, shape (N,), complex
        Diagonal of the state matrix; every ``|lam_i| < 1``.
    B : array_like or torch.Tensor, shape (N, H), complex
        Input matrix (including gamma).
    C : array_like or torch.Tensor, shape (H, N), complex
        Output matrix.
    rank : int
        Number of states to keep, ``>= 1``. ``rank >= N`` is a no-op that returns complex128
        copies of the inputs.
    select : {"largest", "smallest", "random", "magnitude"}, default "largest"
        Which states to keep: the ``rank`` largest or smallest Hankel singular values, ``rank``
        balanced states drawn at random (``seed``), or, with no balancing, the ``rank``
        original diagonal states with the largest ``|b_i| |c_i| / (1 - |lam_i|^2)``
        (``|b_i|``, ``|c_i|`` row / column 2-norms), returned in their original order.
    seed : int or None, default None
        Seed of ``numpy.random.default_rng`` for ``select="random"``; ignored otherwise.
    input_cov : array_like or torch.Tensor, shape (H, H), optional
        Input covariance for input-weighted balancing (see
        :func:`~compressm_tune.reduction.hankel_singular_values`); None: unweighted.

    Returns
    -------
    lam_r : ndarray or torch.Tensor, shape (rank,), complex128
        Reduced eigenvalues, all ``|lam_r| < 1``; order unspecified.
    B_r : ndarray or torch.Tensor, shape (rank, H), complex128
    C_r : ndarray or torch.Tensor, shape (H, rank), complex128
        Torch tensors (detached, on the device of the first tensor argument) if any argument
        is a tensor, else numpy arrays.

    Raises
    ------
    ReductionError
        On inconsistent shapes, non-finite entries, an unstable ``lam``, ``rank < 1``, an
        unknown ``select``, or a reduced ``A_r`` too close to defective to re-diagonalize.

    Warns
    -----
    RuntimeWarning
        When roundoff puts reduced eigenvalues on or outside the unit circle; they are
        clamped to ``|lam| = 1 - 1e-6``.

    Examples
    --------
    >>> import numpy as np
    >>> lam = np.array([0.9, 0.5j, -0.2])
    >>> B = np.array([[1.0], [0.1], [0.01]])
    >>> C = np.array([[1.0, 0.1, 0.01]])
    >>> lam_r, B_r, C_r = balanced_truncation(lam, B, C, rank=1)
    >>> lam_r.shape, B_r.shape, C_r.shape
    ((1,), (1, 1), (1, 1))
    >>> bool(abs(lam_r[0] - 0.9) < 1e-3)
    True
    """
    sys = _validate(lam, B, C, input_cov)
    N = len(sys.lam)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ReductionError(
            f"rank must be an integer >= 1 (rank >= N is a no-op), got {rank=} {N=}"
        )
    if select not in SELECTS:
        raise ReductionError(f"select must be one of {SELECTS}, got {select=}")
    if rank >= N:
        return tuple(_wrap(x, sys.device) for x in (sys.lam, sys.B, sys.C))
    if select == "magnitude":
        keep = np.sort(np.argsort(-_magnitude_scores(sys), kind="stable")[:rank])  # (rank,)
        return tuple(_wrap(x, sys.device) for x in (sys.lam[keep], sys.B[keep], sys.C[:, keep]))

    bal = _balance(sys)
    keep = _pick(bal.s, rank, select, seed)  # (rank,)
    balanced = keep[bal.s[keep] > _NEGLIGIBLE_RTOL * bal.s[0]]  # (r_b,) balanced states
    lam_r, B_r, C_r = _rediagonalize(*_project(sys, bal, balanced))  # (r_b,), (r_b, H), (H, r_b)
    n_inert = rank - len(balanced)
    if n_inert:
        inert = np.argsort(_magnitude_scores(sys), kind="stable")[:n_inert]  # (n_inert,)
        lam_r = np.concatenate([lam_r, sys.lam[inert]])  # (rank,)
        B_r = np.concatenate([B_r, np.zeros_like(sys.B[inert])])  # (rank, H)
        C_r = np.concatenate([C_r, sys.C[:, inert]], axis=1)  # (H, rank)
    lam_r = _clamp_unstable(lam_r)  # (rank,)
    for name, arr in (("lam_r", lam_r), ("B_r", B_r), ("C_r", C_r)):
        if not np.isfinite(arr).all():
            raise ReductionError(
                f"the reduced system must be finite, got non-finite {name} for {rank=} {N=} "
                f"(smallest kept HSV {bal.s[keep].min():.3e}, largest {bal.s[0]:.3e})"
            )
    return tuple(_wrap(x, sys.device) for x in (lam_r, B_r, C_r))


def to_lru_params(lam: Any, B: Any, C: Any) -> dict[str, np.ndarray]:
    """Express a diagonal system in the LRU parameterization.

    ``lam = exp(-exp(nu_log) + i exp(theta_log))``, ``gamma = sqrt(1 - |lam|^2)``,
    ``B = (B_re + i B_im) * gamma[:, None]``, ``C = C_re + i C_im``. The phase is taken in
    ``[0, 2 pi)``. To keep every logarithm finite, ``nu = -log|lam|`` is clamped into
    ``[1e-12, 50]`` (|lam| changes by at most 1e-12 near 1, or is raised to ~2e-22 near 0)
    and the phase is raised to at least 1e-7 rad (a real positive eigenvalue comes back
    rotated by 1e-7 rad, ``|lam' - lam| <= 1e-7 |lam|``). ``gamma`` is computed from the
    clamped ``|lam|``, and ``B`` is divided by that same ``gamma``, so ``B`` round-trips
    through :func:`from_lru_params` to roundoff.

    Parameters
    ----------
    lam : array_like or torch.Tensor, shape (N,), complex
        Eigenvalues, every ``|lam_i| < 1``.
    B : array_like or torch.Tensor, shape (N, H), complex
        Input matrix including gamma.
    C : array_like or torch.Tensor, shape (H, N), complex
        Output matrix.

    Returns
    -------
    dict of str to ndarray, float64
        ``nu_log``, ``theta_log``, ``gamma_log`` (N,); ``B_re``, ``B_im`` (N, H);
        ``C_re``, ``C_im`` (H, N).

    Raises
    ------
    ReductionError
        On inconsistent shapes, non-finite entries or an unstable ``lam``.

    Examples
    --------
    >>> import numpy as np
    >>> p = to_lru_params(np.array([0.5 + 0.5j]), np.array([[1.0]]), np.array([[1.0]]))
    >>> sorted(p)
    ['B_im', 'B_re', 'C_im', 'C_re', 'gamma_log', 'nu_log', 'theta_log']
    >>> lam, B, C = from_lru_params(**p)
    >>> np.round(lam, 12), np.round(B, 12)
    (array([0.5+0.5j]), array([[1.+0.j]]))
    """
    sys = _validate(lam, B, C)
    mag = np.maximum(np.abs(sys.lam), np.exp(-_NU_MAX))  # (N,) > 0, so the log is finite
    nu = np.clip(-np.log(mag), _NU_MIN, _NU_MAX)  # (N,)
    theta = np.mod(np.angle(sys.lam), _TWO_PI)  # (N,) in [0, 2 pi]; 2 pi only from roundoff
    theta = np.maximum(np.where(theta >= _TWO_PI, 0.0, theta), _THETA_MIN)  # (N,)
    gamma = np.sqrt(-np.expm1(-2.0 * nu))  # (N,) sqrt(1 - |lam|^2) without cancellation
    B_n = sys.B / gamma[:, None]  # (N, H)
    return {
        "nu_log": np.log(nu),  # (N,)
        "theta_log": np.log(theta),  # (N,)
        "gamma_log": np.log(gamma),  # (N,)
        "B_re": B_n.real.copy(),  # (N, H)
        "B_im": B_n.imag.copy(),  # (N, H)
        "C_re": sys.C.real.copy(),  # (H, N)
        "C_im": sys.C.imag.copy(),  # (H, N)
    }


def from_lru_params(
    nu_log: Any,
    theta_log: Any,
    gamma_log: Any,
    B_re: Any,
    B_im: Any,
    C_re: Any,
    C_im: Any,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | tuple[torch.Tensor, ...]:
    """The diagonal system ``(lam, B, C)`` of LRU parameters; inverse of :func:`to_lru_params`.

    With torch tensors the computation is done in torch and is differentiable, in the
    complex dtype matching the promoted real dtype (float32 -> complex64); with numpy inputs
    it returns complex128 numpy arrays.

    Parameters
    ----------
    nu_log, theta_log, gamma_log : array_like or torch.Tensor, shape (N,), real
    B_re, B_im : array_like or torch.Tensor, shape (N, H), real
    C_re, C_im : array_like or torch.Tensor, shape (H, N), real

    Returns
    -------
    lam : shape (N,), ``exp(-exp(nu_log) + i exp(theta_log))``
    B : shape (N, H), ``(B_re + i B_im) * exp(gamma_log)[:, None]``
    C : shape (H, N), ``C_re + i C_im``

    Raises
    ------
    ReductionError
        On inconsistent shapes.

    Examples
    --------
    >>> import numpy as np
    >>> z = np.zeros(1)
    >>> lam, B, C = from_lru_params(z, np.log([np.pi]), z, [[1.0]], [[0.0]], [[2.0]], [[0.0]])
    >>> np.round(lam, 6), B, C  # exp(-1) * exp(i pi)
    (array([-0.367879+0.j]), array([[1.+0.j]]), array([[2.+0.j]]))
    """
    args = (nu_log, theta_log, gamma_log, B_re, B_im, C_re, C_im)
    device = _torch_device(*args)
    if device is None:
        nu, th, ga, br, bi, cr, ci = (np.asarray(a, dtype=np.float64) for a in args)
    else:
        tensors = [torch.as_tensor(a, device=device) for a in args]
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        nu, th, ga, br, bi, cr, ci = (t.to(dtype) for t in tensors)
    N = nu.shape[0] if nu.ndim == 1 else -1
    H = br.shape[1] if br.ndim == 2 else -1
    shapes_ok = (
        N >= 0
        and H >= 0
        and th.shape == ga.shape == nu.shape
        and br.shape == bi.shape == (N, H)
        and cr.shape == ci.shape == (H, N)
    )
    if not shapes_ok:
        raise ReductionError(
            "LRU parameters must be nu_log, theta_log, gamma_log (N,), B_re, B_im (N, H), "
            f"C_re, C_im (H, N); got {[tuple(a.shape) for a in (nu, th, ga, br, bi, cr, ci)]}"
        )
    if device is None:
        lam = np.exp(-np.exp(nu) + 1j * np.exp(th))  # (N,)
        return lam, (br + 1j * bi) * np.exp(ga)[:, None], cr + 1j * ci  # (N,), (N, H), (H, N)
    lam = torch.exp(torch.complex(-torch.exp(nu), torch.exp(th)))  # (N,)
    B = torch.complex(br, bi) * torch.exp(ga)[:, None]  # (N, H)
    return lam, B, torch.complex(cr, ci)  # (N,), (N, H), (H, N)
