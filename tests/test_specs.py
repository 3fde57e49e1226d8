"""Architecture specs: every parameter of every supported family is classified, and rules follow gauge-math.md."""
from __future__ import annotations

import pytest
import torch

import hf_gauge
from hf_gauge import GaugeError, SignedPermutation
from hf_gauge.engine import axes_for, resolve_name
from hf_gauge.specs import SPECS, get_spec, supported_model_types

from conftest import ALL_FAMILIES, tiny_model


@pytest.mark.parametrize("model_type", ALL_FAMILIES)
@pytest.mark.parametrize("tie", [False, True])
def test_every_parameter_is_classified(model_type, tie):
    m = tiny_model(model_type, tie=tie)
    spec = get_spec(m)
    unclassified = [n for n, _ in m.named_parameters() if axes_for(spec, n) is None]
    assert unclassified == []
    for n, p in m.named_parameters():
        for a in axes_for(spec, n):
            assert a.axis < p.dim(), n


def test_smollm2_every_parameter_classified(smollm2):
    spec = get_spec(smollm2)
    assert [n for n, _ in smollm2.named_parameters() if axes_for(spec, n) is None] == []


def test_unsupported_model_type_lists_supported():
    from transformers import AutoConfig, AutoModelForCausalLM
    m = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(GaugeError, match="unsupported architecture model_type='gpt2'.*llama.*qwen3"):
        hf_gauge.random_gauge(m)
    assert "llama" in supported_model_types() and "gpt_neox" in supported_model_types()
    with pytest.raises(GaugeError, match="unsupported architecture model_type='gpt2'"):
        m.apply_gauge(hf_gauge.Gauge(residual=SignedPermutation.identity(32)))   # the method exists and refuses


def test_rules_follow_the_math_note():
    """Each tensor kind moves exactly as the table in gauge-math.md says (checked independently of the engine)."""
    m = tiny_model("llama", tie=False)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    g = hf_gauge.random_gauge(m, seed=3)
    q = g.residual
    p, s = q.perm, q.sign.float()
    m.apply_gauge(g)
    after = m.state_dict()
    L = "model.layers.0."
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"][:, p] * s)
    for reader in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        assert torch.equal(after[L + reader + ".weight"], before[L + reader + ".weight"][:, p] * s), reader
    for writer in ("self_attn.o_proj", "mlp.down_proj"):
        assert torch.equal(after[L + writer + ".weight"], before[L + writer + ".weight"][p] * s[:, None]), writer
        assert torch.equal(after[L + writer + ".bias"], before[L + writer + ".bias"][p] * s), writer
    for gain in (L + "input_layernorm.weight", L + "post_attention_layernorm.weight", "model.norm.weight"):
        assert torch.equal(after[gain], before[gain][p]), gain        # permuted, never signed
    assert torch.equal(after["lm_head.weight"], before["lm_head.weight"][:, p] * s)
    for head_space in (L + "self_attn.q_proj.bias", L + "self_attn.k_proj.bias", L + "mlp.up_proj.bias"):
        assert torch.equal(after[head_space], before[head_space])   # not residual-indexed


def test_qwen_head_space_tensors_untouched_by_residual_gauge():
    for mt, names in (("qwen2", ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]),
                      ("qwen3", ["self_attn.q_norm.weight", "self_attn.k_norm.weight"])):
        m = tiny_model(mt)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        m.apply_gauge(hf_gauge.random_gauge(m, seed=1))
        for n in names:
            assert torch.equal(m.state_dict()["model.layers.1." + n], before["model.layers.1." + n]), (mt, n)


def test_mlp_gauge_signs_up_down_pair_not_gate():
    m = tiny_model("llama")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    g = hf_gauge.random_gauge(m, seed=4, spaces=("mlp.1",))
    u = g.mlp[1]
    p, s = u.perm, u.sign.float()
    m.apply_gauge(g)
    L = "model.layers.1.mlp."
    assert torch.equal(m.state_dict()[L + "gate_proj.weight"], before[L + "gate_proj.weight"][p])
    assert torch.equal(m.state_dict()[L + "up_proj.weight"], before[L + "up_proj.weight"][p] * s[:, None])
    assert torch.equal(m.state_dict()[L + "down_proj.weight"], before[L + "down_proj.weight"][:, p] * s)


