"""The ``grouped_experts`` kind (``hf_gauge.kinds.ExpertsKind(groups="n_group")``): experts under group-limited
routing move groups as wholes. Drawn, checked, matched and refused on the kind alone (no model)."""
from __future__ import annotations

import pytest
import torch

from hf_gauge import GaugeError, SignedPermutation
from hf_gauge.assign import UnitSlice
from hf_gauge.kinds import get_kind


class Cfg:
    model_type = "toy"

    def __init__(self, n_group):
        self.n_group = n_group

    def get(self, name, default=None):
        return getattr(self, name, default)


KIND = get_kind("grouped_experts")


def _groups_whole(perm: torch.Tensor, g: int) -> bool:
    blocks = perm.view(-1, g) // g
    return bool(torch.all(blocks == blocks[:, :1]))


def test_random_elements_move_groups_as_wholes():
    gen = torch.Generator().manual_seed(0)
    els = [KIND.random(8, "none", "signed", gen, None, Cfg(4)) for _ in range(20)]
    assert all(el.is_permutation and _groups_whole(el.perm, 2) for el in els)
    assert any(not torch.equal(el.perm.view(4, 2)[:, 0] // 2, torch.arange(4)) for el in els)   # groups do move
    assert any(bool((el.perm.view(4, 2)[:, 0] % 2 == 1).any()) for el in els)                      # and within them
    assert KIND.group_size(8, Cfg(None)) == KIND.group_size(8, Cfg(1)) == 8      # one group: every expert


def test_mixing_groups_or_signs_is_refused():
    ok = SignedPermutation([2, 3, 0, 1, 5, 4, 7, 6])           # groups {0,1} <-> {2,3}, swaps inside the others
    KIND.check("moe.1", ok, "none", Cfg(4))
    with pytest.raises(GaugeError, match="mixes routing groups.*n_group"):
        KIND.check("moe.1", SignedPermutation([1, 2, 0, 3, 4, 5, 6, 7]), "none", Cfg(4))
    with pytest.raises(GaugeError, match="permutes whole experts"):
        KIND.check("moe.1", SignedPermutation(torch.arange(8), [1, -1, 1, 1, 1, 1, 1, 1]), "none", Cfg(4))
    KIND.check("moe.1", SignedPermutation([1, 2, 0, 3, 4, 5, 6, 7]), "none", Cfg(1))   # one group: any permutation
    for bad in (3, 0, True, "2"):
        with pytest.raises(GaugeError, match="routing groups"):
            KIND.group_size(8, Cfg(bad))


def test_weight_matching_respects_groups():
    """Router rows whose nearest neighbour lies in another group are still assigned group-wise."""
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(8, 16, generator=gen, dtype=torch.float64)
    true = SignedPermutation([6, 7, 4, 5, 1, 0, 3, 2])           # B's slot k holds A's expert perm[k]
    sa = [UnitSlice("router", rows, signed=False, kv=False)]
    sb = [UnitSlice("router", rows[true.perm], signed=False, kv=False)]
    found, _ = KIND.match_weights(sa, sb, False, "signed", Cfg(4))
    assert found == true
    assert _groups_whole(found.perm, 2)
