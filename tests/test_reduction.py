"""Gramians, Hankel singular values and balanced truncation against independent references.

References never reuse the package's code: Gramians come from scipy's Lyapunov solver on the
dense ``A = diag(lam)``, HSVs from ``sqrt(eig(P Q))`` of those, transfer functions from a dense
solve of ``(zI - A) X = B`` and impulse responses from an explicit state-space loop.
"""

from __future__ import annotations

import doctest
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compressm_tune.errors import CompressmError, ReductionError
from compressm_tune.reduction import (
    _compressor,
    _gramians,
    _schedules,
    _truncation,
    balanced_truncation,
    from_lru_params,
    gramians,
    hankel_singular_values,
    rank_for_tolerance,
    to_lru_params,
)
from compressm_tune.reduction._truncation import _clamp_unstable, _rediagonalize

# ---------------------------------------------------------------- systems and references


def lru_system(rng, N, H, r_min=0.9, r_max=0.999):
    """The LRU init of DESIGN.md: |lam| uniform on [r_min, r_max], B scaled by gamma."""
    r = rng.uniform(r_min, r_max, N)  # (N,)
    lam = r * np.exp(1j * rng.uniform(0, 2 * np.pi, N))  # (N,)
    gamma = np.sqrt(1 - r**2)  # (N,)
    B = (rng.normal(size=(N, H)) + 1j * rng.normal(size=(N, H))) / np.sqrt(2 * H)  # (N, H)
    C = (rng.normal(size=(H, N)) + 1j * rng.normal(size=(H, N))) / np.sqrt(N)  # (H, N)
    return lam, B * gamma[:, None], C


def _edge_cases():
    rng = np.random.default_rng(20260)
    cases = {"random": lru_system(rng, 48, 4)}
    lam, B, C = lru_system(rng, 32, 3)
    cases["real"] = (rng.uniform(-0.99, 0.99, 32) + 0j, B, C)  # phase exactly 0 or pi
    lam, B, C = lru_system(rng, 32, 3)
    lam[:8] = 0.9999 * np.exp(1j * rng.uniform(0, 2 * np.pi, 8))
    cases["near_unit"] = (lam, B, C)
    lam, B, C = lru_system(rng, 32, 3)
    cases["repeated"] = (np.repeat(lam[:4], 8), B, C)  # 4 eigenvalues, 8 copies each
    lam, B, C = lru_system(rng, 32, 3)
    B[:10] *= 1e-12  # 10 nearly uncontrollable states
    cases["small_B"] = (lam, B, C)
    lam, B, C = lru_system(rng, 32, 3)
    C[:, :10] *= 1e-12  # 10 nearly unobservable states
    cases["small_C"] = (lam, B, C)
    return cases


CASES = _edge_cases()
CASE_IDS = list(CASES)


def scipy_gramians(lam, B, C):
    A = np.diag(lam)  # (N, N)
    P = scipy.linalg.solve_discrete_lyapunov(A, B @ B.conj().T)  # P = A P A^H + B B^H
    Q = scipy.linalg.solve_discrete_lyapunov(A.conj().T, C.conj().T @ C)  # Q = A^H Q A + C^H C
    return P, Q


_REF_CACHE: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def reference(case):
    """(P, Q, g) from scipy, g = sqrt(eig(P Q)) descending; cached per case."""
    if case not in _REF_CACHE:
        P, Q = scipy_gramians(*CASES[case])
        ev = np.linalg.eigvals(P @ Q).real  # (N,)
        _REF_CACHE[case] = (P, Q, np.sqrt(np.clip(np.sort(ev)[::-1], 0, None)))
    return _REF_CACHE[case]


def transfer(lam, B, C, z):
    """G(z) = C (zI - A)^-1 B by dense solves, A = diag(lam); (len(z), H, H)."""
    N = len(lam)
    M = z[:, None, None] * np.eye(N) - np.diag(lam)[None]  # (Z, N, N)
    return C[None] @ np.linalg.solve(M, np.broadcast_to(B, (len(z), *B.shape)))  # (Z, H, H)


