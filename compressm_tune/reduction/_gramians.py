"""Closed-form Gramians and Hankel singular values of a diagonal discrete-time LTI system.

The system is ``x_k = lam * x_{k-1} + B u_k``, ``y_k = C x_k`` with ``lam`` (N,) complex,
``|lam| < 1``, ``B`` (N, H) complex (gamma already folded in) and ``C`` (H, N) complex. All
arithmetic is complex128 numpy; torch tensors are accepted and answered in kind.

Input weighting (optional ``input_cov``, the (H, H) covariance ``R`` of the inputs): the
controllability Gramian then solves ``P = A P A^H + B R B^H``, the state covariance under
white inputs of covariance ``R`` instead of unit white noise in every input channel. Why:
a layer inside a network sees inputs that span only part of its H channels (on lti-sysid a
rank-1 signal after a 1 -> H encoder), and the unweighted Gramian counts states driven only
through directions the data never excites. Weighting with ``R = W W^H`` is balancing the
system ``(A, B W, C)``, so stability of the reduced system and the error bound carry over to
the weighted transfer function ``G(z) W`` (Enns' frequency-weighted balanced truncation, with
a constant weight).
"""

from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple, ParamSpec, TypeVar

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from compressm_tune.errors import ReductionError

__all__ = ["gramians", "hankel_singular_values"]


class _System(NamedTuple):
    """A validated system as complex128 numpy arrays, plus how to return results."""

    lam: np.ndarray  # (N,) complex128
    B: np.ndarray  # (N, H) complex128
    C: np.ndarray  # (H, N) complex128
    device: torch.device | None  # None: inputs were numpy; else return torch tensors here
    Bw: np.ndarray  # (N, m) complex128: B W with R = W W^H, or B itself without weighting


class _Balancing(NamedTuple):
    """Square-root factors and the SVD of ``Lo^H Lc`` (``P = Lc Lc^H``, ``Q = Lo Lo^H``)."""

    Lc: np.ndarray  # (N, N) complex128
    Lo: np.ndarray  # (N, N) complex128
    U: np.ndarray  # (N, N) complex128, left singular vectors
    s: np.ndarray  # (N,) float64, Hankel singular values, descending
    Vh: np.ndarray  # (N, N) complex128, right singular vectors (conjugate-transposed)


