"""Extending hf_gauge without touching library code: a spec with a new space kind registered inside this test.

The model is a tiny transformers ``olmoe`` (the library's own olmoe spec is replaced by this one): its experts live fused
in memory (``gate_up_proj [E, 2*ff, d]``, ``down_proj [E, d, ff]``) but per expert on disk
(``experts.{e}.gate_proj.weight``, ...). The spec declares per-expert unit spaces ``units.{i}.{e}`` of a new kind,
a stacked axis over ``{e}``, a segmented ``[gate | up]`` axis, and checkpoint-file rules for the on-disk names.
"""
from __future__ import annotations

import pytest
import torch

import hf_gauge
from hf_gauge import Gauge, GaugeError, SignedPermutation, apply_gauge, apply_gauge_to_checkpoint, random_gauge
from hf_gauge.kinds import KINDS, UnitsKind
from hf_gauge.specs import SPECS
from hf_gauge.specs.base import ArchSpec, Axis, Rule, Sites, Space, gain, reads, segmented, writes

L = "model.layers.{i}."
Q = Axis(0, "attn.{i}", signed=False, block="head_dim")
KV = Axis(0, "attn.{i}", signed=False, block="head_dim", kv=True)
O = Axis(1, "attn.{i}", signed=False, block="head_dim")
E_GATE = Axis(0, "units.{i}.{e}", signed=False)      # SiLU gate rows: permuted only
E_UP = Axis(0, "units.{i}.{e}")                      # up rows: signed
E_DOWN = Axis(1, "units.{i}.{e}")                    # down columns: signed


def moe_spec() -> ArchSpec:
    return ArchSpec(
        name="toy_olmoe",
        model_types=("olmoe",),
        norm="rmsnorm",
        spaces={
            "residual": Space(lambda c: c.hidden_size, "any", "residual stream", kind="residual"),
            "attn.{i}": Space(lambda c: c.num_attention_heads, "none", "query heads", kind="heads"),
            "units.{i}.{e}": Space(lambda c: c.intermediate_size, "any", "units of expert e in layer i",
                                     kind="expert_units", ranges={"e": lambda c: c.num_experts}),
        },
        rules=(
            Rule("model.embed_tokens.weight", reads()),
            Rule(L + "self_attn.q_proj.weight", reads(Q)),
            Rule(L + "self_attn.k_proj.weight", reads(KV)),
            Rule(L + "self_attn.v_proj.weight", reads(KV)),
            Rule(L + "self_attn.o_proj.weight", writes(O)),
            Rule(L + "self_attn.q_norm.weight", (Q,)),        # OLMoE: q/k RMSNorm over the whole projection
            Rule(L + "self_attn.k_norm.weight", (KV,)),
            Rule(L + "mlp.gate.weight", reads()),       # router [E, d]
            # fused in memory: [E, gate|up, d] and [E, d, ff], one expert per slice of axis 0
            Rule(L + "mlp.experts.gate_up_proj", (Axis(0, stack="e"), segmented(1, E_GATE, E_UP), Axis(2, "residual"))),
            Rule(L + "mlp.experts.down_proj", (Axis(0, stack="e"), Axis(1, "residual"), Axis(2, "units.{i}.{e}"))),
            Rule(L + "input_layernorm.weight", gain()),
            Rule(L + "post_attention_layernorm.weight", gain()),
            Rule("model.norm.weight", gain()),
            Rule("lm_head.weight", reads()),
        ),
        file_rules=(   # per expert in checkpoint files
            Rule(L + "mlp.experts.{e}.gate_proj.weight", reads(E_GATE)),
            Rule(L + "mlp.experts.{e}.up_proj.weight", reads(E_UP)),
            Rule(L + "mlp.experts.{e}.down_proj.weight", writes(E_DOWN)),
        ),
        dims=lambda c: {"head_dim": c.head_dim},
        sites=Sites(layers="model.layers", final_norm="model.norm", embed="model.embed_tokens",
                    inputs={"attn.{i}": "model.layers.{i}.self_attn.o_proj"}),
    )


@pytest.fixture
def toy(monkeypatch):
    """Register the kind and the spec for this test only."""
    monkeypatch.setitem(KINDS, "expert_units", UnitsKind("expert_units"))
    monkeypatch.setitem(SPECS, "olmoe", moe_spec())


def tiny_moe(seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model("olmoe", hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                               vocab_size=64, tie_word_embeddings=False, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.3)
    return m


IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def _logits(m):
    with torch.no_grad():
        return m(IDS).logits


def test_unregistered_architecture_is_refused(monkeypatch):
    monkeypatch.delitem(SPECS, "olmoe")
    with pytest.raises(GaugeError, match="unsupported architecture model_type='olmoe'"):
        random_gauge(tiny_moe())
    with pytest.raises(GaugeError, match="unknown gauge space 'units.0.1'"):
        Gauge(spaces={"units.0.1": SignedPermutation.identity(16)})


def test_random_apply_inverse_on_new_kind(toy):
    m = tiny_moe()
    assert len(hf_gauge.gauge_spaces(m)) == 1 + 2 + 2 * 4
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ref = _logits(m)
    g = random_gauge(m, seed=3, spaces=("residual", "attn", "units"))
    assert "units.1.3" in g.spaces and not g["units.1.3"].is_permutation
    apply_gauge(m, g)
    e = m.model.layers[1].mlp.experts
    el, ff = g["units.1.3"], 16
    up_before = before["model.layers.1.mlp.experts.gate_up_proj"][3, ff:]
    res = g.residual
    want_up = (up_before[el.perm] * el.sign[:, None].float())[:, res.perm] * res.sign.float()
    assert torch.equal(e.gate_up_proj[3, ff:], want_up)           # the signed segment, expert 3 of layer 1
    assert torch.allclose(_logits(m), ref, atol=1e-5, rtol=1e-4)
    apply_gauge(m, g.inverse())
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(GaugeError, match="not a gauge space|unknown gauge space"):
        Gauge(spaces={"units.01.3": SignedPermutation.identity(16)})


def test_match_recovers_expert_units_data_free(toy):
    a = tiny_moe()
    b = tiny_moe()
    hidden = random_gauge(b, seed=4, spaces=("residual", "attn", "units"))
    apply_gauge(b, hidden)
    found = hf_gauge.find_gauge(a, b, spaces="all")
    assert set(found.spaces) == set(hidden.spaces)
    for name, el in hidden.spaces.items():
        assert found[name] == el, name


def test_stream_apply_uses_file_names(toy, tmp_path):
    from transformers import AutoModelForCausalLM
    m = tiny_moe()
    m.save_pretrained(tmp_path / "src")
    g = random_gauge(m, seed=5, spaces=("residual", "attn", "units"))
    apply_gauge_to_checkpoint(tmp_path / "src", g, tmp_path / "out", progress=False)
    apply_gauge(m, g)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_canonical_chart_and_inner_defaults_cover_the_new_kind(toy):
    a = tiny_moe()
    b = tiny_moe()
    apply_gauge(b, random_gauge(b, seed=6, spaces=("residual", "attn", "units")))
    hf_gauge.canonicalize(a)
    hf_gauge.canonicalize(b)
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k
    inner = hf_gauge.match_inner(a, b)                       # default: every non-residual family of the spec
    assert {s.split(".")[0] for s in inner} == {"attn", "units"}


def test_selecting_a_family_the_spec_lacks_is_refused(toy):
    with pytest.raises(GaugeError, match="unknown gauge space.*'mlp'"):
        random_gauge(tiny_moe(), spaces=("residual", "mlp"))