def hinf_error(full, red, extra_angles=()):
    """max over |z| = 1 (512 points plus the full system's pole angles) of ||G - G_r||_2."""
    angles = np.concatenate([np.linspace(0, 2 * np.pi, 512, endpoint=False), extra_angles])
    z = np.exp(1j * angles)  # (Z,)
    diff = transfer(*full, z) - transfer(*red, z)  # (Z, H, H)
    return np.linalg.norm(diff, ord=2, axis=(1, 2)).max()


def impulse(lam, B, C, steps):
    """h_k = C A^k B by running x_k = A x_{k-1} from x_0 = B; (steps, H, H)."""
    A = np.diag(lam)  # (N, N)
    x = B.copy()  # (N, H)
    out = []
    for _ in range(steps):
        out.append(C @ x)  # (H, H)
        x = A @ x  # (N, H)
    return np.stack(out)  # (steps, H, H)


def assert_stable_finite(lam_r, B_r, C_r, rank, H):
    assert lam_r.shape == (rank,) and B_r.shape == (rank, H) and C_r.shape == (H, rank)
    assert lam_r.dtype == B_r.dtype == C_r.dtype == np.complex128
    for arr in (lam_r, B_r, C_r):
        assert np.isfinite(arr).all()
    assert np.abs(lam_r).max() < 1.0


# ---------------------------------------------------------------- Gramians and HSVs


@pytest.mark.parametrize("case", CASE_IDS)
def test_gramians_match_scipy_lyapunov(case):
    P_ref, Q_ref, _ = reference(case)
    P, Q = gramians(*CASES[case])
    np.testing.assert_allclose(P, P_ref, rtol=0, atol=1e-11 * np.abs(P_ref).max())
    np.testing.assert_allclose(Q, Q_ref, rtol=0, atol=1e-11 * np.abs(Q_ref).max())
    np.testing.assert_array_equal(P, P.conj().T)


@pytest.mark.parametrize("case", CASE_IDS)
def test_hsv_match_sqrt_eig_of_scipy_gramians(case):
    _, _, g_ref = reference(case)
    g = hankel_singular_values(*CASES[case])
    assert g.dtype == np.float64 and g.shape == g_ref.shape
    assert (np.diff(g) <= 0).all() and g[-1] >= 0  # descending, non-negative
    # eig(P Q) itself has absolute error ~ eps ||P|| ||Q||, i.e. ~ sqrt(eps) g[0] after the
    # square root: tight relative agreement on the large values, absolute on the rest
    big = g_ref >= 1e-3 * g_ref[0]
    np.testing.assert_allclose(g[big], g_ref[big], rtol=1e-8)
    np.testing.assert_allclose(g, g_ref, rtol=0, atol=1e-7 * g_ref[0])


def test_hsv_of_single_state_by_hand():
    # one state: P = |b|^2 / (1 - |lam|^2), Q = |c|^2 / (1 - |lam|^2), g = sqrt(P Q)
    g = hankel_singular_values(np.array([0.6j]), np.array([[2.0, 0.0]]), np.array([[3.0], [4.0]]))
    np.testing.assert_allclose(g, [2.0 * 5.0 / (1 - 0.36)], rtol=1e-14)


# ---------------------------------------------------------------- truncation error bounds


