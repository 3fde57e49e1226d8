"""Matching MLP-unit and attention-head gauges (hf_gauge.inner), from activations and data-free."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import VOCAB, tiny_model
from hf_gauge import GaugeError, SignedPermutation, apply_gauge, random_gauge
from hf_gauge.features import match_residual_from_weights
from hf_gauge.inner import match_inner
from hf_gauge.match import find_full_gauge, find_gauge

FULL = ("residual", "mlp", "attn")
RMS_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def _pair(model_type: str, seed: int = 3, **kw):
    a = tiny_model(model_type, **kw)
    b = copy.deepcopy(a)
    g = random_gauge(a, seed=seed, spaces=FULL)
    apply_gauge(b, g)
    return a, b, g


def _data(n: int = 4, t: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def _inner_of(g):
    return {k: v for k, v in g.spaces.items() if k != "residual"}


@pytest.mark.parametrize("model_type", RMS_FAMILIES + ("gpt_neox",))
def test_activation_matching_recovers_hidden_inner_gauges(model_type):
    a, b, g = _pair(model_type, heads=8, kv_heads=2 if model_type != "gpt_neox" else 8)
    got = match_inner(a, b, data=_data())
    assert set(got) == set(_inner_of(g))
    for space, el in _inner_of(g).items():
        assert got[space] == el, space
        assert got.confidence[space]["mean_score"] > 0.999
        assert got.confidence[space]["n_tokens"] == 4 * 32
    if model_type != "gpt_neox":      # the hidden MLP gauges really carry signs (about half negative)
        assert 0.3 < g["mlp.0"].positive_fraction < 0.7


@pytest.mark.parametrize("model_type", RMS_FAMILIES + ("gpt_neox",))
def test_data_free_matching_recovers_hidden_inner_gauges(model_type):
    a, b, g = _pair(model_type, heads=8, kv_heads=2 if model_type != "gpt_neox" else 8, tie=True)
    with_res = match_inner(a, b, residual=g.residual)
    assert dict(with_res) == _inner_of(g)
    # no residual given: found first by the data-free residual matcher that find_gauge(data=None) uses
    assert match_residual_from_weights(a, b)[0].element == find_gauge(a, b).residual == g.residual
    assert dict(match_inner(a, b)) == _inner_of(g)
    assert min(c["min_margin"] for c in with_res.confidence.values()) > 0.05
    # a wrong residual gauge scrambles the slices: the data-free MLP match must fail then (not a tautology)
    wrong = match_inner(a, b, residual=SignedPermutation.identity(a.config.hidden_size), spaces=("mlp",))
    assert any(wrong[k] != g[k] for k in wrong)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_find_full_gauge_returns_every_space(model_type):
    a, b, g = _pair(model_type)
    for data in (None, _data()):
        full = find_full_gauge(a, b, data=data)
        assert full == g
        assert full.source["model_type"] == model_type
    # and the found gauge moves A onto B exactly
    apply_gauge(a, find_full_gauge(a, b))
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_gauge_to_spaces_all_recovers_full_gauge_from_batches_and_weights():
    a, b, g = _pair("mistral", seed=5)
    batches = [{"input_ids": x[None], "attention_mask": torch.ones(1, 32, dtype=torch.long)} for x in _data()]
    for data in (None, batches):
        full = a.gauge_to(b, data=data, spaces="all")
        assert full == g and "+inner" in full.method
        assert set(full.confidence) >= set(g.spaces)
    only_mlp = a.gauge_to(b, spaces=("residual", "mlp"))
    assert set(only_mlp.spaces) == {"residual"} | {k for k in g.spaces if k.startswith("mlp.")}
    with pytest.raises(GaugeError, match="includes 'residual'"):
        a.gauge_to(b, spaces=("mlp",))
    with pytest.raises(GaugeError, match="procrustes"):
        a.gauge_to(b, data=_data(), method="procrustes", spaces="all")


def test_permutation_baseline_misses_flipped_units():
    a, b, g = _pair("llama")
    got = match_inner(a, b, data=_data(), method="permutation", spaces=("mlp",))
    for space, el in got.items():
        assert el.is_permutation
        acc = float((el.perm == g[space].perm).double().mean())
        # capped near the fraction of + signs in the true gauge (the sign-marginalized match gets 1.0)
        assert acc <= g[space].positive_fraction + 0.1
    assert all(match_inner(a, b, data=_data(), spaces=("mlp",))[k] == g[k] for k in got)


def test_matching_is_robust_to_small_drift():
    a, b, g = _pair("qwen3")
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in b.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02 * p.std())
    assert dict(match_inner(a, b, residual=g.residual)) == _inner_of(g)
    assert dict(match_inner(a, b, data=_data(8, 32))) == _inner_of(g)


def test_padding_is_excluded_and_statistics_stream():
    a, b, g = _pair("mistral")
    ids = _data(3, 24)
    lengths = [24, 17, 9]
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        mask[r, :n] = 1
    padded = ids.clone()
    padded[mask == 0] = 0
    got = match_inner(a, b, data={"input_ids": padded, "attention_mask": mask}, spaces=("mlp.0", "attn.1"))
    # the same tokens, unpadded, one sequence at a time
    ref = match_inner(a, b, data=[ids[r:r + 1, :n] for r, n in enumerate(lengths)], spaces=("mlp.0", "attn.1"))
    for s in ("mlp.0", "attn.1"):
        assert got[s] == g[s] == ref[s]
        assert got.confidence[s]["n_tokens"] == sum(lengths)
        assert got.confidence[s]["mean_score"] == pytest.approx(ref.confidence[s]["mean_score"], abs=1e-9)
    # a tiny statistics budget forces one pass per space: same answer
    small = match_inner(a, b, data=ids, max_stat_bytes=1)
    assert dict(small) == _inner_of(g)


def test_refusals():
    a = tiny_model("llama")
    with pytest.raises(GaugeError, match="cannot match"):
        match_inner(a, tiny_model("gpt_neox"))
    with pytest.raises(GaugeError, match="widths"):
        match_inner(a, tiny_model("llama", intermediate=80))
    with pytest.raises(GaugeError, match="'mlp', 'attn'"):
        match_inner(a, a, spaces=("residual",))
    with pytest.raises(GaugeError, match="layers"):
        match_inner(a, a, layers=[7])
    with pytest.raises(GaugeError, match="token ids"):
        match_inner(a, a, data=torch.randn(2, 5))


def test_smollm2_data_free_and_activations(smollm2, smollm2_ids):
    b = copy.deepcopy(smollm2)
    g = random_gauge(smollm2, seed=9, spaces=FULL)
    apply_gauge(b, g)
    # data-free, every layer (30 x 1536 SwiGLU units, 30 x 9 heads in 3 KV groups), residual from embeddings
    got = match_inner(smollm2, b)
    assert dict(got) == _inner_of(g)
    assert min(c["min_margin"] for k, c in got.confidence.items() if k.startswith("mlp.")) > 0.1
    # from activations on real text (first, middle and last layer; 2 x 32 tokens)
    acts = match_inner(smollm2, b, data=smollm2_ids[:2, :32], layers=[0, 15, 29])
    assert dict(acts) == {k: g[k] for k in ("mlp.0", "mlp.15", "mlp.29", "attn.0", "attn.15", "attn.29")}


@pytest.mark.parametrize("model_type", ["llama", "gpt_neox"])
def test_units_the_data_cannot_tell_apart_are_assigned_from_the_weights(model_type):
    """Units silent on the data (a ReLU unit never active) have no activation margin: their correlation columns are
    all zero, so activations alone leave them in any order. They are reassigned from the weights within the tie."""
    a, b, g = _pair(model_type, heads=8, kv_heads=2 if model_type != "gpt_neox" else 8)
    silent = [3, 17, 40]
    for m, order in ((a, silent), (b, [int((g.spaces["mlp.0"].perm == u).nonzero()) for u in silent])):
        mlp = m.gpt_neox.layers[0].mlp if model_type == "gpt_neox" else m.model.layers[0].mlp
        up = mlp.dense_h_to_4h if model_type == "gpt_neox" else mlp.up_proj
        with torch.no_grad():       # the unit's pre-activation is 0 on every token: GELU(0) = 0, silu(gate) * 0 = 0
            up.weight[order] = 0.0
            if up.bias is not None:
                up.bias[order] = 0.0
    got = match_inner(a, b, data=_data(), spaces=("mlp",))
    assert got.confidence["mlp.0"]["source"] == "activations+weights"
    assert got.confidence["mlp.0"]["tied_units"] == len(silent)
    for space, el in got.items():
        assert torch.equal(el.perm, g.spaces[space].perm), space
        assert torch.equal(el.sign, g.spaces[space].sign), space
