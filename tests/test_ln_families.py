"""The LayerNorm families bloom, falcon, phi, starcoder2 and stablelm beyond their tiny config (which
tests/test_architectures.py runs through the whole battery): each config variant their modeling files branch on, the
heads that ALiBi and per-head q/k LayerNorms pin, and the spec-format features they use (``Space.when``,
``segmented(..., groups=)``)."""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

import hf_gauge
from hf_gauge import Gauge, GaugeError, SignedPermutation, apply_gauge, random_gauge
from hf_gauge.specs import Rule, get_spec

from test_architectures import (FULL, VOCAB, _apply_by_hand, _same_gauge, assert_bit_equal, assert_lora_transported,
                                build, close, logits, state)

pytestmark = pytest.mark.usefixtures("one_thread")

# (model_type, overrides of its tiny config): every layout branch of the modeling files not in the tiny config
VARIANTS = [
    ("falcon", dict(new_decoder_architecture=False, multi_query=True, tie_word_embeddings=True)),  # MQA [q|k|v]
    ("falcon", dict(new_decoder_architecture=False, multi_query=False, num_kv_heads=4,       # per head [q|k|v],
                    parallel_attn=False, bias=False)),                                       # sequential, no bias
    ("falcon", dict(new_decoder_architecture=False, alibi=True)),                            # ALiBi: no heads space
    ("falcon", dict(num_ln_in_parallel_attn=1)),                                             # one LN, grouped qkv
    ("stablelm", dict(use_parallel_residual=True, qk_layernorm=False, use_qkv_bias=False)),
    ("stablelm", dict(num_key_value_heads=1)),                                               # MQA: one k norm
    ("phi", dict(qk_layernorm=False)),
    ("bloom", dict(apply_residual_connection_post_layernorm=True, num_attention_heads=4, hidden_size=32,
                   tie_word_embeddings=True)),
    ("starcoder2", dict(use_bias=False)),
]
IDS = [f"{mt}-{'-'.join(f'{k}={v}' for k, v in over.items())}" for mt, over in VARIANTS]


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB - 1, (2, 9), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("model_type,over", VARIANTS, ids=IDS)
def test_variant_function_inverse_and_recovery(model_type, over, ids):
    """Under a random full gauge the logits are preserved and the inverse restores every tensor bit for bit; the
    hidden gauge is recovered exactly from the weights and from activations; canonical charts are bit-identical."""
    a = build(model_type, **over)
    ref, before = logits(a, ids), state(a)
    g = random_gauge(a, seed=11, spaces=FULL)
    b = apply_gauge(copy.deepcopy(a), g)
    assert close(logits(b, ids), ref)
    _same_gauge(hf_gauge.find_full_gauge(a, b), g)
    data = torch.randint(0, VOCAB, (8, 24), generator=torch.Generator().manual_seed(3))
    _same_gauge(hf_gauge.find_full_gauge(a, b, data=data), g)
    ca, cb = copy.deepcopy(a), copy.deepcopy(b)
    hf_gauge.canonicalize(ca)
    hf_gauge.canonicalize(cb)
    assert_bit_equal(state(ca), state(cb))
    apply_gauge(b, g.inverse())
    assert_bit_equal(state(b), before)


@pytest.mark.parametrize("model_type,over", VARIANTS, ids=IDS)
def test_variant_streaming_apply_and_lora(model_type, over, ids, tmp_path):
    """Streaming apply on ``save_pretrained`` files equals the live apply bit for bit, and the gauge is found back
    from the two checkpoints' files; a LoRA adapter on every linear,
    transported, reproduces the logits on the gauged base."""
    a = build(model_type, **over)
    g = random_gauge(a, seed=4, spaces=FULL)
    a.save_pretrained(tmp_path / "src")
    hf_gauge.apply_gauge_to_checkpoint(tmp_path / "src", g, tmp_path / "out", progress=False)
    b = apply_gauge(copy.deepcopy(a), g)
    assert_bit_equal(state(type(a).from_pretrained(tmp_path / "out", dtype=torch.float32)), state(b))
    _same_gauge(hf_gauge.find_gauge(tmp_path / "src", tmp_path / "out", spaces="all"), g)       # data-free, from files
    assert_lora_transported(a, b, g, ids)


# --------------------------------------------------------------------------------------------- pinned heads
def test_alibi_slopes_are_distinct_for_every_head_count():
    """BLOOM's and Falcon's ALiBi slopes (one formula) differ for every pair of heads, power of two or not: no head
    permutation keeps every head's position bias, so the heads space is trivial."""
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes
    for n in range(1, 130):
        slopes = _get_alibi_slopes(n, torch.device("cpu")).double()
        assert len(set(slopes.tolist())) == n, n
        c = 2 ** math.floor(math.log2(n))                      # the closed form the bloom spec states
        want = [2 ** (-8 * (h + 1) / c) for h in range(c)] + [2 ** (-4 * (2 * j + 1) / c) for j in range(n - c)]
        assert torch.allclose(slopes, torch.tensor(want, dtype=torch.float64), rtol=1e-6), n