def _to_numpy(x: Any) -> np.ndarray:
    """Copy ``x`` (numpy array, torch tensor or nested sequence) to a complex128 numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().resolve_conj().numpy()
    return np.array(x, dtype=np.complex128)  # copy, so callers never alias the input


def _torch_device(*xs: Any) -> torch.device | None:
    """Device of the first torch tensor among ``xs``, or None if there is none."""
    for x in xs:
        if isinstance(x, torch.Tensor):
            return x.device
    return None


def _wrap(x: np.ndarray, device: torch.device | None) -> np.ndarray | torch.Tensor:
    """Return ``x`` unchanged for numpy callers, or as a torch tensor on ``device``."""
    return x if device is None else torch.from_numpy(x).to(device)


def _input_factor(input_cov: Any, H: int) -> np.ndarray:
    """``W`` (H, m) with ``input_cov = W W^H``: a validated Hermitian PSD (H, H) matrix.

    Eigen-decomposition factor, eigenvalues below roundoff dropped, so a rank-deficient
    covariance (inputs confined to a subspace) gives a thin ``W``.
    """
    try:
        R = _to_numpy(input_cov)
    except (TypeError, ValueError) as exc:
        raise ReductionError(f"input_cov must be a numeric (H, H) matrix: {exc}") from exc
    if R.shape != (H, H):
        raise ReductionError(f"input_cov must have shape (H, H) = {(H, H)}, got {R.shape}")
    if not np.isfinite(R).all():
        raise ReductionError("input_cov must be finite")
    scale = max(float(np.abs(R).max()), 1e-300)
    if np.abs(R - R.conj().T).max() > 1e-8 * scale:
        raise ReductionError("input_cov must be Hermitian (symmetric), a covariance matrix")
    try:
        w, V = np.linalg.eigh(0.5 * (R + R.conj().T))  # (H,), (H, H) ascending
    except np.linalg.LinAlgError as exc:  # entries near the float64 limit
        raise ReductionError(f"input_cov cannot be factorized ({exc}): the layer's inputs are "
                             "too large; the model's activations diverged") from None
    if w[0] < -1e-8 * max(w[-1], 1e-300):
        raise ReductionError(
            f"input_cov must be positive semidefinite, a covariance matrix; got eigenvalue "
            f"{w[0]:.3e} (largest {w[-1]:.3e})"
        )
    kept = w > H * np.finfo(float).eps * max(w[-1], 0.0)  # (H,)
    return V[:, kept] * np.sqrt(w[kept])[None, :]  # (H, m)


def _validate(lam: Any, B: Any, C: Any, input_cov: Any = None) -> _System:
    """Check shapes, finiteness and stability; return complex128 copies.

    Raises
    ------
    ReductionError
        If ``lam`` is not (N,), ``B`` not (N, H), ``C`` not (H, N), any entry is not finite,
        some ``|lam_i| >= 1``, or ``input_cov`` is not a Hermitian PSD (H, H) matrix.
    """
    device = _torch_device(lam, B, C)
    try:
        lam_np, B_np, C_np = _to_numpy(lam), _to_numpy(B), _to_numpy(C)
    except (TypeError, ValueError) as exc:
        raise ReductionError(f"lam, B, C must be numeric arrays or tensors: {exc}") from exc
    if lam_np.ndim != 1 or B_np.ndim != 2 or C_np.ndim != 2:
        raise ReductionError(
            "lam must be 1-D (N,), B 2-D (N, H), C 2-D (H, N); got "
            f"lam.shape={lam_np.shape} B.shape={B_np.shape} C.shape={C_np.shape}"
        )
    N, H = B_np.shape
    if lam_np.shape[0] != N or C_np.shape != (H, N) or N == 0:
        raise ReductionError(
            "shapes must be lam (N,), B (N, H), C (H, N) with N >= 1; got "
            f"lam.shape={lam_np.shape} B.shape={B_np.shape} C.shape={C_np.shape}"
        )
    for name, arr in (("lam", lam_np), ("B", B_np), ("C", C_np)):
        bad = np.argwhere(~np.isfinite(arr))
        if bad.size:
            raise ReductionError(
                f"{name} must be finite, got {len(bad)} non-finite entries, "
                f"first at index {tuple(int(i) for i in bad[0])}: {arr[tuple(bad[0])]}"
            )
    mag = np.abs(lam_np)  # (N,)
    unstable = np.flatnonzero(mag >= 1.0)
    if unstable.size:
        raise ReductionError(
            f"the system must be stable, |lam_i| < 1, got {unstable.size} states with "
            f"|lam| >= 1 at indices {unstable[:8].tolist()}: |lam|={mag[unstable[:8]].tolist()}"
        )
    Bw = B_np if input_cov is None else B_np @ _input_factor(input_cov, H)  # (N, m)
    return _System(lam_np, B_np, C_np, device, Bw)


def _gramians_np(lam: np.ndarray, B: np.ndarray, C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form Gramians of a validated system, exactly Hermitian (complex128)."""
    P = (B @ B.conj().T) / (1.0 - lam[:, None] * lam.conj()[None, :])  # (N, N)
    Q = (C.conj().T @ C) / (1.0 - lam.conj()[:, None] * lam[None, :])  # (N, N)
    P = 0.5 * (P + P.conj().T)  # (N, N) remove roundoff asymmetry
    Q = 0.5 * (Q + Q.conj().T)  # (N, N)
    return P, Q


