"""Rank policies, the 0.95 gate, CLI parsing and hardware rounding, on hand-computed spectra."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch

from compressm_tune.errors import ConfigError, ReductionError
from compressm_tune.reduction import (
    ReductionPolicy,
    _policies,
    plan_rank,
    rank_for_tolerance,
    round_up_to,
)

# g = [5, 3, 1, .5, .5], sum 10: cumulative shares .5 .8 .9 .95 1.0 (all exact in binary
# except .8/.9/.95, so no tau below sits on a tie except tau = .5)
SPECTRUM = [5.0, 3.0, 1.0, 0.5, 0.5]


@pytest.mark.parametrize(
    ("tau", "expected"),
    [
        (0.0, 5),  # keep everything
        (0.04, 5),  # need >= .96: only the full sum
        (0.06, 4),  # need >= .94: .95 at r = 4
        (0.15, 3),  # need >= .85: .90 at r = 3
        (0.25, 2),  # need >= .75: .80 at r = 2
        (0.5, 1),  # need >= .50: exactly .5 at r = 1
        (0.99, 1),
    ],
)
def test_rank_for_tolerance_hand_computed(tau, expected):
    assert rank_for_tolerance(SPECTRUM, tau) == expected


def test_rank_for_tolerance_sums_linearly_not_squared():
    # g = [3, 1]: linear shares .75, 1.0; energy (squared) shares .9, 1.0
    assert rank_for_tolerance([3.0, 1.0], 0.2) == 2  # .75 < .8: the linear sum needs both
    assert rank_for_tolerance([3.0, 1.0], 0.25) == 1


def test_rank_for_tolerance_accepts_unsorted_and_torch():
    assert rank_for_tolerance([0.5, 5.0, 1.0, 3.0, 0.5], 0.15) == 3
    assert rank_for_tolerance(torch.tensor(SPECTRUM, dtype=torch.float64), 0.15) == 3


def test_rank_for_tolerance_zero_tail_and_all_zero():
    assert rank_for_tolerance([2.0, 1.0, 0.0, 0.0], 0.0) == 2  # zeros never kept
    assert rank_for_tolerance(np.zeros(7), 0.1) == 1  # at least one state


def test_rank_for_tolerance_tau_zero_on_roundoff_prone_sum():
    g = np.full(1000, 0.1)  # sum of 0.1s is not exactly 100 in floating point
    assert rank_for_tolerance(g, 0.0) == 1000


@pytest.mark.parametrize("tau", [-0.01, 1.0, 2.0, float("nan")])
def test_rank_for_tolerance_rejects_bad_tau(tau):
    with pytest.raises(ReductionError, match="0 <= tau < 1"):
        rank_for_tolerance(SPECTRUM, tau)


@pytest.mark.parametrize("g", [[], [[1.0, 2.0]], [1.0, np.nan], [1.0, -0.5]])
def test_rank_for_tolerance_rejects_bad_spectrum(g):
    with pytest.raises(ReductionError, match="g must be"):
        rank_for_tolerance(g, 0.1)


# ---------------------------------------------------------------- ReductionPolicy.parse


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("tau=0.04", ReductionPolicy("tau", 0.04)),
        ("rank=16", ReductionPolicy("rank", 16.0)),
        ("fraction=0.25", ReductionPolicy("fraction", 0.25)),
        (" tau = 0.1 , gate=0.9 ", ReductionPolicy("tau", 0.1, gate=0.9)),
        ("rank=8,select=random,seed=3", ReductionPolicy("rank", 8, select="random", seed=3)),
        ("tau=0.1,weighting=input", ReductionPolicy("tau", 0.1, weighting="input")),
    ],
)
def test_parse_valid(spec, expected):
    assert ReductionPolicy.parse(spec) == expected


def test_defaults_match_the_paper():
    assert ReductionPolicy() == ReductionPolicy("tau", 0.04, 0.95, "largest", None, "none")


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("", "key=value pairs"),
        ("tau", "key=value pairs"),
        ("tau=", "key=value pairs"),
        ("tau=0.1,", "key=value pairs"),
        ("foo=1", "keys are one of"),
        ("tau=0.1,tau=0.2", "at most once"),
        ("gate=0.9", "exactly one of"),
        ("tau=0.1,rank=3", "exactly one of"),
        ("tau=abc", "non-numeric"),
        ("tau=0.1,seed=x", "non-numeric"),
        ("tau=1.5", "0 <= tau < 1"),
        ("tau=-0.1", "0 <= tau < 1"),
        ("rank=0", "an integer >= 1"),
        ("rank=2.5", "an integer >= 1"),
        ("fraction=0", "0 < f <= 1"),
        ("fraction=1.5", "0 < f <= 1"),
        ("tau=0.1,gate=0", "0 < gate <= 1"),
        ("tau=0.1,gate=1.2", "0 < gate <= 1"),
        ("tau=0.1,select=best", "select must be one of"),
        ("tau=0.1,weighting=output", "weighting must be one of"),
    ],
)
def test_parse_errors_are_config_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        ReductionPolicy.parse(spec)


def test_direct_construction_validates():
    with pytest.raises(ConfigError, match="kind must be one of"):
        ReductionPolicy(kind="energy")
    with pytest.raises(ValueError):  # ConfigError is a ValueError
        ReductionPolicy("fraction", 0.0)


# ---------------------------------------------------------------- plan_rank and the gate

G20 = [4.0, 3.0, 2.0, 1.0] + [0.0] * 16  # N = 20, gate at 0.95 * 20 = 19


def test_plan_rank_tau():
    assert plan_rank(G20, ReductionPolicy("tau", 0.15)) == 3  # shares .4 .7 .9 1.


def test_plan_rank_gate_blocks_small_cuts():
    assert plan_rank(G20, ReductionPolicy("rank", 18)) == 18
    assert plan_rank(G20, ReductionPolicy("rank", 19)) is None  # 19 >= 0.95 * 20
    assert plan_rank(G20, ReductionPolicy("rank", 40)) is None  # capped at N: no cut
    assert plan_rank(G20, ReductionPolicy("rank", 15, gate=0.75)) is None  # 15 >= 15
    assert plan_rank(G20, ReductionPolicy("rank", 14, gate=0.75)) == 14


def test_plan_rank_tau_gate_on_flat_spectrum():
    # a flat spectrum: tau = .04 of 100 equal HSVs keeps 96 >= 95, so no cut
    assert plan_rank(np.ones(100), ReductionPolicy("tau", 0.04)) is None
    assert plan_rank(np.ones(100), ReductionPolicy("tau", 0.06)) == 94


def test_plan_rank_fraction():
    assert plan_rank(np.ones(64), ReductionPolicy("fraction", 0.25)) == 16
    assert plan_rank(np.ones(10), ReductionPolicy("fraction", 0.25)) == 3  # ceil(2.5)
    assert plan_rank(np.ones(10), ReductionPolicy("fraction", 0.01)) == 1
    assert plan_rank(np.ones(10), ReductionPolicy("fraction", 1.0)) is None


def test_plan_rank_rounding_hook_then_gate():
    tau = ReductionPolicy("tau", 0.15)  # r = 3 on G20
    assert plan_rank(G20, tau, round_to=round_up_to([8, 16])) == 8
    assert plan_rank(G20, tau, round_to=round_up_to([2])) is None  # no width >= 3: N, gated
    assert plan_rank(G20, tau, round_to=lambda r, N: 1) == 3  # clipped up to r
    assert plan_rank(G20, tau, round_to=lambda r, N: 500) is None  # clipped down to N


# ---------------------------------------------------------------- round_up_to


def test_round_up_to():
    f = round_up_to([64, 16, 32, 16])  # unsorted, duplicated
    assert [f(r, 100) for r in (1, 16, 17, 33, 64, 65)] == [16, 16, 32, 64, 64, 100]
    assert f(20, 24) == 24  # next width 32 exceeds N


@pytest.mark.parametrize("widths", [[], [0, 8], [8.0], [True]])
def test_round_up_to_rejects_bad_widths(widths):
    with pytest.raises(ConfigError, match="widths must"):
        round_up_to(widths)


def test_docstring_examples_run():
    result = doctest.testmod(_policies, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0
