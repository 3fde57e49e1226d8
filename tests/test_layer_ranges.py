"""Placeholder ranges over some layers only (``specs.base.layers_where``): a spec whose MoE spaces live on the odd
layers and whose dense ``mlp.{i}`` units live on the even ones (a tiny ``qwen3_moe`` with ``decoder_sparse_step=2``,
under a spec written here). Random gauges, apply and inverse, names the config lacks, streaming apply on files and
the range-vs-disk check of ``hf_gauge.fileconfig``."""
from __future__ import annotations

import json

import pytest
import torch

import hf_gauge
from conftest import tiny_model
from hf_gauge import Gauge, GaugeError, SignedPermutation, apply_gauge, apply_gauge_to_checkpoint, random_gauge
from hf_gauge.engine import stack_count
from hf_gauge.fileverify import verify_files
from hf_gauge.specs import SPECS
from hf_gauge.specs.base import ArchSpec, Axis, Rule, Sites, Space, gain, layers_where, range_values, reads, \
    segmented, writes
from hf_gauge.specs.decoder import MLP, MLP_GATE, MLP_IN, RMSNORM, SILU_GATE, attention_rules, head_dim

L = "model.layers.{i}."
E_GATE, E_UP, E_DOWN = Axis(0, "experts.{i}.{e}", signed=False), Axis(0, "experts.{i}.{e}"), Axis(1, "experts.{i}.{e}")


def is_moe(c, i: int) -> bool:
    return i not in c.mlp_only_layers and (i + 1) % c.decoder_sparse_step == 0


def odd_moe_spec() -> ArchSpec:
    moe = layers_where(is_moe)
    return ArchSpec(
        name="toy_qwen3_moe", model_types=("qwen3_moe",), norm="rmsnorm",
        spaces={
            "residual": Space(lambda c: c.hidden_size, "any", "residual stream", kind="residual"),
            "attn.{i}": Space(lambda c: c.num_attention_heads, "none", "query heads", kind="heads"),
            "mlp.{i}": Space(lambda c: c.intermediate_size, "any", "dense layers' units", kind="units",
                             ranges={"i": layers_where(lambda c, i: not is_moe(c, i))}),
            "moe.{i}": Space(lambda c: c.num_experts, "none", "experts", kind="experts", ranges={"i": moe}),
            "experts.{i}.{e}": Space(lambda c: c.moe_intermediate_size, "any", "expert units", kind="units",
                                     ranges={"i": moe, "e": lambda c: c.num_experts}, carried_by={"e": "moe.{i}"}),
        },
        rules=(Rule("model.embed_tokens.weight", reads()),) + attention_rules(L) + (
            Rule(L + "mlp.gate_proj.weight", reads(MLP_GATE)),
            Rule(L + "mlp.up_proj.weight", reads(MLP)),
            Rule(L + "mlp.down_proj.weight", writes(MLP_IN)),
            Rule(L + "mlp.gate.weight", reads(Axis(0, "moe.{i}", signed=False))),
            Rule(L + "mlp.experts.gate_up_proj", (Axis(0, "moe.{i}", signed=False, stack="e"),
                                                  segmented(1, E_GATE, E_UP), Axis(2, "residual"))),
            Rule(L + "mlp.experts.down_proj", (Axis(0, "moe.{i}", signed=False, stack="e"), Axis(1, "residual"),
                                               Axis(2, "experts.{i}.{e}"))),
            Rule(L + "input_layernorm.weight", gain()),
            Rule(L + "post_attention_layernorm.weight", gain()),
            Rule("model.norm.weight", gain()),
            Rule("lm_head.weight", reads()),
        ),
        file_rules=(Rule(L + "mlp.gate.weight", reads(Axis(0, "moe.{i}", signed=False))),
                    Rule(L + "mlp.experts.{e}.gate_proj.weight", reads(E_GATE)),
                    Rule(L + "mlp.experts.{e}.up_proj.weight", reads(E_UP)),
                    Rule(L + "mlp.experts.{e}.down_proj.weight", writes(E_DOWN))),
        dims=head_dim,
        sites=Sites(layers="model.layers", final_norm="model.norm", embed="model.embed_tokens",
                    inputs={"attn.{i}": L + "self_attn.o_proj", "mlp.{i}": L + "mlp.down_proj"}),
        requires=(SILU_GATE, RMSNORM),
    )


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(SPECS, "qwen3_moe", odd_moe_spec())