def _sqrt_factor(M: np.ndarray) -> np.ndarray:
    """A factor ``L`` with ``M = L L^H`` for a Hermitian positive semidefinite ``M``.

    Cholesky when it succeeds (backward stable, so also fine for ill-conditioned ``M``);
    for a numerically semidefinite ``M`` (Cholesky breaks down) the eigen-decomposition
    factor ``V sqrt(max(w, 0))``, negative roundoff eigenvalues clipped to zero.
    """
    try:
        return np.linalg.cholesky(M)  # (N, N) lower triangular
    except np.linalg.LinAlgError:
        w, V = np.linalg.eigh(M)  # (N,), (N, N)
        return V * np.sqrt(np.clip(w, 0.0, None))[None, :]  # (N, N)


def _factors(sys: _System) -> tuple[np.ndarray, np.ndarray]:
    """Square-root factors ``Lc``, ``Lo`` with ``P = Lc Lc^H`` and ``Q = Lo Lo^H``."""
    P, Q = _gramians_np(sys.lam, sys.Bw, sys.C)
    return _sqrt_factor(P), _sqrt_factor(Q)  # (N, N), (N, N)


P = ParamSpec("P")
R = TypeVar("R")
# Recent balancings by system hash, least recently used first, within a byte budget: a
# reduction step scores every layer (HSVs) and then truncates the layers it cuts, so each
# layer's factorization must survive the other layers' scoring to be reused.
_BALANCING_CACHE_BYTES = 64 * 2**20
_balancings: OrderedDict[bytes, _Balancing] = OrderedDict()


