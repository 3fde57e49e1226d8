"""IndexSet / Attribution: indices follow the inverse permutation, scores take the sign."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_model, permutation_only

from hf_gauge import Attribution, Gauge, GaugeError, IndexSet, SignedPermutation, apply_gauge, random_gauge


def test_top_k_coordinates_follow_the_model(ids):
    a = tiny_model("llama", seed=1)
    g = random_gauge(a, seed=2, spaces=("residual", "mlp"))
    b = apply_gauge(copy.deepcopy(a), g)
    with torch.no_grad():
        ha = a(ids, output_hidden_states=True).hidden_states[1][0, -1]
        hb = b(ids, output_hidden_states=True).hidden_states[1][0, -1]
    top = torch.topk(ha.abs(), 8).indices
    att = Attribution(top, ha[top])
    moved = g.transport(att)
    assert torch.equal(moved.indices, torch.topk(hb.abs(), 8).indices)   # same coordinates, same order
    assert torch.allclose(moved.scores, hb[moved.indices], atol=1e-5)    # signed activations read off B
    assert g.transport(IndexSet(top)) == IndexSet(moved.indices)
    # permutation-only: same indices, but the scores keep their old signs, which disagree with B
    wrong = permutation_only(g).transport(att)
    assert torch.equal(wrong.indices, moved.indices)
    flipped = g.residual.sign[moved.indices] < 0
    assert flipped.any()
    assert not torch.allclose(wrong.scores, hb[wrong.indices], atol=1e-3)


def test_rules_match_the_group_action():
    d = 20
    q = SignedPermutation.random(d, 0)
    g = Gauge(residual=q, mlp={3: SignedPermutation.random(30, 1)})
    x = torch.randn(d, 5)                      # scores with an extra axis (e.g. per token)
    idx = torch.tensor([4, 0, 17, 9])
    att = Attribution(idx, x[idx])
    idx0, sc0 = att.indices.clone(), att.scores.clone()
    moved = g.transport(att)
    # the input is never mutated: its indices and scores keep their values, and the output owns new tensors
    assert torch.equal(att.indices, idx0) and torch.equal(att.scores, sc0)
    assert moved is not att and moved.scores.data_ptr() != att.scores.data_ptr()
    assert moved.indices.data_ptr() != att.indices.data_ptr()
    y = q.apply(x, dim=0)
    assert torch.equal(moved.indices, q.map_indices(idx))
    assert torch.equal(moved.scores, y[moved.indices])          # exact: a gather and a sign
    back = g.inverse().transport(moved)
    assert back == Attribution(idx, x[idx])
    s = g.transport(IndexSet([1, 2, 29], space="mlp.3"))
    assert s.space == "mlp.3" and s.tolist() == g["mlp.3"].map_indices([1, 2, 29]).tolist()
    assert g.transport(IndexSet([1, 2], space="mlp.0")).tolist() == [1, 2]      # a space the gauge leaves alone
    orig = IndexSet([3, 5])
    g.transport(orig)
    assert orig.tolist() == [3, 5]


def test_bad_inputs():
    g = Gauge(residual=SignedPermutation.random(8, 0))
    with pytest.raises(GaugeError, match="duplicate"):
        IndexSet([1, 2, 1])
    with pytest.raises(GaugeError, match="duplicate"):
        Attribution([0, 0], [1.0, 2.0])
    with pytest.raises(GaugeError, match="one entry per index"):
        Attribution([0, 1], [1.0])
    with pytest.raises(GaugeError, match="out of range"):
        g.transport(IndexSet([8]))
    with pytest.raises(GaugeError, match="integers"):
        IndexSet([0.5])
    with pytest.raises(GaugeError, match="unknown gauge space"):
        IndexSet([0], space="heads")
    assert len(IndexSet([])) == 0 and len(g.transport(IndexSet([]))) == 0


def test_head_attribution_follows_the_head_gauge(ids):
    """Head-indexed attribution lists (space ``attn.<layer>``): head indices move with the head permutation."""
    a = tiny_model("llama", seed=4, heads=8, kv_heads=2)
    g = random_gauge(a, seed=5, spaces=("residual", "mlp", "attn"))
    assert not g["attn.1"].is_identity
    b = apply_gauge(copy.deepcopy(a), g)

    def head_norms(m):
        seen = {}
        h = m.model.layers[1].self_attn.o_proj.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
        with torch.no_grad():
            m(ids)
        h.remove()
        x = seen["x"]
        return x.reshape(*x.shape[:-1], 8, -1).norm(dim=-1).mean(dim=(0, 1))      # [heads]

    sa, sb = head_norms(a), head_norms(b)
    top = torch.topk(sa, 3).indices
    moved = g.transport(Attribution(top, sa[top], space="attn.1"))
    assert moved.space == "attn.1"
    assert torch.equal(moved.indices, torch.topk(sb, 3).indices)
    assert torch.allclose(moved.scores, sb[moved.indices], atol=1e-5)
    assert not torch.equal(moved.indices, top)                                 # the raw head indices are stale


def test_gauge_invariant_scores_keep_their_values(ids):
    """activation x gradient is the same number in every chart: ``signed=False`` keeps it; the default would flip it."""
    a = tiny_model("llama", seed=6)
    g = random_gauge(a, seed=7)
    b = apply_gauge(copy.deepcopy(a), g)

    def act_x_grad(m):
        out = m(ids, output_hidden_states=True)
        h = out.hidden_states[1]
        h.retain_grad()
        out.logits[..., 3].sum().backward()
        return (h * h.grad).sum(dim=(0, 1)).detach()           # [d]: one attribution per residual coordinate

    sa, sb = act_x_grad(a), act_x_grad(b)
    top = torch.topk(sa.abs(), 6).indices
    moved = g.transport(Attribution(top, sa[top], signed=False))
    assert torch.equal(moved.indices, torch.topk(sb.abs(), 6).indices) and not moved.signed
    assert torch.allclose(moved.scores, sb[moved.indices], atol=1e-5, rtol=1e-4)
    wrong = g.transport(Attribution(top, sa[top]))                 # treated as a signed coordinate value
    assert (g.residual.sign[wrong.indices] < 0).any()
    assert not torch.allclose(wrong.scores, sb[wrong.indices], atol=1e-3)
    assert moved != wrong and g.inverse().transport(moved) == Attribution(top, sa[top], signed=False)
