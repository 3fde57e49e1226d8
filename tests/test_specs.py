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
    m = AutoModelForCausalLM.from_config(AutoConfig.for_model("xglm", d_model=32, num_layers=1, attention_heads=2,
                                                                   vocab_size=50, ffn_dim=64))
    with pytest.raises(GaugeError, match="unsupported architecture model_type='xglm'.*llama.*qwen3"):
        hf_gauge.random_gauge(m)
    assert "llama" in supported_model_types() and "gpt_neox" in supported_model_types()
    with pytest.raises(GaugeError, match="unsupported architecture model_type='xglm'"):
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


def test_interleaved_segments_move_entry_by_entry():
    """gpt-oss's gate_up_proj [E, d, 2f] interleaves gate and up at stride 2 (``segmented(..., interleave=True)``):
    under an expert's unit permutation both strided halves move by it (checked by hand), and down_proj's rows too."""
    from test_architectures import build
    m = build("gpt_oss")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    perms = {e: torch.randperm(24, generator=torch.Generator().manual_seed(e)) for e in range(4)}
    g = hf_gauge.Gauge(spaces={f"experts.0.{e}": SignedPermutation(p) for e, p in perms.items()})
    hf_gauge.apply_gauge(m, g)
    after, x = m.state_dict(), "model.layers.0.mlp.experts."
    for e, p in perms.items():
        for name, axis in (("gate_up_proj", 1), ("gate_up_proj_bias", 0)):
            src, out = before[x + name][e], after[x + name][e]
            for half in (0, 1):                                   # gate entries ::2, up entries 1::2
                got = out.index_select(axis, torch.arange(half, 48, 2))
                want = src.index_select(axis, torch.arange(half, 48, 2)).index_select(axis, p)
                assert torch.equal(got, want), (e, name, half)
        assert torch.equal(after[x + "down_proj"][e], before[x + "down_proj"][e][p])


def test_interleaved_parts_of_unequal_length_are_refused():
    from hf_gauge.engine import segment_positions
    from hf_gauge.specs.base import Axis, segmented
    from test_architectures import tiny_config
    spec, cfg = get_spec("gpt_oss"), tiny_config("gpt_oss")
    units, heads = Axis(0, "experts.0.0", signed=False), Axis(0, "attn.0", signed=False)
    fused = segmented(0, units, heads, interleave=True)
    with pytest.raises(GaugeError, match="interleaved parts must have one length, these have 24, 4 entries"):
        segment_positions(spec, cfg, fused, fused.segments[0])
    even = segmented(0, units, units, interleave=True)
    assert torch.equal(segment_positions(spec, cfg, even, even.segments[1]), torch.arange(1, 48, 2))
    with pytest.raises(GaugeError, match="groups= or interleave="):
        segmented(0, units, units, groups="head_dim", interleave=True)