def odd_moe(seed: int = 0):
    return tiny_model("qwen3_moe", seed=seed, hidden_size=32, layers=4, intermediate=40, head_dim=8, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=24, decoder_sparse_step=2, norm_topk_prob=True)


IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))


def _logits(m):
    with torch.no_grad():
        return m(IDS).logits


def test_range_values_reads_both_forms():
    class C:
        num_hidden_layers, decoder_sparse_step, mlp_only_layers = 5, 2, [3]
    assert range_values(lambda c: 3, C) == (0, 1, 2)
    assert range_values(layers_where(is_moe), C) == (1,)                   # 3 is dense by mlp_only_layers
    assert range_values(layers_where(lambda c, i: not is_moe(c, i)), C) == (0, 2, 3, 4)
    for bad in ((1, 1), (-1,), "01", 2.0, True, (True,)):
        with pytest.raises(GaugeError, match="placeholder range"):
            range_values(lambda c, b=bad: b, C)


def test_spaces_live_on_their_layers_only(toy):
    m = odd_moe()
    sizes = hf_gauge.gauge_spaces(m)
    assert [s for s in sizes if s.startswith("moe.")] == ["moe.1", "moe.3"]
    assert [s for s in sizes if s.startswith("mlp.")] == ["mlp.0", "mlp.2"]
    assert {s for s in sizes if s.startswith("experts.")} == {f"experts.{i}.{e}" for i in (1, 3) for e in range(4)}
    assert stack_count(SPECS["qwen3_moe"], m.config, "e") == 4
    with pytest.raises(GaugeError, match="lacks"):           # a well-formed name that this config does not have
        apply_gauge(m, Gauge(spaces={"moe.0": SignedPermutation.identity(4)}))
    with pytest.raises(GaugeError, match="lacks"):
        apply_gauge(m, Gauge(spaces={"mlp.1": SignedPermutation.identity(40)}))


def test_random_gauge_apply_inverse_and_match(toy):
    m = odd_moe()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ref = _logits(m)
    g = random_gauge(m, seed=3, spaces="all")
    assert {"mlp.0", "mlp.2", "moe.1", "moe.3", "experts.3.2"} <= set(g.spaces)
    apply_gauge(m, g)
    assert not torch.equal(m.model.layers[3].mlp.gate.weight, before["model.layers.3.mlp.gate.weight"])
    assert torch.allclose(_logits(m), ref, atol=1e-5, rtol=1e-4)
    found = hf_gauge.find_gauge(odd_moe(), m, spaces="all")
    assert set(found.spaces) == set(g.spaces)
    for name, el in g.spaces.items():
        assert found[name] == el, name
    apply_gauge(m, g.inverse())
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_files_stream_apply_and_range_check(toy, tmp_path):
    from transformers import AutoModelForCausalLM
    m = odd_moe()
    m.save_pretrained(tmp_path / "src")
    g = random_gauge(m, seed=5, spaces="all")
    apply_gauge_to_checkpoint(tmp_path / "src", g, tmp_path / "out", progress=False)
    apply_gauge(m, g)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert verify_files(tmp_path / "src", tmp_path / "out", g)["weights_bit_exact"]
    # a config that puts the experts on other layers than the files do is refused before anything is moved
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    moved = r"puts space '\w+\.\{i\}' at \{i\} in .* tensors of that space are at"
    for change, why in (({"decoder_sparse_step": 1}, moved), ({"mlp_only_layers": [3]}, moved),
                        ({"decoder_sparse_step": 0}, "ZeroDivisionError.*corrupt or hostile"),
                        ({"mlp_only_layers": "3"}, "TypeError.*corrupt or hostile"),
                        # the full range is checked against the shard names before the predicate loops over it
                        ({"num_hidden_layers": 10 ** 9}, "config gives {i} of space 'attn.{i}' 1000000000 values")):
        (tmp_path / "src" / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(GaugeError, match=why):
            apply_gauge_to_checkpoint(tmp_path / "src", g, tmp_path / "bad", progress=False)
        assert not (tmp_path / "bad").exists()
