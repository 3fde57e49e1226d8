"""gpt-oss and Llama-4 text beyond the battery's tiny configs: config variants the rules must cover, and the
refusals that remain (MXFP4 checkpoints)."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import hf_gauge
from hf_gauge import GaugeError, apply_gauge, random_gauge

from test_architectures import VOCAB, assert_bit_equal, build, close, logits, state

pytestmark = pytest.mark.usefixtures("one_thread")

OSS_VARIANTS = {
    "no_bias": {"attention_bias": False},
    "all_full_attention": {"layer_types": ["full_attention", "full_attention"]},
    "no_gqa_top1": {"num_key_value_heads": 4, "num_experts_per_tok": 1},
}


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB - 1, (2, 9), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("over", OSS_VARIANTS.values(), ids=OSS_VARIANTS.keys())
def test_gpt_oss_variants_keep_logits_and_are_found(over, ids):
    a = build("gpt_oss", **over)
    ref, before = logits(a, ids), state(a)
    g = random_gauge(a, seed=3, spaces="all")
    b = apply_gauge(copy.deepcopy(a), g)
    assert close(logits(b, ids), ref)
    found = hf_gauge.find_full_gauge(a, b)
    assert all(torch.equal(found.spaces[s].perm, el.perm) and torch.equal(found.spaces[s].sign, el.sign)
               for s, el in g.spaces.items()) and set(found.spaces) == set(g.spaces)
    assert_bit_equal(state(apply_gauge(b, g.inverse())), before)


def test_gpt_oss_sinks_move_with_their_heads(ids):
    """Each attention sink is a per-head logit: moving the heads without their sinks changes the logits."""
    a = build("gpt_oss")
    ref = logits(a, ids)
    g = hf_gauge.Gauge(spaces={"attn.0": hf_gauge.SignedPermutation([2, 3, 0, 1])})
    b = apply_gauge(copy.deepcopy(a), g)
    assert close(logits(b, ids), ref)
    with torch.no_grad():
        b.model.layers[0].self_attn.sinks.copy_(a.model.layers[0].self_attn.sinks)
    assert not close(logits(b, ids), ref, 1e-3)


MXFP4 = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                              "model.embed_tokens", "lm_head"]}


def test_gpt_oss_mxfp4_live_config_is_refused():
    m = build("gpt_oss")
    m.config.quantization_config = dict(MXFP4)
    with pytest.raises(GaugeError, match=r"quantization_config=.*Mxfp4Config\(dequantize=True\).*save_pretrained"):
        random_gauge(m)


def test_gpt_oss_mxfp4_checkpoint_is_refused_with_the_way_to_floats(tmp_path):
    """The released layout: ``quantization_config`` mxfp4 and packed ``*_blocks`` / ``*_scales`` expert tensors.
    Apply, find and verify from files refuse it, naming Mxfp4Config(dequantize=True) + save_pretrained."""
    from safetensors.torch import load_file, save_file
    from hf_gauge.fileverify import verify_files
    a = build("gpt_oss")
    a.save_pretrained(tmp_path / "q")
    sd = load_file(str(tmp_path / "q" / "model.safetensors"))
    for k in [k for k in sd if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        e, rows = sd[k].shape[0], sd[k].shape[2]
        sd[k + "_blocks"] = torch.zeros(e, rows, 1, 16, dtype=torch.uint8)
        sd[k + "_scales"] = torch.zeros(e, rows, 1, dtype=torch.uint8)
        del sd[k]
    save_file(sd, str(tmp_path / "q" / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    cfg["quantization_config"] = MXFP4
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    want = r"quantized checkpoint \(mxfp4\).*Mxfp4Config\(dequantize=True\)\) and save_pretrained"
    g = random_gauge(a, seed=1)
    with pytest.raises(GaugeError, match=want):
        hf_gauge.apply_gauge_to_checkpoint(tmp_path / "q", g, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
    a.save_pretrained(tmp_path / "float")
    with pytest.raises(GaugeError, match=want):
        hf_gauge.find_gauge(tmp_path / "float", tmp_path / "q")
    with pytest.raises(GaugeError, match=want):
        verify_files(tmp_path / "q", tmp_path / "float", g)


LLAMA4_VARIANTS = {
    "every_layer_moe": {"interleave_moe_layer_step": 1},
    "moe_first_layer_only": {"moe_layers": [0]},
    "no_qk_norm_all_nope_top1": {"use_qk_norm": False, "no_rope_layers": [0, 0], "num_experts_per_tok": 1},
    "mha_no_bias_no_chunks": {"num_key_value_heads": 4, "attention_bias": False, "attention_chunk_size": None},
}


@pytest.mark.parametrize("over", LLAMA4_VARIANTS.values(), ids=LLAMA4_VARIANTS.keys())
def test_llama4_text_variants_keep_logits_and_are_found(over, ids):
    a = build("llama4_text", **over)
    ref, before = logits(a, ids), state(a)
    g = random_gauge(a, seed=3, spaces="all")
    moe = [s for s in g.spaces if s.startswith("moe.")]
    assert moe == [f"moe.{i}" for i in a.config.moe_layers]
    assert [s for s in g.spaces if s.startswith("mlp.")] == [f"mlp.{i}" for i in range(2) if i not in a.config.moe_layers]
    b = apply_gauge(copy.deepcopy(a), g)
    assert close(logits(b, ids), ref)
    found = hf_gauge.find_full_gauge(a, b)
    assert set(found.spaces) == set(g.spaces)
    assert all(torch.equal(found.spaces[s].perm, el.perm) and torch.equal(found.spaces[s].sign, el.sign)
               for s, el in g.spaces.items())
    assert_bit_equal(state(apply_gauge(b, g.inverse())), before)


def test_llama4_text_router_scales_the_expert_input_and_unit_signs_still_hold(ids):
    """The sigmoid routing weight multiplies each expert's input: a signed permutation of the expert's units (sign on
    its up row and down column) keeps the logits; the same sign on its gate row as well does not (SiLU is not odd)."""
    a = build("llama4_text")
    ref = logits(a, ids)
    sign = torch.tensor([-1, 1] * 12)
    g = hf_gauge.Gauge(spaces={"experts.1.2": hf_gauge.SignedPermutation(torch.arange(24).roll(5), sign)})
    b = apply_gauge(copy.deepcopy(a), g)
    assert close(logits(b, ids), ref)
    with torch.no_grad():
        gate = b.model.layers[1].feed_forward.experts.gate_up_proj[2, :, :24]
        gate.mul_(sign.float())                      # sign the gate columns of expert 2 too: not a symmetry
    assert not close(logits(b, ids), ref, 1e-3)


def test_llama4_text_files_whose_config_moves_the_moe_layers_are_refused(tmp_path):
    """A config.json whose moe_layers disagree with the experts on disk is refused before anything is written."""
    a = build("llama4_text")
    a.save_pretrained(tmp_path / "src")
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    cfg["moe_layers"] = [0]
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GaugeError, match=r"moe_layers=\[0\]\) but the checkpoint's tensors of that space are at"):
        hf_gauge.apply_gauge_to_checkpoint(tmp_path / "src", random_gauge(a, seed=1), tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("model_type, prefix", [("gpt_oss", "mlp"), ("llama4_text", "feed_forward")])
def test_lora_on_fused_experts_stored_in_out(model_type, prefix, ids):
    """PEFT's ``ParamWrapper`` LoRA on experts stored ``[E, in, out]``: gpt-oss's experts declare ``is_transposed``
    (``lora_A [E * r, in]`` reads axis 1 of the parameter, ``lora_B [out, r * E]`` axis 2; its rules say
    ``transposed=True``), Llama-4's do not (PEFT reads ``[E, out, in]`` positionally). Either way the transported
    adapter reproduces the adapted logits on the gauged base."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    a = build(model_type)
    g = random_gauge(a, seed=3, spaces="all")
    b = apply_gauge(copy.deepcopy(a), g)
    cfg = dict(r=2, target_modules=["q_proj"], init_lora_weights=False,
               target_parameters=[f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj"])
    torch.manual_seed(0)
    pa = get_peft_model(copy.deepcopy(a), LoraConfig(**cfg)).eval()
    ref = logits(pa, ids)
    assert not close(ref, logits(a, ids), 1e-3)
    sd = g.transport(get_peft_model_state_dict(pa), model=pa)
    pb = get_peft_model(copy.deepcopy(b), LoraConfig(**cfg))
    assert not set_peft_model_state_dict(pb, sd).unexpected_keys
    assert close(logits(pb.eval(), ids), ref)
    assert close(logits(g.transport(pa).eval(), ids), ref)          # a PeftModel in, a PeftModel out


def test_gpt_oss_mxfp4_config_object_is_refused_on_one_line():
    """A model loaded quantized (on a GPU with the MXFP4 kernels) keeps an ``Mxfp4Config`` object: refused too."""
    from transformers import Mxfp4Config
    m = build("gpt_oss")
    m.config.quantization_config = Mxfp4Config(modules_to_not_convert=MXFP4["modules_to_not_convert"])
    with pytest.raises(GaugeError, match=r"Mxfp4Config\(dequantize=True\)") as err:
        random_gauge(m)
    assert "\n" not in str(err.value) and "quantization_config=Mxfp4Config(" in str(err.value)
