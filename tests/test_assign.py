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