def _head_swap_by_hand(model, spec, layer: int = 0) -> None:
    """Swap heads 0 and 1 of ``layer`` in every tensor axis the spec would move for a heads space (declared or not):
    the move a heads space would make."""
    heads = Gauge(spaces={f"attn.{layer}": SignedPermutation([1, 0] + list(range(2, model.config.num_attention_heads)))})
    _apply_by_hand(model, spec, heads)


@pytest.mark.parametrize("model_type,over", [("falcon", dict(new_decoder_architecture=False, alibi=True)),
                                             ("bloom", {})], ids=["falcon-alibi", "bloom"])
def test_alibi_heads_have_no_space_and_moving_them_breaks(model_type, over, ids):
    """ALiBi (a fixed slope per head index) pins the heads: the model has no heads space (a gauge naming one is
    refused), and swapping two heads' projection blocks anyway changes the logits."""
    model = build(model_type, **over)
    assert not any(s.startswith("attn.") for s in hf_gauge.gauge_spaces(model))
    with pytest.raises(GaugeError, match="lacks"):
        apply_gauge(copy.deepcopy(model), Gauge(spaces={"attn.0": SignedPermutation([1, 0, 2, 3])}))
    spec = get_spec(model)
    if "attn.{i}" not in spec.spaces:           # bloom declares no heads at all: its fused rows per head [q|k|v]
        hd = model.config.hidden_size // model.config.num_attention_heads
        blocks = Rule("transformer.h.{i}.self_attention.query_key_value.weight",
                      (hf_gauge.specs.Axis(0, "attn.{i}", signed=False, block="qkv"),))
        dense = Rule("transformer.h.{i}.self_attention.dense.weight",
                     (hf_gauge.specs.Axis(1, "attn.{i}", signed=False, block="head_dim"),))
        heads = hf_gauge.specs.Space(lambda c: c.num_attention_heads, "none", kind="heads")
        spec = dataclasses.replace(spec, spaces={**spec.spaces, "attn.{i}": heads}, rules=(blocks, dense) + spec.rules,
                                   dims=lambda c, hd=hd: {"head_dim": hd, "qkv": 3 * hd})
    else:
        spec = dataclasses.replace(spec, spaces={**spec.spaces,
                                                 "attn.{i}": dataclasses.replace(spec.spaces["attn.{i}"], when=None)})
    ref = logits(model, ids)
    _head_swap_by_hand(model, spec)
    assert not close(logits(model, ids), ref, 1e-3)


def _qk_norms(model, layer: int = 0) -> dict[str, list[torch.Tensor]]:
    a = model.model.layers[layer].self_attn
    return {qk: [n.weight.detach().clone() for n in getattr(a, f"{qk}_layernorm").norms] for qk in "qk"}


def test_stablelm_per_head_norms_follow_their_heads(ids):
    """``qk_layernorm``: a module per head. Under a head permutation query norm ``k`` becomes the source's norm
    ``perm[k]`` and key norm ``k`` the source's ``kv[k]`` (the KV-group reduction); the function is kept, and leaving
    the norms in place breaks it."""
    model = build("stablelm")
    before, ref = _qk_norms(model), logits(model, ids)
    perm = [3, 2, 0, 1]                                # KV group 1 -> 0 (its two heads swapped), group 0 -> 1
    g = Gauge(spaces={"attn.0": SignedPermutation(perm)})
    apply_gauge(model, g)
    after = _qk_norms(model)
    assert all(torch.equal(after["q"][k], before["q"][perm[k]]) for k in range(4))
    assert torch.equal(after["k"][0], before["k"][1]) and torch.equal(after["k"][1], before["k"][0])
    assert close(logits(model, ids), ref)
    unrenamed = build("stablelm")
    _apply_by_hand(unrenamed, get_spec("stablelm"), g)                 # the moves without the renames
    assert not close(logits(unrenamed, ids), ref, 1e-3)