def _ranks(N):
    return sorted({1, 3, N // 4, N // 2, N - 1})


@pytest.mark.parametrize("case", CASE_IDS)
def test_transfer_function_error_within_twice_discarded_sum(case):
    lam, B, C = CASES[case]
    g = reference(case)[2]  # scipy HSVs, so the bound does not use the code under test
    poles = np.angle(lam)  # the full system's resonance peaks
    for rank in _ranks(len(lam)):
        red = balanced_truncation(lam, B, C, rank)
        assert_stable_finite(*red, rank, B.shape[1])
        err = hinf_error((lam, B, C), red, poles)
        slack = 1e-9 * g[0]  # roundoff floor of the reduced realization
        assert err <= 2 * g[rank:].sum() + slack, (rank, err, 2 * g[rank:].sum())
        # Hankel-norm lower bound; the reference g carries ~1e-7 g[0] absolute error
        assert err >= g[rank] * (1 - 1e-6) - 1e-7 * g[0], (rank, err, g[rank])


@pytest.mark.parametrize("case", ["random", "near_unit", "repeated"])
def test_impulse_response_error_within_bound(case):
    lam, B, C = CASES[case]
    g = reference(case)[2]
    h_full = impulse(lam, B, C, steps=300)  # (300, H, H)
    for rank in (2, len(lam) // 2):
        h_red = impulse(*balanced_truncation(lam, B, C, rank), steps=300)  # (300, H, H)
        worst = np.linalg.norm(h_full - h_red, ord=2, axis=(1, 2)).max()
        # ||h_k||_2 <= ||G||_inf for every k, so the H-infinity bound caps each step
        assert worst <= 2 * g[rank:].sum() + 1e-9 * g[0]


@settings(max_examples=25, deadline=None)
@given(
    N=st.integers(2, 12),
    H=st.integers(1, 3),
    seed=st.integers(0, 2**31),
    r_min=st.sampled_from([0.0, 0.5, 0.9]),
    data=st.data(),
)
def test_bound_holds_on_random_small_systems(N, H, seed, r_min, data):
    rng = np.random.default_rng(seed)
    lam, B, C = lru_system(rng, N, H, r_min=r_min, r_max=0.99)
    rank = data.draw(st.integers(1, N - 1))
    P, Q = scipy_gramians(lam, B, C)
    g = np.sqrt(np.clip(np.sort(np.linalg.eigvals(P @ Q).real)[::-1], 0, None))
    red = balanced_truncation(lam, B, C, rank)
    assert_stable_finite(*red, rank, H)
    assert hinf_error((lam, B, C), red, np.angle(lam)) <= 2 * g[rank:].sum() + 1e-7 * g[0]


@pytest.mark.parametrize("zero", ["B_rows", "C_cols"])
def test_known_order_system_embedded_in_64_states(zero):
    rng = np.random.default_rng(5)
    k, N, H = 5, 64, 2
    lam, B, C = lru_system(rng, N, H, r_min=0.3, r_max=0.95)
    if zero == "B_rows":
        B[k:] = 0.0  # 59 uncontrollable states
    else:
        C[:, k:] = 0.0  # 59 unobservable states
    g = hankel_singular_values(lam, B, C)
    assert g[k - 1] > 1e-3 * g[0]
    assert g[k:].max() <= 1e-12 * g[0]
    assert rank_for_tolerance(g, 1e-9) == k
    red = balanced_truncation(lam, B, C, k)
    G_norm = hinf_error((lam, B, C), (lam[:1], 0 * B[:1], 0 * C[:, :1]))  # ||G||_inf
    assert hinf_error((lam, B, C), red) <= 1e-8 * G_norm
    # the minimal realization has exactly the true modes as poles
    np.testing.assert_allclose(np.sort_complex(red[0]), np.sort_complex(lam[:k]), atol=1e-8)


def test_rank_above_numerical_order_pads_with_inert_states():
    rng = np.random.default_rng(6)
    lam, B, C = lru_system(rng, 64, 2, r_min=0.3, r_max=0.95)
    B[5:] = 0.0  # order 5
    red = balanced_truncation(lam, B, C, 12)
    assert_stable_finite(*red, 12, 2)
    assert (np.abs(red[1]).sum(axis=1) == 0).sum() == 7  # 7 inert states: zero B rows
    assert hinf_error((lam, B, C), red) <= 1e-9 * np.abs(C).sum() * np.abs(B).sum()


# ---------------------------------------------------------------- selections and edge cases


@pytest.mark.parametrize("case", CASE_IDS)
@pytest.mark.parametrize("select", ["largest", "smallest", "random", "magnitude"])
def test_every_selection_is_stable_and_finite_on_edge_cases(case, select):
    lam, B, C = CASES[case]
    for rank in (1, len(lam) // 3, len(lam) - 1):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no clamping needed on any of them
            red = balanced_truncation(lam, B, C, rank, select=select, seed=1)
        assert_stable_finite(*red, rank, B.shape[1])


def test_random_selection_is_seeded():
    lam, B, C = CASES["random"]
    a = balanced_truncation(lam, B, C, 10, select="random", seed=3)
    b = balanced_truncation(lam, B, C, 10, select="random", seed=3)
    c = balanced_truncation(lam, B, C, 10, select="random", seed=4)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.allclose(np.sort_complex(a[0]), np.sort_complex(c[0]))


def test_smallest_selection_keeps_the_weak_part():
    lam, B, C = CASES["random"]
    g = reference("random")[2]
    red = balanced_truncation(lam, B, C, 8, select="smallest")
    zero = (lam[:1], 0 * B[:1], 0 * C[:, :1])
    # the kept balanced states carry at most the smallest HSVs: ||G_r|| <= 2 * sum(g[-8:])
    assert hinf_error(red, zero, np.angle(red[0])) <= 2 * g[-8:].sum() * (1 + 1e-6)


def test_magnitude_selection_slices_the_largest_scores_in_original_order():
    lam = np.array([0.5, 0.9, 0.1j, -0.95])
    B = np.array([[1.0], [1.0], [3.0], [0.1]])
    C = np.array([[1.0, 1.0, 1.0, 1.0]])
    # scores |b||c|/(1-|lam|^2): 1/.75=1.33, 1/.19=5.26, 3/.99=3.03, .1/.0975=1.03
    lam_r, B_r, C_r = balanced_truncation(lam, B, C, 2, select="magnitude")
    np.testing.assert_array_equal(lam_r, lam[[1, 2]])
    np.testing.assert_array_equal(B_r, B[[1, 2]])
    np.testing.assert_array_equal(C_r, C[:, [1, 2]])


@pytest.mark.parametrize("rank", [64, 65, 1000])
def test_rank_at_least_n_is_an_exact_no_op(rank):
    lam, B, C = lru_system(np.random.default_rng(0), 64, 3)
    lam_r, B_r, C_r = balanced_truncation(lam, B, C, rank)
    for out, inp in ((lam_r, lam), (B_r, B), (C_r, C)):
        np.testing.assert_array_equal(out, inp)
        assert out.dtype == np.complex128 and out is not inp
    lam_r[0] = 0.0
    assert lam[0] != 0.0  # a copy, not a view


@pytest.mark.parametrize("rank", [0, -1, 2.0, True, None])
def test_bad_rank_raises(rank):
    lam, B, C = CASES["random"]
    with pytest.raises(ReductionError, match="rank must be an integer >= 1"):
        balanced_truncation(lam, B, C, rank)


def test_errors_are_value_errors_under_one_root():
    lam, B, C = CASES["random"]
    with pytest.raises(ValueError):
        balanced_truncation(lam, B, C, 0)
    with pytest.raises(CompressmError):
        balanced_truncation(lam, B, C, 0)


@pytest.mark.parametrize("bad", [1.0, -1.0, 0.6 + 0.8j, 1.2j])
def test_unstable_system_raises_naming_the_state(bad):
    lam, B, C = CASES["random"]
    lam = lam.copy()
    lam[7] = bad
    for fn in (hankel_singular_values, gramians, to_lru_params):
        with pytest.raises(ReductionError, match=r"\|lam_i\| < 1.*indices \[7\]"):
            fn(lam, B, C)
    with pytest.raises(ReductionError, match=r"\|lam_i\| < 1"):
        balanced_truncation(lam, B, C, 3)


@pytest.mark.parametrize("where", ["lam", "B", "C"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_input_raises(where, value):
    lam, B, C = (x.copy() for x in CASES["random"])
    {"lam": lam, "B": B, "C": C}[where].flat[2] = value
    with pytest.raises(ReductionError, match=f"{where} must be finite"):
        balanced_truncation(lam, B, C, 3)


def test_inconsistent_shapes_raise():
    lam, B, C = CASES["random"]
    with pytest.raises(ReductionError, match="shapes must be"):
        balanced_truncation(lam[:-1], B, C, 3)
    with pytest.raises(ReductionError, match="shapes must be"):
        hankel_singular_values(lam, B, C.T)
    with pytest.raises(ReductionError, match="1-D"):
        gramians(np.diag(lam), B, C)


def test_unknown_select_raises():
    lam, B, C = CASES["random"]
    with pytest.raises(ReductionError, match="select must be one of"):
        balanced_truncation(lam, B, C, 3, select="best")


def test_defective_reduced_matrix_is_reported():
    jordan = np.array([[0.5, 1.0], [0.0, 0.5]], dtype=complex)  # not diagonalizable
    with pytest.raises(ReductionError, match="defective"):
        _rediagonalize(jordan, np.ones((2, 1), complex), np.ones((1, 2), complex))


def test_roundoff_instability_is_clamped_with_a_warning():
    lam = np.array([0.5, 1.0 + 1e-15, -1.0j])
    with pytest.warns(RuntimeWarning, match="2 reduced eigenvalue"):
        out = _clamp_unstable(lam)
    np.testing.assert_allclose(np.abs(out), [0.5, 1 - 1e-6, 1 - 1e-6], rtol=1e-15)
    np.testing.assert_allclose(np.angle(out[1:]), np.angle(lam[1:]), atol=1e-15)


def test_rediagonalized_states_have_balanced_b_and_c_norms():
    lam, B, C = CASES["random"]
    _, B_r, C_r = balanced_truncation(lam, B, C, 10)
    np.testing.assert_allclose(np.linalg.norm(B_r, axis=1), np.linalg.norm(C_r, axis=0), rtol=1e-10)


# ---------------------------------------------------------------- torch


def test_torch_in_torch_out():
    lam, B, C = CASES["random"]
    lam_t, B_t, C_t = (torch.tensor(x, dtype=torch.complex64) for x in (lam, B, C))
    g = hankel_singular_values(lam_t, B_t, C_t)
    assert isinstance(g, torch.Tensor) and g.dtype == torch.float64
    P, Q = gramians(lam_t, B_t, C_t)
    assert isinstance(P, torch.Tensor) and P.dtype == torch.complex128
    for rank in (6, 48):  # a real cut and the no-op
        red_t = balanced_truncation(lam_t, B_t, C_t.requires_grad_(), rank)
        assert all(isinstance(x, torch.Tensor) and x.dtype == torch.complex128 for x in red_t)
        assert all(x.device == lam_t.device and not x.requires_grad for x in red_t)
    red_t = balanced_truncation(lam_t, B_t, C_t, 6)
    red_np = balanced_truncation(*(x.detach().numpy() for x in (lam_t, B_t, C_t)), 6)
    for x, y in zip(red_t, red_np, strict=True):
        np.testing.assert_array_equal(x.numpy(), y)


# ---------------------------------------------------------------- LRU parameterization


def test_lru_round_trip_random_system():
    lam, B, C = CASES["random"]
    p = to_lru_params(lam, B, C)
    assert set(p) == {"nu_log", "theta_log", "gamma_log", "B_re", "B_im", "C_re", "C_im"}
    assert all(v.dtype == np.float64 and np.isfinite(v).all() for v in p.values())
    np.testing.assert_allclose(np.exp(p["gamma_log"]), np.sqrt(1 - np.abs(lam) ** 2), rtol=1e-12)
    lam2, B2, C2 = from_lru_params(**p)
    np.testing.assert_allclose(lam2, lam, rtol=1e-13)
    np.testing.assert_allclose(B2, B, rtol=1e-13)
    np.testing.assert_array_equal(C2, C)


def test_lru_params_match_the_design_formula():
    # lam = exp(-exp(nu_log) + i exp(theta_log)) for a hand-picked eigenvalue
    lam = np.array([0.8 * np.exp(2.0j)])
    p = to_lru_params(lam, np.ones((1, 1)), np.ones((1, 1)))
    np.testing.assert_allclose(p["nu_log"], [np.log(-np.log(0.8))], rtol=1e-14)
    np.testing.assert_allclose(p["theta_log"], [np.log(2.0)], rtol=1e-14)
    np.testing.assert_allclose(p["B_re"], [[1 / np.sqrt(1 - 0.64)]], rtol=1e-14)


def test_lru_phase_in_zero_two_pi():
    lam = 0.7 * np.exp(1j * np.array([-0.5, np.pi, -np.pi + 1e-3, 3.0]))
    theta = np.exp(to_lru_params(lam, np.ones((4, 1)), np.ones((1, 4)))["theta_log"])
    np.testing.assert_allclose(theta, [2 * np.pi - 0.5, np.pi, np.pi + 1e-3, 3.0], rtol=1e-13)


def test_real_eigenvalues_give_finite_params_with_documented_error():
    lam = np.array([0.9, -0.9, 0.0, 1 - 1e-15, 0.5 + 1e-30j, 0.5 - 1e-30j])
    B, C = np.ones((6, 2)), np.ones((2, 6))
    p = to_lru_params(lam, B, C)
    assert all(np.isfinite(v).all() for v in p.values())
    lam2, B2, C2 = from_lru_params(**p)
    # phase floored at 1e-7 rad, |lam| clamped within 1e-12 of 1 and above e^-50
    assert np.all(np.abs(lam2 - lam) <= 1e-7 * np.abs(lam) + 1e-12)
    np.testing.assert_allclose(B2, B, rtol=1e-12)
    assert np.abs(lam2).max() < 1.0


def test_reduced_real_eigenvalue_system_round_trips():
    lam, B, C = CASES["real"]
    red = balanced_truncation(lam, B, C, 8)
    p = to_lru_params(*red)
    assert all(np.isfinite(v).all() for v in p.values())
    back = from_lru_params(**p)
    z = np.exp(1j * np.linspace(0, 2 * np.pi, 256, endpoint=False))
    scale = np.linalg.norm(transfer(*red, z), ord=2, axis=(1, 2)).max()
    assert np.linalg.norm(transfer(*red, z) - transfer(*back, z), ord=2, axis=(1, 2)).max() <= (
        1e-6 * scale
    )


def test_from_lru_params_torch_is_differentiable():
    p = to_lru_params(*CASES["random"])
    pt = {k: torch.tensor(v, dtype=torch.float32, requires_grad=True) for k, v in p.items()}
    lam, B, C = from_lru_params(**pt)
    assert lam.dtype == B.dtype == C.dtype == torch.complex64
    (lam.abs().sum() + B.abs().sum() + C.abs().sum()).backward()
    assert all(v.grad is not None and torch.isfinite(v.grad).all() for v in pt.values())
    lam_np = from_lru_params(**p)[0]
    np.testing.assert_allclose(lam.detach().numpy(), lam_np, rtol=1e-6)


def test_from_lru_params_rejects_bad_shapes():
    p = to_lru_params(*CASES["random"])
    p["B_im"] = p["B_im"][:, :-1]
    with pytest.raises(ReductionError, match="LRU parameters must be"):
        from_lru_params(**p)


@pytest.mark.parametrize("module", [_gramians, _truncation, _schedules, _compressor],
                         ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


# ---------------------------------------------------------------- input-weighted balancing


def _input_cov(rng, H, rank):
    """A random (H, H) covariance of the given rank and its factor W (H, rank)."""
    W = rng.normal(size=(H, rank))  # (H, rank)
    return W @ W.T, W


@pytest.mark.parametrize("cov_rank", [1, 2, 4])
def test_input_weighted_hsv_match_scipy_lyapunov_with_input_covariance(cov_rank):
    rng = np.random.default_rng(11)
    lam, B, C = lru_system(rng, 24, 4)
    R, _ = _input_cov(rng, 4, cov_rank)
    A = np.diag(lam)
    P = scipy.linalg.solve_discrete_lyapunov(A, B @ R @ B.conj().T)  # P = A P A^H + B R B^H
    Q = scipy.linalg.solve_discrete_lyapunov(A.conj().T, C.conj().T @ C)
    ref = np.sqrt(np.clip(np.sort(np.linalg.eigvals(P @ Q).real)[::-1], 0, None))
    g = hankel_singular_values(lam, B, C, input_cov=R)
    np.testing.assert_allclose(g, ref, atol=1e-7 * ref[0])
    P_ours, _ = gramians(lam, B, C, input_cov=R)
    np.testing.assert_allclose(P_ours, P, atol=1e-9 * np.abs(P).max())
    assert not np.allclose(g, hankel_singular_values(lam, B, C))  # the weight matters


def test_identity_input_covariance_is_the_unweighted_case():
    lam, B, C = CASES["random"]
    H = B.shape[1]
    np.testing.assert_allclose(hankel_singular_values(lam, B, C, input_cov=np.eye(H)),
                               hankel_singular_values(lam, B, C), rtol=1e-10)
    red_w = balanced_truncation(lam, B, C, 10, input_cov=np.eye(H))
    red = balanced_truncation(lam, B, C, 10)
    z = np.exp(1j * np.linspace(0, 2 * np.pi, 128, endpoint=False))
    np.testing.assert_allclose(transfer(*red_w, z), transfer(*red, z), atol=1e-9)


@pytest.mark.parametrize("cov_rank", [1, 3])
def test_weighted_truncation_error_on_the_input_subspace_within_twice_discarded_sum(cov_rank):
    rng = np.random.default_rng(12)
    lam, B, C = lru_system(rng, 40, 4, r_min=0.5, r_max=0.99)
    R, W = _input_cov(rng, 4, cov_rank)
    g = hankel_singular_values(lam, B, C, input_cov=R)
    for rank in (2, 6, 12):
        red = balanced_truncation(lam, B, C, rank, input_cov=R)
        assert_stable_finite(*red, rank, 4)
        # || (G - G_r) W ||_inf <= 2 sum(discarded weighted HSVs): the system (A, B W, C)
        full_w = (lam, B @ W, C)
        red_w = (red[0], red[1] @ W, red[2])
        assert hinf_error(full_w, red_w, np.angle(lam)) <= 2 * g[rank:].sum() + 1e-7 * g[0]


def test_states_driven_only_through_unexcited_inputs_score_zero_when_weighted():
    """Inputs confined to channel 0: states driven only by channel 1 are invisible in the
    data; weighted HSVs find the order reached from channel 0, unweighted ones do not."""
    rng = np.random.default_rng(13)
    k, N, H = 4, 32, 2
    lam, B, C = lru_system(rng, N, H, r_min=0.5, r_max=0.95)
    B[:k, 1] = 0.0  # states 0..k-1: channel 0 only
    B[k:, 0] = 0.0  # states k..N-1: channel 1 only
    R = np.diag([1.0, 0.0])  # the data excites channel 0 only
    g_w = hankel_singular_values(lam, B, C, input_cov=R)
    g = hankel_singular_values(lam, B, C)
    assert g_w[k:].max() <= 1e-12 * g_w[0] and g_w[k - 1] > 1e-3 * g_w[0]
    assert g[k:].max() > 1e-2 * g[0]  # unweighted: the channel-1 states count
    lam_r, B_r, C_r = balanced_truncation(lam, B, C, k, input_cov=R)
    z = np.exp(1j * np.linspace(0, 2 * np.pi, 256, endpoint=False))
    col0 = transfer(lam, B, C, z)[:, :, 0]  # (Z, H): the response to channel 0
    np.testing.assert_allclose(transfer(lam_r, B_r, C_r, z)[:, :, 0], col0,
                               atol=1e-8 * np.abs(col0).max())
    np.testing.assert_allclose(np.sort_complex(lam_r), np.sort_complex(lam[:k]), atol=1e-8)


@pytest.mark.parametrize("bad, match", [
    (np.eye(3), "shape"),
    (np.array([[1.0, 2.0], [0.0, 1.0]]), "Hermitian"),
    (np.diag([1.0, -1.0]), "positive semidefinite"),
    (np.array([[1.0, np.nan], [np.nan, 1.0]]), "finite"),
])
def test_bad_input_covariance_raises(bad, match):
    lam, B, C = lru_system(np.random.default_rng(14), 6, 2)
    with pytest.raises(ReductionError, match=match):
        hankel_singular_values(lam, B, C, input_cov=bad)


@pytest.mark.parametrize("how", ["hsv", "truncation"])
def test_overflowing_inputs_are_a_reduction_error_not_a_linalg_traceback(how):
    """Input covariances near the float64 limit (a diverged model's activations) overflow the
    Gramians: one ReductionError, not numpy's LinAlgError."""
    rng = np.random.default_rng(0)
    lam = 0.9 * np.exp(1j * rng.uniform(0, 6, 6))
    B = rng.normal(size=(6, 3)) + 0j
    C = rng.normal(size=(3, 6)) + 0j
    R = np.eye(3) * 1e307
    with pytest.raises(ReductionError, match="too large"):
        if how == "hsv":
            hankel_singular_values(lam, B, C, input_cov=R)
        else:
            balanced_truncation(lam, B, C, 2, input_cov=R)