def one_blas_thread(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` with BLAS/LAPACK pinned to one thread.

    At reduction sizes (N up to ~1000) threading gains little, and while training keeps the
    cores busy OpenBLAS's spinning threads make it slower by orders of magnitude (seen on a
    loaded 2-core machine for a 256x256 complex SVD).
    """

    @functools.wraps(fn)
    def pinned(*args: P.args, **kwargs: P.kwargs) -> R:
        with threadpool_limits(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return pinned


def _balance(sys: _System) -> _Balancing:
    """Square-root factors of P and Q and the SVD ``Lo^H Lc = U diag(s) Vh``.

    Recent results are memoized by a hash of the system: a reduction step asks for every
    layer's HSVs (to choose the ranks) and then truncates the same systems, and the
    factorizations are its O(N^3) cost while hashing is O(N H). Results are never modified in
    place by callers.
    """
    digest = hashlib.blake2b(digest_size=16)
    for a in (sys.lam, sys.Bw, sys.C):
        digest.update(repr(a.shape).encode())
        digest.update(np.ascontiguousarray(a).tobytes())
    key = digest.digest()
    if key in _balancings:
        _balancings.move_to_end(key)
        return _balancings[key]
    with np.errstate(over="ignore", invalid="ignore"):  # checked below, in one line
        try:
            Lc, Lo = _factors(sys)  # (N, N), (N, N)
            U, s, Vh = np.linalg.svd(Lo.conj().T @ Lc)  # (N, N), (N,) descending, (N, N)
        except (np.linalg.LinAlgError, ValueError) as exc:
            raise ReductionError(f"balancing failed ({exc}): the layer's weights or inputs "
                                 "are too large; the model diverged") from None
    if not np.isfinite(s).all():
        raise ReductionError("balancing overflowed: the layer's weights or inputs are too "
                             "large; the model diverged")
    _balancings[key] = _Balancing(Lc, Lo, U, s, Vh)
    while len(_balancings) > 1 and sum(
            sum(a.nbytes for a in b) for b in _balancings.values()) > _BALANCING_CACHE_BYTES:
        _balancings.popitem(last=False)  # least recently used
    return _balancings[key]


@one_blas_thread
def gramians(lam: Any, B: Any, C: Any, input_cov: Any = None
             ) -> tuple[np.ndarray, np.ndarray] | tuple[torch.Tensor, ...]:
    """Controllability and observability Gramians of a diagonal discrete-time system.

    Closed form, no Lyapunov solver: for ``A = diag(lam)``,

    ``P_ij = (B B^H)_ij / (1 - lam_i conj(lam_j))`` solves ``P = A P A^H + B B^H`` and
    ``Q_ij = (C^H C)_ij / (1 - conj(lam_i) lam_j)`` solves ``Q = A^H Q A + C^H C``.
    With ``input_cov = R``, ``B B^H`` becomes ``B R B^H`` (see the module docstring).

    Parameters
    ----------
    lam : array_like or torch.Tensor, shape (N,), complex
        Diagonal of the state matrix; every ``|lam_i| < 1``.
    B : array_like or torch.Tensor, shape (N, H), complex
        Input matrix (including the LRU's gamma normalization).
    C : array_like or torch.Tensor, shape (H, N), complex
        Output matrix.
    input_cov : array_like or torch.Tensor, shape (H, H), optional
        Covariance (second moment) of the inputs, Hermitian positive semidefinite; None
        weights every input channel alike (the identity).

    Returns
    -------
    P, Q : ndarray or torch.Tensor, shape (N, N), complex128
        Hermitian positive semidefinite Gramians. Torch tensors (on the device of the first
        tensor argument) if any argument is a tensor, else numpy arrays.

    Raises
    ------
    ReductionError
        On inconsistent shapes, non-finite entries or an unstable ``lam``.

    Examples
    --------
    >>> import numpy as np
    >>> P, Q = gramians(np.array([0.5]), np.array([[1.0]]), np.array([[2.0]]))
    >>> P.real, Q.real  # 1 / (1 - 0.25), 4 / (1 - 0.25)
    (array([[1.33333333]]), array([[5.33333333]]))
    """
    sys = _validate(lam, B, C, input_cov)
    P, Q = _gramians_np(sys.lam, sys.Bw, sys.C)
    return _wrap(P, sys.device), _wrap(Q, sys.device)


@one_blas_thread
def hankel_singular_values(lam: Any, B: Any, C: Any, input_cov: Any = None
                           ) -> np.ndarray | torch.Tensor:
    """Hankel singular values of a diagonal discrete-time system, in DESCENDING order.

    ``g = sqrt(eig(P Q))`` computed stably by the square-root method: ``P = Lc Lc^H`` and
    ``Q = Lo Lo^H`` are factored (Cholesky, or a clipped eigen-decomposition factor when a
    Gramian is numerically only semidefinite), and ``g`` are the singular values of
    ``Lo^H Lc``. ``P Q`` is never formed. Values below roughly ``N * eps * g[0]`` are
    roundoff and carry no relative accuracy.

    Parameters
    ----------
    lam : array_like or torch.Tensor, shape (N,), complex
        Diagonal of the state matrix; every ``|lam_i| < 1``.
    B : array_like or torch.Tensor, shape (N, H), complex
        Input matrix (including gamma).
    C : array_like or torch.Tensor, shape (H, N), complex
        Output matrix.
    input_cov : array_like or torch.Tensor, shape (H, H), optional
        Input covariance for input-weighted HSVs (module docstring); None: unweighted.

    Returns
    -------
    g : ndarray or torch.Tensor, shape (N,), float64
        Non-negative, sorted descending (``g[0]`` is the Hankel norm). A torch tensor if any
        argument is one.

    Raises
    ------
    ReductionError
        On inconsistent shapes, non-finite entries or an unstable ``lam``.

    Examples
    --------
    >>> import numpy as np
    >>> lam = np.array([0.9, 0.5j])
    >>> B = np.array([[1.0], [0.1]])
    >>> C = np.array([[1.0, 0.1]])
    >>> np.round(hankel_singular_values(lam, B, C), 4)
    array([5.2642, 0.0118])
    """
    sys = _validate(lam, B, C, input_cov)
    return _wrap(_balance(sys).s, sys.device)  # (N,) descending; memoized for the truncation
