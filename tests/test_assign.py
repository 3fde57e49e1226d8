"""assign.match_correlation with ``overwrite=True``: C's memory becomes the cost, the result is unchanged."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_gauge.assign import match_correlation
from hf_gauge.group import SignedPermutation


def _planted(d: int, seed: int) -> tuple[np.ndarray, SignedPermutation]:
    g = SignedPermutation.random(d, seed)
    rng = np.random.default_rng(seed)
    C = rng.standard_normal((d, d)) * 0.1
    C[g.perm.numpy(), np.arange(d)] = g.sign.numpy() * rng.uniform(0.5, 1.0, d)
    if d > 1:
        C[0, 1] = -0.0                           # a negative zero off the match: signs are read as C < 0
    return C, g


@pytest.mark.parametrize("d", [1, 7, 8, 300, 600])     # 600: more rows than one packed sign step (256)
@pytest.mark.parametrize("method", ["signed", "permutation"])
def test_overwrite_same_match_and_consumes_c(d: int, method: str) -> None:
    C, g = _planted(d, seed=d)
    keep = C.copy()
    want = match_correlation(C, method)
    assert np.array_equal(C, keep)                          # the default leaves C alone
    got = match_correlation(C, method, overwrite=True)
    assert got.element == want.element
    assert np.array_equal(got.score, want.score) and np.array_equal(got.margin, want.margin)
    if method == "signed":
        assert got.element == g
    if d > 1:
        assert not np.array_equal(C, keep)                 # C was the scratch
    t = torch.from_numpy(keep.copy())                      # a float64 CPU tensor: its memory too
    assert match_correlation(t, method, overwrite=True).element == want.element
    assert d == 1 or not torch.equal(t, torch.from_numpy(keep))


def test_overwrite_of_a_view_or_other_dtype_copies() -> None:
    C, g = _planted(50, seed=3)
    wide = np.zeros((50, 60))
    wide[:, :50] = C
    view = wide[:, :50]                                     # not C-contiguous: a scratch is allocated
    assert match_correlation(view, overwrite=True).element == g
    assert np.array_equal(wide[:, :50], C)
    c32 = torch.from_numpy(C).float()                      # float32: converted, so the input stays as it was
    before = c32.clone()
    assert match_correlation(c32, overwrite=True).element == g
    assert torch.equal(c32, before)


def _scipy_match(C: np.ndarray, method: str):
    """The reference: scipy's Hungarian solve on the cost, and the margins as ``_runner_up`` forms them."""
    from scipy.optimize import linear_sum_assignment

    from hf_gauge.assign import _runner_up
    cost = -(np.abs(C) if method == "signed" else C.copy())
    rows, cols = linear_sum_assignment(cost)
    matched = -cost[rows, cols]
    return rows, cols, matched, matched - _runner_up(cost.copy(), rows, cols)


@pytest.mark.parametrize("method", ["signed", "permutation"])
@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("noise", [0.05, 0.5, 2.0])         # a clear planted match ... argmins that collide
def test_argmin_shortcut_gives_the_hungarian_result(method, overwrite, noise):
    """The assignment (signs, scores, margins) is scipy's, whether or not the argmins form a strict permutation."""
    from hf_gauge.group import SignedPermutation

    d = 300
    g = SignedPermutation.random(d, 4)
    rng = np.random.default_rng(int(noise * 100))
    C = rng.standard_normal((d, d)) * noise
    C[g.perm.numpy(), np.arange(d)] += (g.sign.numpy() if method == "signed" else 1.0) * rng.uniform(0.5, 1.0, d)
    rows, cols, matched, margin = _scipy_match(C, method)
    m = match_correlation(C.copy(), method, overwrite=overwrite)
    perm = np.empty(d, dtype=np.int64)
    perm[cols] = rows
    assert np.array_equal(m.element.perm.numpy(), perm)
    if method == "signed":
        assert np.array_equal(m.element.sign.numpy(), np.where(C[perm, np.arange(d)] < 0, -1, 1))
    score = np.empty(d)
    score[cols] = matched
    exp_margin = np.empty(d)
    exp_margin[cols] = margin
    assert np.array_equal(m.score, score) and np.array_equal(m.margin, exp_margin)


def test_argmin_shortcut_skips_the_solver_only_when_it_is_the_unique_optimum(monkeypatch):
    """Strict argmins in distinct columns: no Hungarian solve. Two rows whose argmin is one column, or a tie in a row:
    the solver runs (and the greedy choice would be wrong for the first)."""
    import scipy.optimize

    calls = []
    real = scipy.optimize.linear_sum_assignment
    monkeypatch.setattr(scipy.optimize, "linear_sum_assignment", lambda c: calls.append(1) or real(c))
    match_correlation(np.eye(5) + 0.01 * np.arange(25).reshape(5, 5) / 25)
    assert calls == []
    C = np.array([[0.9, 0.8], [0.95, 0.1]])                 # both rows prefer column 0; the optimum is 0->1, 1->0
    m = match_correlation(C, "permutation")
    assert calls == [1] and m.element.perm.tolist() == [1, 0]
    tie = np.array([[0.5, 0.5, 0.0], [0.0, 0.4, 0.9], [0.9, 0.0, 0.1]])
    match_correlation(tie, "permutation")
    assert calls == [1, 1]