@pytest.mark.parametrize("name,base,role", [
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", "model.layers.0.self_attn.q_proj.weight", "lora_A"),
    ("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight", "model.layers.0.mlp.down_proj.weight", "lora_B"),
    ("model.layers.0.mlp.down_proj.base_layer.weight", "model.layers.0.mlp.down_proj.weight", "weight"),
    ("model.embed_tokens.lora_embedding_B.default", "model.embed_tokens.weight", "lora_emb_B"),
    ("model.layers.0.self_attn.o_proj.lora_magnitude_vector.default.weight", "model.layers.0.self_attn.o_proj.weight", "magnitude"),
    ("model.norm.modules_to_save.default.weight", "model.norm.weight", "weight"),
    ("model.norm.original_module.weight", "model.norm.weight", "weight"),
])
def test_peft_names_resolve_to_wrapped_module(name, base, role):
    assert resolve_name(name) == (base, role)


def test_lora_factors_inherit_the_wrapped_axis():
    spec = SPECS["llama"]
    assert [a.axis for a in axes_for(spec, "model.layers.0.self_attn.q_proj.lora_A.default.weight")] == [1]
    assert axes_for(spec, "model.layers.0.self_attn.q_proj.lora_B.default.weight")[0].space == "attn.0"
    assert [(a.axis, a.space) for a in axes_for(spec, "model.layers.0.mlp.down_proj.lora_B.default.weight")] == [(0, "residual")]
    assert axes_for(spec, "model.embed_tokens.lora_embedding_A.default") == ()
    mag = axes_for(spec, "model.layers.0.mlp.down_proj.lora_magnitude_vector.default.weight")
    assert [(a.axis, a.space, a.signed) for a in mag] == [(0, "residual", False)]


def test_group_names():
    assert SPECS["llama"].group == "B_d" and SPECS["gpt_neox"].group == "S_d x {±1}"
    assert isinstance(SignedPermutation.identity(2), SignedPermutation)


def test_space_names_are_canonical_template_instances():
    for bad in ("mlp.01", "mlp.+1", "attn.-1", "mlp", "mlp.1.2", "residual.0"):
        with pytest.raises(GaugeError, match="unknown gauge space"):
            hf_gauge.Gauge(spaces={bad: SignedPermutation.identity(3)})
    spec = SPECS["llama"]
    assert spec.parse_space("mlp.10") == ("mlp.{i}", {"i": 10})
    with pytest.raises(GaugeError, match="not a gauge space"):
        spec.parse_space("mlp.010")
    m = tiny_model("llama")
    with pytest.raises(GaugeError, match="unknown gauge space"):
        hf_gauge.random_gauge(m, spaces=("mlp.01",))
    with pytest.raises(GaugeError, match="lacks"):
        hf_gauge.apply_gauge(m, hf_gauge.Gauge(spaces={"mlp.7": SignedPermutation.identity(96)}))


def test_every_space_template_has_a_registered_kind():
    from hf_gauge.kinds import KINDS
    for spec in SPECS.values():
        for tmpl, sp in spec.spaces.items():
            assert sp.kind in KINDS, (spec.name, tmpl)


