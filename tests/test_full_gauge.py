"""Full gauges (residual + MLP units + attention heads): function preservation and bit-exact inverses."""
from __future__ import annotations

import pytest
import torch

from conftest import ALL_FAMILIES, assert_state_equal, logits, state, tiny_model
from hf_gauge import Gauge, GaugeError, SignedPermutation, apply_gauge, random_gauge

FULL = ("residual", "mlp", "attn")


def _changed(a: dict, b: dict) -> int:
    return sum(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("model_type", ALL_FAMILIES)
def test_full_gauge_preserves_logits_and_inverts_exactly(model_type, tie, ids):
    model = tiny_model(model_type, tie=tie)
    ref, before = logits(model, ids), state(model)
    g = random_gauge(model, seed=11, spaces=FULL)
    n = model.config.num_hidden_layers
    assert set(g.spaces) == {"residual"} | {f"mlp.{i}" for i in range(n)} | {f"attn.{i}" for i in range(n)}
    assert not any(el.is_identity for el in g.spaces.values())
    apply_gauge(model, g)
    moved = state(model)
    # every layer's tensors moved (so the logits check below is not vacuous)
    assert _changed(before, moved) >= 0.8 * len(before)
    torch.testing.assert_close(logits(model, ids), ref, atol=1e-5, rtol=0)
    apply_gauge(model, g.inverse())
    assert_state_equal(state(model), before)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gpt_neox"])
def test_full_gauge_bf16_inverse_is_bit_exact(model_type, ids):
    model = tiny_model(model_type, dtype=torch.bfloat16)
    ref, before = logits(model, ids), state(model)
    g = random_gauge(model, seed=5, spaces=FULL)
    apply_gauge(model, g)
    assert _changed(before, state(model)) > 0
    # bf16 matmuls round differently once reordered: the function agrees to bf16 precision only
    torch.testing.assert_close(logits(model, ids), ref, atol=0.1, rtol=0.05)
    apply_gauge(model, g.inverse())
    assert_state_equal(state(model), before)


def test_full_gauge_on_real_smollm2(smollm2, smollm2_ids):
    ids = smollm2_ids[:2, :48]
    ref, before = logits(smollm2, ids), state(smollm2)
    g = random_gauge(smollm2, seed=3, spaces=FULL)
    assert len(g.spaces) == 1 + 2 * 30
    apply_gauge(smollm2, g)
    out = logits(smollm2, ids)
    # float32 matmuls are reordered by any gauge: agreement to rounding (measured ~3e-6 relative, 8e-6 in probs)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (out.softmax(-1) - ref.softmax(-1)).abs().max() <= 1e-5
    assert out.argmax(-1).eq(ref.argmax(-1)).float().mean() > 0.99
    apply_gauge(smollm2, g.inverse())
    assert_state_equal(state(smollm2), before)
    # bf16: the inverse is bit-exact as well
    smollm2.to(torch.bfloat16)
    before16 = state(smollm2)
    apply_gauge(smollm2, g)
    assert _changed(before16, state(smollm2)) > 200
    apply_gauge(smollm2, g.inverse())
    assert_state_equal(state(smollm2), before16)


def _flip_unit_by_hand(model, layer: int, unit: int) -> None:
    """Negate MLP unit ``unit`` of ``layer`` by hand: its input row(s) that the sign acts on, and its output column."""
    with torch.no_grad():
        if model.config.model_type == "gpt_neox":
            mlp = model.gpt_neox.layers[layer].mlp
            mlp.dense_h_to_4h.weight[unit].neg_()
            mlp.dense_h_to_4h.bias[unit].neg_()
            mlp.dense_4h_to_h.weight[:, unit].neg_()
        else:
            mlp = model.model.layers[layer].mlp
            mlp.up_proj.weight[unit].neg_()
            if mlp.up_proj.bias is not None:
                mlp.up_proj.bias[unit].neg_()
            mlp.down_proj.weight[:, unit].neg_()


def test_gelu_mlp_signs_are_refused_and_would_break_the_function(ids):
    neox = tiny_model("gpt_neox")
    d_ff = neox.config.intermediate_size
    sign = torch.ones(d_ff, dtype=torch.int64)
    sign[3] = -1
    bad = Gauge(mlp={0: SignedPermutation(torch.arange(d_ff), sign)})
    before = state(neox)
    with pytest.raises(GaugeError, match="permutations only"):
        apply_gauge(neox, bad)
    assert_state_equal(state(neox), before)          # refused before touching anything
    with pytest.raises(GaugeError, match="permutations only"):
        apply_gauge(neox, Gauge(mlp={1: SignedPermutation.random(d_ff, 0)}))
    # random_gauge never draws MLP signs on gpt_neox
    assert all(el.is_permutation for el in random_gauge(neox, seed=1, spaces=("mlp",)).spaces.values())
    # applied by hand, such a sign changes the function (GELU is not odd) ...
    ref = logits(neox, ids)
    _flip_unit_by_hand(neox, 0, 3)
    assert (logits(neox, ids) - ref).abs().max() > 1e-3
    # ... while the same hand flip of a SwiGLU unit (up row + down column) is an exact symmetry
    llama = tiny_model("llama")
    ref = logits(llama, ids)
    _flip_unit_by_hand(llama, 0, 3)
    torch.testing.assert_close(logits(llama, ids), ref, atol=1e-5, rtol=0)
    # and the gate row cannot be flipped (SiLU is not odd)
    with torch.no_grad():
        llama.model.layers[0].mlp.gate_proj.weight[3].neg_()
    assert (logits(llama, ids) - ref).abs().max() > 1e-4     # vs ~1e-7 for the exact flip above


def test_head_permutation_mixing_kv_groups_is_refused(ids):
    model = tiny_model("llama", heads=4, kv_heads=2)
    before, ref = state(model), logits(model, ids)
    with pytest.raises(GaugeError, match="KV group"):
        apply_gauge(model, Gauge(attn={0: SignedPermutation([0, 2, 1, 3])}))
    assert_state_equal(state(model), before)
    # swapping whole groups and heads within a group is an exact symmetry touching layer 0's attention only
    apply_gauge(model, Gauge(attn={0: SignedPermutation([3, 2, 0, 1])}))
    after = state(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"model.layers.0.self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")} | {
        "model.layers.0.self_attn.o_proj.weight"}
    torch.testing.assert_close(logits(model, ids), ref, atol=1e-5, rtol=0)