def test_gpt2_conv1d_moves_by_hand():
    """Conv1D weights are [in, out]: readers' residual rows and writers' residual columns, c_attn's [q | k | v]
    columns by head blocks, LayerNorm gains permuted and biases signed by the one global sign (checked by hand)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from test_architectures import randomize
    cfg = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=4, n_inner=24, vocab_size=64, n_positions=16)
    m = randomize(AutoModelForCausalLM.from_config(cfg))            # random gains and biases: no vacuous check
    assert all(p.std() > 0 for p in m.parameters())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    g = hf_gauge.random_gauge(m, seed=2, spaces="all")
    r, u, h = g.residual, g["mlp.0"], g["attn.0"]
    p, s = r.perm, r.sign.float()
    assert abs(int(r.sign.sum())) == 32                             # S_d x {±1}: one global sign
    hf_gauge.apply_gauge(m, g)
    after, L = m.state_dict(), "transformer.h.0."
    for emb in ("transformer.wte.weight", "transformer.wpe.weight"):
        assert torch.equal(after[emb], before[emb][:, p] * s), emb
    qkv = before[L + "attn.c_attn.weight"][p] * s[:, None]
    heads = (h.perm[:, None] * 8 + torch.arange(8)).reshape(-1)
    assert torch.equal(after[L + "attn.c_attn.weight"], torch.cat([qkv[:, k * 32:(k + 1) * 32][:, heads]
                                                                   for k in range(3)], 1))
    cb = before[L + "attn.c_attn.bias"]
    assert torch.equal(after[L + "attn.c_attn.bias"], torch.cat([cb[k * 32:(k + 1) * 32][heads] for k in range(3)]))
    assert torch.equal(after[L + "attn.c_proj.weight"], before[L + "attn.c_proj.weight"][heads][:, p] * s)
    for writer_bias in (L + "attn.c_proj.bias", L + "mlp.c_proj.bias"):
        assert torch.equal(after[writer_bias], before[writer_bias][p] * s), writer_bias
    assert torch.equal(after[L + "mlp.c_fc.weight"], before[L + "mlp.c_fc.weight"][p][:, u.perm] * s[:, None])
    assert torch.equal(after[L + "mlp.c_fc.bias"], before[L + "mlp.c_fc.bias"][u.perm])
    assert torch.equal(after[L + "mlp.c_proj.weight"], before[L + "mlp.c_proj.weight"][u.perm][:, p] * s)
    for ln in (L + "ln_1", L + "ln_2", "transformer.ln_f"):
        assert torch.equal(after[ln + ".weight"], before[ln + ".weight"][p])
        assert torch.equal(after[ln + ".bias"], before[ln + ".bias"][p] * s)


def test_transposed_rules_give_lora_factors_the_conv1d_axes():
    """PEFT keeps lora_A [r, in] and lora_B [out, r] on a Conv1D ([in, out]): A inherits the weight's axis 0, B its
    axis 1, a DoRA magnitude [out] the output axis."""
    spec = SPECS["gpt2"]
    L = "base_model.model.transformer.h.0."
    a = axes_for(spec, L + "mlp.c_fc.lora_A.default.weight")
    assert [(x.axis, x.space, x.signed) for x in a] == [(1, "residual", True)]
    b = axes_for(spec, L + "mlp.c_fc.lora_B.default.weight")
    assert [(x.axis, x.space, x.signed) for x in b] == [(0, "mlp.0", False)]
    b = axes_for(spec, L + "attn.c_proj.lora_B.default.weight")
    assert [(x.axis, x.space) for x in b] == [(0, "residual")]
    assert [p.space for p in axes_for(spec, L + "attn.c_attn.lora_B.default.weight")[0].parts()] == ["attn.0"] * 3
    mag = axes_for(spec, L + "attn.c_proj.lora_magnitude_vector.default.weight")
    assert [(x.axis, x.space, x.signed) for x in mag] == [(0, "residual", False)]


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


@pytest.mark.parametrize("model_type, buffers", [
    ("gpt2", ("h.{i}.attn.bias", "h.{i}.attn.masked_bias")),
    ("gpt_neo", ("h.{i}.attn.attention.bias", "h.{i}.attn.attention.masked_bias")),
    ("gptj", ("h.{i}.attn.bias", "h.{i}.attn.masked_bias")),
])
def test_released_checkpoint_layout_with_mask_buffers(model_type, buffers, tmp_path):
    """Released GPT-2 / GPT-Neo / GPT-J checkpoints store the base model's names (``h.0...``, no ``transformer.``)
    and the causal-mask buffers that transformers ignores on load: streaming apply moves the weights as the live
    model does and copies the buffers unchanged (without their file rules the buffers are refused, never guessed)."""
    import dataclasses
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel
    from test_architectures import build
    causal = build(model_type)
    body = getattr(causal, causal.base_model_prefix)
    tensors = {k: v.contiguous() for k, v in body.state_dict().items()}
    for i in range(2):
        tensors[buffers[0].format(i=i)] = torch.tril(torch.ones(1, 1, 32, 32, dtype=torch.bool)).to(torch.uint8)
        tensors[buffers[1].format(i=i)] = torch.tensor(-1e4)
    (tmp_path / "src").mkdir()
    body.config.save_pretrained(tmp_path / "src")
    save_file(tensors, str(tmp_path / "src" / "model.safetensors"), metadata={"format": "pt"})
    g = hf_gauge.random_gauge(causal, seed=3, spaces="all")
    hf_gauge.apply_gauge_to_checkpoint(tmp_path / "src", g, tmp_path / "out", progress=False)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    for i in range(2):
        for b in buffers:
            assert torch.equal(out[b.format(i=i)], tensors[b.format(i=i)])
    hf_gauge.apply_gauge(body, g)
    loaded = AutoModel.from_pretrained(tmp_path / "out", dtype=torch.float32)
    for k, v in body.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    spec = SPECS[model_type]
    bare = dataclasses.replace(spec, file_rules=())
    from hf_gauge.engine import moves_for
    with pytest.raises(GaugeError, match="not covered"):
        moves_for(bare, causal.config, g, {("transformer." + buffers[0]).format(i=0): 0}, strict=True, files=True)


def test_gpt2_double_heads_keep_their_outputs():
    """GPT2DoubleHeadsModel's multiple-choice head reads the final residual (its summary Linear moves like a task
    head): LM and multiple-choice logits are preserved; without moving the summary weight they are not."""
    from transformers import GPT2DoubleHeadsModel
    from test_architectures import randomize, tiny_config
    torch.manual_seed(0)
    m = randomize(GPT2DoubleHeadsModel._from_config(tiny_config("gpt2"), attn_implementation="eager")).eval()
    ids = torch.randint(0, 127, (2, 3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(ids)
    g = hf_gauge.random_gauge(m, seed=2, spaces="all")
    summary = m.multiple_choice_head.summary.weight.detach().clone()
    hf_gauge.apply_gauge(m, g)
    with torch.no_grad():
        out = m(ids)
        assert (out.logits - ref.logits).abs().max() <= 1e-5 * ref.logits.abs().max()
        assert (out.mc_logits - ref.mc_logits).abs().max() <= 1e-5 * ref.mc_logits.abs().max()
        m.multiple_choice_head.summary.weight.copy_(summary)
        assert (m(ids).mc_logits - ref.mc_logits).abs().max() > 1e-3 * ref.mc_logits.abs().max()


@pytest.mark.parametrize("model_type, over, match", [
    ("gpt2", {"add_cross_attention": True}, "add_cross_attention=True.*encoder"),
    ("opt", {"layer_norm_elementwise_affine": False}, "layer_norm_elementwise_affine=False"),
    ("opt", {"_remove_final_layer_norm": True}, "_remove_final_layer_norm=True"),
])
def test_classic_configs_outside_the_declared_fields_are_refused(model_type, over, match):
    from test_architectures import build
    m = build(model_type, **over)
    with pytest.raises(GaugeError, match=match):
        hf_gauge.random_gauge(m)


@pytest.mark.parametrize("model_type, over", [("gpt2", {}), ("gpt_neo", {}), ("gptj", {}), ("opt", {}),
                                              ("opt", {"word_embed_proj_dim": 16})])
def test_tied_classic_families_live_and_from_files(model_type, over, tmp_path, ids):
    """Released GPT-2, GPT-Neo and OPT checkpoints tie lm_head to the token embedding (one tensor, moved once;
    ``save_pretrained`` stores it once): function preserved, streaming apply equals live apply, and find / verify
    from files recover the hidden gauge (OPT with p != d too, whose tied pair lives in p-space)."""
    import copy
    from hf_gauge.fileverify import verify_files
    from test_architectures import _same_gauge, assert_bit_equal, build, close, logits, state
    a = build(model_type, tie_word_embeddings=True, **over)
    assert a.lm_head.weight is a.get_input_embeddings().weight
    g = hf_gauge.random_gauge(a, seed=5, spaces="all")
    b = hf_gauge.apply_gauge(copy.deepcopy(a), g)
    assert close(logits(b, ids), logits(a, ids))
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    hf_gauge.apply_gauge_to_checkpoint(tmp_path / "a", g, tmp_path / "out", progress=False)
    assert_bit_equal(state(type(a).from_pretrained(tmp_path / "out", dtype=torch.float32)), state(b))
    _same_gauge(hf_gauge.find_gauge(tmp_path / "a", tmp_path / "b", spaces="all"), g)
    assert verify_files(tmp_path / "a", tmp_path / "b", g)["ok"]


@pytest.mark.parametrize("model_type, over", [
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": True, "activation_function": "relu"}),
    ("gpt2", {"scale_attn_weights": False, "n_inner": None}),
    ("gpt_neo", {"attention_types": [[["local"], 2]], "window_size": 2, "activation_function": "gelu"}),
    ("gptj", {"rotary_dim": 8}),
    ("opt", {"enable_bias": False, "activation_function": "gelu"}),
])
def test_classic_config_options_the_rules_cover(model_type, over, ids):
    """Options the specs' docstrings say need no declaration (attention scales, other elementwise activations, the
    default MLP width, local-only attention, rotary over the whole head, no biases): the function is preserved under
    a random full gauge and the gauge is recovered from the weights."""
    import copy
    from test_architectures import _same_gauge, build, close, logits
    a = build(model_type, **over)
    g = hf_gauge.random_gauge(a, seed=6, spaces="all")
    b = hf_gauge.apply_gauge(copy.deepcopy(a), g)
    assert close(logits(b, ids), logits(a, ids))
    _same_gauge(hf_gauge.find_full_gauge(a, b), g)