def test_phi3_fused_projections_move_by_segments():
    """qkv_proj rows [q | k | v] and gate_up_proj rows [gate | up] move segment by segment (checked by hand)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model("phi3", hidden_size=32, intermediate_size=24, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=64, pad_token_id=0)
    m = AutoModelForCausalLM.from_config(cfg)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    g = hf_gauge.random_gauge(m, seed=2, spaces=("mlp", "attn"))
    u, h = g["mlp.0"], g["attn.0"]
    hf_gauge.apply_gauge(m, g)
    gu = before["model.layers.0.mlp.gate_up_proj.weight"]
    want = torch.cat([gu[:24][u.perm], gu[24:][u.perm] * u.sign[:, None].float()])
    assert torch.equal(m.state_dict()["model.layers.0.mlp.gate_up_proj.weight"], want)
    qkv = before["model.layers.0.self_attn.qkv_proj.weight"].view(8, 8, 32)     # 4 q heads, 2 k, 2 v (head_dim 8)
    kv = h.perm.view(2, 2)[:, 0] // 2
    want = torch.cat([qkv[:4][h.perm], qkv[4:6][kv], qkv[6:][kv]]).reshape(64, 32)
    assert torch.equal(m.state_dict()["model.layers.0.self_attn.qkv_proj.weight"], want)


# --------------------------------------------------------------------------------------------- declared config fields
def _tiny(model_type: str, **over):
    """A tiny random model of a transformers family, registered or not (llama-sized, see tiny_configs.json)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from test_architectures import TINY, randomize
    kw = dict(TINY["_common"])
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **{**kw, **over})
    return randomize(AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")).eval()


def test_requires_admits_values_types_and_absence():
    from hf_gauge.specs import Requires
    flag = Requires("mlp_bias", (False,), "why")
    assert flag.admits(False) and not flag.admits(0) and not flag.admits(True) and not flag.admits(None)
    eps = Requires("rms_norm_eps", (float,), "why")
    assert eps.admits(1e-6) and not eps.admits(None) and not eps.admits(True) and not eps.admits("1e-6")
    layers = Requires("mlp_only_layers", ([], None), "why")
    assert layers.admits([]) and layers.admits(None) and not layers.admits([1])
    assert eps.describe() == "any float" and layers.describe() == "[] or absent"


@pytest.mark.parametrize("model_type", sorted(SPECS))
def test_every_spec_declares_fields_its_tiny_config_meets(model_type):
    from hf_gauge.view import spec_for
    from test_architectures import tiny_config
    spec = SPECS[model_type]
    assert spec.requires, f"{model_type}: declare the config fields the group depends on (ArchSpec.requires)"
    assert spec_for(tiny_config(model_type)) is spec


@pytest.mark.parametrize("model_type, field, shown", [("arcee", "hidden_act", "'relu2'"),
                                                      ("cohere", "rms_norm_eps", "absent")])
def test_llama_spec_forced_on_another_mlp_or_norm_is_refused(model_type, field, shown, monkeypatch, ids):
    """arcee (gateless ReLU² MLP) and cohere (mean-centring LayerNorm) use llama's parameter names: every name is
    covered, so only the declared fields can tell. Without them the gauge is silently wrong; with them, refused;
    their own specs preserve the function."""
    from dataclasses import replace
    from hf_gauge.specs.llama import LLAMA
    model = _tiny(model_type)
    ref = model(ids).logits
    monkeypatch.setitem(SPECS, model_type, replace(LLAMA, model_types=(model_type,), requires=()))
    hf_gauge.apply_gauge(model, hf_gauge.random_gauge(model, seed=3, spaces="all"))
    err = (model(ids).logits - ref).abs().max() / ref.abs().max()
    assert err > 0.1, err                                             # what the declaration prevents
    monkeypatch.setitem(SPECS, model_type, replace(LLAMA, model_types=(model_type,)))
    with pytest.raises(GaugeError, match=rf"model_type='{model_type}' has {field}={shown}, but the 'llama' spec "):
        hf_gauge.random_gauge(model)
    from hf_gauge.view import ModelView, unwrap
    with pytest.raises(GaugeError, match=field):
        ModelView(unwrap(model), spec=LLAMA)
    monkeypatch.undo()                                                # the family's own spec preserves the logits
    model = _tiny(model_type)
    assert hf_gauge.get_spec(model).name == model_type
    hf_gauge.apply_gauge(model, hf_gauge.random_gauge(model, seed=3, spaces="all"))
    assert (model(ids).logits - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_llama_named_checkpoint_with_a_gateless_mlp_is_refused(tmp_path):
    """An arcee checkpoint whose config.json says model_type llama: refused from files too (streaming apply, reading
    checkpoint files, transport with the config), naming the field."""
    import json
    from hf_gauge.filefeatures import CheckpointFiles
    from hf_gauge.transport._io import spec_and_config
    from transformers import AutoConfig
    model = _tiny("arcee")
    model.save_pretrained(tmp_path / "src")
    cfg_path = tmp_path / "src" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    g = hf_gauge.Gauge(residual=SignedPermutation.identity(32), source={"model_type": "llama"})
    with pytest.raises(GaugeError, match="hidden_act='relu2'.*'llama' spec supports hidden_act = 'silu' or 'swish'"):
        hf_gauge.apply_gauge_to_checkpoint(tmp_path / "src", g, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(GaugeError, match="hidden_act='relu2'"):
        CheckpointFiles(tmp_path / "src")
    with pytest.raises(GaugeError, match="hidden_act='relu2'"):
        spec_and_config(g, config=AutoConfig.from_pretrained(tmp_path / "src"))


def test_an_omitted_field_takes_the_transformers_class_default():
    from transformers import AutoConfig
    from hf_gauge.specs.llama import LLAMA
    from hf_gauge.view import spec_for
    llama, arcee = AutoConfig.for_model("llama"), AutoConfig.for_model("arcee")
    del llama.hidden_act, arcee.hidden_act
    assert spec_for(llama) is LLAMA                                   # LlamaConfig's default: silu
    with pytest.raises(GaugeError, match="hidden_act='relu2'"):      # ArceeConfig's default: relu2
        spec_for(arcee, LLAMA)