def test_stablelm_optimizer_state_of_per_head_norms_follows_them():
    """Adam's state of a per-head norm moves with its module: state of query norm ``k`` is the source's ``perm[k]``."""
    model = build("stablelm")
    opt = torch.optim.Adam(model.parameters())
    model(torch.arange(8)[None]).logits.sum().backward()
    opt.step()
    sd = opt.state_dict()
    pid = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    g = Gauge(spaces={"attn.0": SignedPermutation([3, 2, 0, 1])})
    out = g.transport(sd, model=model)
    q = "model.layers.0.self_attn.q_layernorm.norms.{}.weight"
    for k, src in enumerate([3, 2, 0, 1]):
        assert torch.equal(out["state"][pid[q.format(k)]]["exp_avg"], sd["state"][pid[q.format(src)]]["exp_avg"])
    kn = "model.layers.0.self_attn.k_layernorm.norms.{}.weight"
    assert torch.equal(out["state"][pid[kn.format(0)]]["exp_avg_sq"], sd["state"][pid[kn.format(1)]]["exp_avg_sq"])


# --------------------------------------------------------------------------------------------- spec format
def test_falcon_grouped_qkv_moves_whole_groups_with_their_queries():
    """``new_decoder_architecture`` rows are ``[kv group, (queries | key | value), head_dim]``: the interleaved
    segmented axis moves group ``k`` to ``sigma(k)`` and each query within it, checked by hand."""
    model = build("falcon")                          # 4 query heads, 2 KV groups, head_dim 8
    name = "transformer.h.0.self_attention.query_key_value.weight"
    qkv = model.state_dict()[name].clone().view(2, 4, 8, 32)          # group, (q0 q1 k v), head_dim, d
    g = Gauge(spaces={"attn.0": SignedPermutation([3, 2, 0, 1])})      # group 1 -> 0 (heads swapped), group 0 -> 1
    apply_gauge(model, g)
    want = torch.stack([qkv[1][[1, 0, 2, 3]], qkv[0]])
    assert torch.equal(model.state_dict()[name], want.reshape(-1, 32))
    bias = "transformer.h.1.self_attention.query_key_value.bias"
    assert torch.equal(state(model)[bias], state(build("falcon"))[bias])           # layer 1 untouched


def test_interleaved_groups_must_divide_every_part():
    spec = get_spec("falcon")
    bad = dataclasses.replace(spec, dims=lambda c: {"head_dim": 8, "kv_heads": 3})
    model = build("falcon")
    with pytest.raises(GaugeError, match="do not split into 3 groups"):
        _apply_by_hand(model, bad, Gauge(spaces={"attn.0": SignedPermutation([1, 0, 2, 3])}))


def test_space_when_drops_the_space_for_that_config_only():
    spec = get_spec("falcon")
    rope, alibi = (hf_gauge.view.ConfigView(build("falcon", new_decoder_architecture=False, alibi=a).config)
                   for a in (False, True))
    assert "attn.1" in spec.space_sizes(rope) and "attn.1" not in spec.space_sizes(alibi)
    assert set(spec.space_sizes(alibi)) == {"residual", "mlp.0", "mlp.1"}


def test_stablelm_adapter_saving_per_head_norms_follows_them(ids):
    """A LoRA adapter that also saves the per-head norm modules (``modules_to_save``): transported, each saved norm
    takes its source head's place, and the adapter reproduces the logits on the gauged base."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    a = build("stablelm")
    g = Gauge(spaces={"attn.0": SignedPermutation([3, 2, 0, 1])})
    b = apply_gauge(copy.deepcopy(a), g)
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["q_layernorm", "k_layernorm"],
                     init_lora_weights=False)
    pa = get_peft_model(copy.deepcopy(a), cfg)
    with torch.no_grad():
        for n, p in pa.named_parameters():
            if "modules_to_save" in n:              # saved norms that differ from the base's
                p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    ref = logits(pa.eval(), ids)
    pb = get_peft_model(copy.deepcopy(b), copy.deepcopy(cfg))
    assert not set_peft_model_state_dict(pb, g.transport(get_peft_model_state_dict(pa), model=pa)).unexpected_keys
    assert close(logits(pb.eval(), ids), ref)


def test_bloom_sliced_mlp_is_matched_from_weights_not_from_unseen_activations():
    """``pretraining_tp > 1`` with ``slow_but_exact`` never calls ``dense_4h_to_h`` (it slices its weight): matching
    MLP units from activations is refused with the site named (it was a KeyError), from the weights it is exact."""
    a = build("bloom", pretraining_tp=2, slow_but_exact=True)
    g = random_gauge(a, seed=3, spaces=FULL)
    b = apply_gauge(copy.deepcopy(a), g)
    data = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(3))
    with pytest.raises(GaugeError, match=r"never called 'transformer\.h\.0\.mlp\.dense_4h_to_h'.*leave out data="):
        hf_gauge.find_full_gauge(a, b, data=data)
    _same_gauge(hf_gauge.find_full_gauge(a, b), g)
