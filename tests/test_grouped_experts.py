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


# --------------------------------------------------------------------------------------------- on GLM-4.5 MoE
def _glm4_moe():
    from test_architectures import build
    model = build("glm4_moe")                      # 8 experts in n_group=2 routing groups of 4, topk_group=1
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():                          # a buffer: the battery's randomize() leaves it at zero
        for layer in model.model.layers:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8, generator=gen) * 0.3)
    return model


def test_glm4_moe_group_mixing_is_refused_and_breaks_the_function():
    import copy

    from hf_gauge import Gauge, apply_gauge
    from hf_gauge.engine import move_tensor_, moves_for
    from hf_gauge.view import ModelView
    from test_architectures import close, logits
    model = _glm4_moe()
    ids = torch.randint(0, 127, (2, 9), generator=torch.Generator().manual_seed(7))
    ref = logits(model, ids)
    whole = Gauge(spaces={"moe.1": SignedPermutation([5, 4, 6, 7, 1, 0, 3, 2])})     # groups swapped, and inside
    assert close(logits(apply_gauge(copy.deepcopy(model), whole), ids), ref)
    mixed = Gauge(spaces={"moe.1": SignedPermutation([0, 1, 2, 4, 3, 5, 6, 7])})     # experts 3 and 4 change groups
    with pytest.raises(GaugeError, match="mixes routing groups"):
        apply_gauge(copy.deepcopy(model), mixed)
    bad = copy.deepcopy(model)
    v = ModelView.of(bad)
    params = dict(v.named_parameters())
    for n, mv in moves_for(v.spec, bad.config, mixed, params).items():
        move_tensor_(params[n].data, mv)
    assert not close(logits(bad, ids), ref, 1e-3)


def test_glm4_moe_router_bias_buffer_moves_with_the_experts():
    import copy

    from hf_gauge import Gauge, apply_gauge
    from hf_gauge.view import ModelView
    from test_architectures import close, logits
    model = _glm4_moe()
    name = "model.layers.0.mlp.gate.e_score_correction_bias"
    assert name in dict(ModelView.of(model).named_parameters())            # a buffer, moved like a parameter
    ids = torch.randint(0, 127, (2, 9), generator=torch.Generator().manual_seed(7))
    ref = logits(model, ids)
    g = Gauge(spaces={f"moe.{i}": SignedPermutation([5, 4, 6, 7, 1, 0, 3, 2]) for i in range(2)})
    moved = apply_gauge(copy.deepcopy(model), g)
    assert close(logits(moved, ids), ref)
    buf = moved.model.layers[0].mlp.gate.e_score_correction_bias
    assert torch.equal(buf, model.model.layers[0].mlp.gate.e_score_correction_bias[g["moe.0"].perm])
    with torch.no_grad():
        buf.copy_(model.model.layers[0].mlp.gate.e_score_correction_bias)      # left in the old chart
    assert not close(logits(moved, ids), ref, 1e-3)
