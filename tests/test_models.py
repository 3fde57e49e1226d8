"""apply_gauge on live models: function preservation, bit-exact inverse, refusals, wrappers, device maps."""
from __future__ import annotations


import pytest
import torch

import hf_gauge
from hf_gauge import Gauge, GaugeError, SignedPermutation
from hf_gauge.engine import move_tensor, moves_for
from hf_gauge.specs import get_spec

from conftest import FAMILIES, assert_state_equal, logits, state, tiny_model


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("tie", [False, True])
def test_random_gauge_preserves_logits_and_inverts_bit_exactly(model_type, tie, ids):
    m = tiny_model(model_type, tie=tie)
    ref, before = logits(m, ids), state(m)
    g = hf_gauge.random_gauge(m, seed=11)
    assert not g.residual.is_permutation
    out = m.apply_gauge(g)
    assert out is m
    assert (logits(m, ids) - ref).abs().max() < 1e-5
    changed = [k for k in before if not torch.equal(before[k], m.state_dict()[k])]
    assert len(changed) >= 10
    m.apply_gauge(g.inverse())
    assert_state_equal(before, state(m))


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_inverse_is_bit_exact_in_half_precision(model_type, dtype, tie):
    m = tiny_model(model_type, dtype=dtype, tie=tie)
    before = state(m)
    g = hf_gauge.random_gauge(m, seed=2, spaces=("residual", "mlp", "attn"))
    m.apply_gauge(g)
    assert all(v.dtype == dtype for v in m.state_dict().values())
    m.apply_gauge(g.inverse())
    assert_state_equal(before, state(m))


def test_composition_applies_like_sequence(ids):
    a, b = tiny_model("qwen2"), tiny_model("qwen2")
    g1, g2 = hf_gauge.random_gauge(a, seed=1), hf_gauge.random_gauge(a, seed=2)
    a.apply_gauge(g1)
    with pytest.warns(UserWarning, match="fingerprint"):   # g2 was drawn for the un-gauged chart
        a.apply_gauge(g2)
    b.apply_gauge(g2 @ g1)
    assert_state_equal(state(a), state(b))


def test_permutation_group_random_gauge():
    m = tiny_model("llama")
    g = hf_gauge.random_gauge(m, seed=0, group="permutation")
    assert g.residual.is_permutation
    assert hf_gauge.random_gauge(m, seed=5) == hf_gauge.random_gauge(m, seed=5)
    assert hf_gauge.random_gauge(m, seed=5) != hf_gauge.random_gauge(m, seed=6)
    with pytest.raises(GaugeError, match="'signed' or 'permutation'"):
        hf_gauge.random_gauge(m, group="orthogonal")
    with pytest.raises(GaugeError, match="unknown gauge space"):
        hf_gauge.random_gauge(m, spaces=("mlp.9",))


# --------------------------------------------------------------------------- LayerNorm contrast
@pytest.mark.parametrize("tie", [False, True])
def test_gpt_neox_permutation_and_global_flip_preserve_function(tie, ids):
    m = tiny_model("gpt_neox", tie=tie)
    ref, before = logits(m, ids), state(m)
    perm = SignedPermutation.random(64, 0, signed=False)
    flip = SignedPermutation(perm.perm, -torch.ones(64, dtype=torch.long))
    for el in (perm, flip):
        m.apply_gauge(Gauge(residual=el))
        assert (logits(m, ids) - ref).abs().max() < 1e-5
        m.apply_gauge(Gauge(residual=el).inverse())
        assert_state_equal(before, state(m))
    assert hf_gauge.symmetry_group(m) == "S_d x {±1}"


def test_gpt_neox_mixed_signs_refused_and_would_break_function(ids):
    m = tiny_model("gpt_neox")
    mixed = Gauge(residual=SignedPermutation.random(64, 1))
    with pytest.raises(GaugeError, match="mixed signs on a LayerNorm model.*S_d x"):
        m.apply_gauge(mixed)
    # the refusal is not arbitrary: forcing the same moves through the engine breaks the function
    ref = logits(m, ids)
    params = dict(m.named_parameters())
    for n, mv in moves_for(get_spec(m), m.config, mixed, params).items():
        if mv:
            params[n].data = move_tensor(params[n].data, mv)
    assert (logits(m, ids) - ref).abs().max() > 1e-2


def test_gpt_neox_mlp_signs_refused():
    m = tiny_model("gpt_neox")
    with pytest.raises(GaugeError, match="admits permutations only"):
        m.apply_gauge(Gauge(mlp={0: SignedPermutation.random(96, 0)}))


# --------------------------------------------------------------------------- refusals
def test_wrong_width_refused():
    m = tiny_model("llama")
    with pytest.raises(GaugeError, match="width mismatch in space 'residual'.*63.*64"):
        m.apply_gauge(Gauge(residual=SignedPermutation.random(63, 0)))


def test_space_the_model_lacks_refused():
    m = tiny_model("llama", layers=2)
    with pytest.raises(GaugeError, match="space 'mlp.5' that this llama model lacks"):
        m.apply_gauge(Gauge(mlp={5: SignedPermutation.random(96, 0)}))


def test_head_permutation_mixing_kv_groups_refused():
    m = tiny_model("llama", heads=4, kv_heads=2)
    with pytest.raises(GaugeError, match="mixes KV groups"):
        m.apply_gauge(Gauge(attn={0: SignedPermutation([0, 2, 1, 3])}))
    with pytest.raises(GaugeError, match="admits permutations only"):
        m.apply_gauge(Gauge(attn={0: SignedPermutation([1, 0, 2, 3], [1, -1, 1, 1])}))


def test_model_type_mismatch_and_non_gauge_refused():
    m, other = tiny_model("llama"), tiny_model("gpt_neox")
    g = hf_gauge.random_gauge(other, seed=0)
    with pytest.raises(GaugeError, match="fitted for model_type='gpt_neox'"):
        m.apply_gauge(g)
    with pytest.raises(GaugeError, match="expects a hf_gauge.Gauge"):
        m.apply_gauge(SignedPermutation.random(64, 0))


def test_fingerprint_mismatch_warns_or_refuses_when_strict():
    m = tiny_model("llama")
    g = hf_gauge.random_gauge(m, seed=0)
    m.apply_gauge(g)
    assert hf_gauge.fingerprint(m) == g.target["fingerprint"]
    with pytest.warns(UserWarning, match="fingerprint"):
        m.apply_gauge(g)                           # already gauged: the source fingerprint no longer matches
    with pytest.raises(GaugeError, match="strict=True"):
        m.apply_gauge(g, strict=True)


def test_offloaded_parameters_refused():
    m = tiny_model("llama")
    m.model.layers[0].input_layernorm.weight = torch.nn.Parameter(torch.empty(64, device="meta"))
    with pytest.raises(GaugeError, match=r"meta device.*apply_gauge_to_checkpoint\(src, gauge, out\).*hf-gauge apply"):
        m.apply_gauge(Gauge(residual=SignedPermutation.random(64, 0)))


# --------------------------------------------------------------------------- symmetry group
def test_symmetry_group_detects_constant_gains():
    m = tiny_model("llama")
    assert hf_gauge.symmetry_group(m) == "B_d"
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.fill_(1.0)
    with pytest.warns(UserWarning, match="any orthogonal map"):
        assert m.symmetry_group() == "O(d)"


# --------------------------------------------------------------------------- wrappers, devices, classes
def test_methods_attached_without_swapping_classes(tmp_path):
    m = tiny_model("qwen3")
    cls = type(m)
    m.apply_gauge(hf_gauge.random_gauge(m))
    assert type(m) is cls and cls.__name__ == "Qwen3ForCausalLM"
    m.save_pretrained(tmp_path)
    import json
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]


def test_works_through_peft_wrapper(ids):
    from peft import LoraConfig, get_peft_model
    base = tiny_model("llama")
    pm = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "o_proj", "up_proj", "down_proj"],
                                         init_lora_weights=False))
    pm.eval()
    ref = logits(pm, ids)
    before = state(pm)
    g = hf_gauge.random_gauge(pm, seed=9)
    assert pm.apply_gauge(g) is pm                       # the wrapper's own method returns the wrapper
    assert (logits(pm, ids) - ref).abs().max() < 1e-5
    hf_gauge.apply_gauge(pm, g.inverse())
    assert_state_equal(before, state(pm))


def test_works_through_torch_compile_wrapper():
    m = tiny_model("mistral")
    before = state(m)
    c = torch.compile(m)
    g = hf_gauge.random_gauge(c, seed=1)
    hf_gauge.apply_gauge(c, g)
    assert not torch.equal(before["model.norm.weight"], m.state_dict()["model.norm.weight"])
    hf_gauge.apply_gauge(c, g.inverse())
    assert_state_equal(before, state(m))


def test_accelerate_device_map(tmp_path, ids):
    """A model dispatched by accelerate (hooks, per-module placement) is gauged in place."""
    from accelerate import dispatch_model
    m = tiny_model("llama")
    ref = logits(m, ids)
    devices = ["cuda:0", "cuda:1"] if torch.cuda.device_count() >= 2 else (["cuda:0", "cpu"] if torch.cuda.is_available() else ["cpu", "cpu"])
    dmap = {"model.embed_tokens": devices[0], "model.layers.0": devices[0], "model.layers.1": devices[1],
            "model.norm": devices[1], "model.rotary_emb": devices[1], "lm_head": devices[1]}
    m = dispatch_model(m, device_map=dmap)
    g = hf_gauge.random_gauge(m, seed=3, spaces=("residual", "mlp", "attn"))
    m.apply_gauge(g)
    assert (logits(m, ids.to(devices[0])).cpu() - ref).abs().max() < 1e-4
    assert {p.device.type for p in m.parameters()} == {torch.device(d).type for d in devices}


def _disk_offloaded(model, tmp_path, how):
    """``model`` with layer 1 and the final norm on disk: through ``from_pretrained(device_map=..., offload_folder=)``
    or accelerate's ``disk_offload`` (which writes every weight into the offload folder as ``.dat`` files)."""
    from transformers import AutoModelForCausalLM
    if how == "disk_offload":
        from accelerate import disk_offload
        out = disk_offload(model, str(tmp_path / "offload"), execution_device=torch.device("cpu"))
        assert any(p.suffix == ".dat" for p in (tmp_path / "offload").iterdir())     # a real offload folder on disk
        return out
    model.save_pretrained(tmp_path / "ckpt")
    dmap = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "disk",
            "model.rotary_emb": "cpu", "lm_head": "cpu"}
    return AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", device_map=dmap, dtype=torch.float32,
                                                offload_folder=str(tmp_path / "offload")).eval()


@pytest.mark.parametrize("how", ["device_map", "disk_offload"])
def test_disk_offloaded_model_fingerprint_gauge_to_random_gauge(tmp_path, ids, how):
    """Offloaded parameters live on the meta device; fingerprinting reads them where accelerate keeps them, so
    ``random_gauge`` and ``gauge_to(data=...)`` work; ``apply_gauge`` refuses (it would have to rewrite the offload)."""
    a = tiny_model("llama", seed=2)
    b = tiny_model("llama", seed=2)
    g = hf_gauge.random_gauge(b, seed=5)
    b.apply_gauge(g)
    fp = hf_gauge.fingerprint(a)
    off = _disk_offloaded(a, tmp_path, how)
    assert off.model.norm.weight.device.type == "meta"
    assert hf_gauge.fingerprint(off) == fp
    assert hf_gauge.random_gauge(off, seed=1).source["fingerprint"] == fp
    found = off.gauge_to(b, data=torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(0)))
    assert torch.equal(found.residual.perm, g.residual.perm) and torch.equal(found.residual.sign, g.residual.sign)
    assert found.source["fingerprint"] == fp and found.target["fingerprint"] == hf_gauge.fingerprint(b)
    with pytest.raises(GaugeError, match=r"meta device.*apply_gauge_to_checkpoint\(src, gauge, out\).*hf-gauge apply"):
        off.apply_gauge(g)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_bit_exact(dtype):
    m = tiny_model("llama", dtype=dtype).cuda()
    before = state(m)
    g = hf_gauge.random_gauge(m, seed=1, spaces=("residual", "mlp", "attn"))
    m.apply_gauge(g).apply_gauge(g.inverse())
    assert_state_equal(before, state(m))


# --------------------------------------------------------------------------- real weights
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_smollm2_real_weights(smollm2, smollm2_ids, dtype):
    """Real weights: the gauged model computes the same function, and the inverse restores every bit.

    A gauge reorders the sums inside each matmul, so float32 logits agree to float32 rounding: 1e-5 relative to
    the largest logit (about 34 here; measured about 8e-5 absolute, 2.5e-6 relative). transformers computes RMSNorm
    and RoPE in float32 even for float64 models, so float64 does not tighten this. In bf16 the gauge's effect stays
    within bf16's own rounding (the bf16 model's distance from the float32 one).
    """
    ids = smollm2_ids[:2, :32]
    ref32 = logits(smollm2, ids)
    m = smollm2.to(dtype)
    ref = logits(m, ids)
    before = state(m)
    g = hf_gauge.random_gauge(m, seed=0)
    m.apply_gauge(g)
    diff = (logits(m, ids) - ref).abs().max().item()
    if dtype == torch.float32:
        assert diff < 1e-5 * ref.abs().max().item()
    else:
        assert diff <= (ref - ref32).abs().max().item()
    assert not torch.equal(before["model.embed_tokens.weight"], m.state_dict()["model.embed_tokens.weight"])
    m.apply_gauge(g.inverse())
    assert_state_equal(before, state(m))


def test_attach_puts_methods_on_the_shared_base_and_never_replaces(monkeypatch):
    from transformers import GPT2Model, LlamaForSequenceClassification, PreTrainedModel
    from hf_gauge._attach import METHODS, install
    for name, fn in METHODS.items():
        assert PreTrainedModel.__dict__[name] is fn                        # one attachment, inherited everywhere
        assert getattr(LlamaForSequenceClassification, name) is fn and getattr(GPT2Model, name) is fn
    sentinel = object()
    monkeypatch.setattr(PreTrainedModel, "transport", sentinel)
    install()
    assert PreTrainedModel.transport is sentinel
    from transformers import XGLMConfig, XGLMModel
    with pytest.raises(hf_gauge.GaugeError, match="model_type='xglm'"):
        XGLMModel(XGLMConfig(d_model=16, num_layers=1, attention_heads=2, vocab_size=20, ffn_dim=32)).symmetry_group()


def test_import_is_lazy_and_methods_attach_when_classes_are_imported():
    """``import hf_gauge`` imports neither torch nor transformers; a model class imported afterwards (and PEFT's
    PeftModel) has the methods all the same; the package's functions stay functions when their submodules load."""
    import os
    import subprocess
    import sys
    code = """
import sys
import hf_gauge
assert "torch" not in sys.modules and "transformers" not in sys.modules, "heavy import"
from transformers import AutoConfig, AutoModelForCausalLM
m = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3", hidden_size=32, intermediate_size=48,
    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64))
assert callable(m.gauge_to) and callable(m.apply_gauge) and type(m).__name__ == "Qwen3ForCausalLM"
from transformers import PreTrainedModel
assert "apply_gauge" in PreTrainedModel.__dict__
from peft import PeftModel
assert "apply_gauge" in PeftModel.__dict__
import hf_gauge.merge, hf_gauge.verify, hf_gauge.audit
assert all(callable(f) and not isinstance(f, type(sys)) for f in (hf_gauge.merge, hf_gauge.verify, hf_gauge.audit))
m.apply_gauge(hf_gauge.random_gauge(m, seed=1))
print("OK")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"})
    assert r.stdout.strip().endswith("OK"), r.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ quantized (issue 11)
def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor) and not v.is_quantized}


def test_torch_dynamic_int8_model_refused_untouched():
    """Issue 11 item 2: apply_gauge on a torch dynamic-quantized model used to move only the float tensors (norms,
    embeddings) and leave the packed int8 Linear weights behind, breaking the model. Now refused, nothing moved."""
    import warnings

    from torch.ao.quantization import quantize_dynamic
    m = tiny_model("llama")
    g = hf_gauge.random_gauge(m, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize_dynamic(m, {torch.nn.Linear}, dtype=torch.qint8)
    before = _snapshot(q)
    with pytest.raises(GaugeError, match=r"quantized \(torch\.ao\.nn\.quantized\.dynamic.*dequantize.*float checkpoint"):
        hf_gauge.apply_gauge(q, g)
    assert all(torch.equal(before[k], v) for k, v in _snapshot(q).items())


def test_quantization_config_refused():
    m = tiny_model("llama")
    m.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(GaugeError, match=r"quantized \(gptq"):
        hf_gauge.apply_gauge(m, hf_gauge.random_gauge(tiny_model("llama"), seed=1))


def test_quantization_library_modules_and_packed_weights_refused():
    """bitsandbytes / GPTQ / AWQ are not installed here: modules named like theirs, and a packed int32 qweight."""
    class Linear4bit(torch.nn.Linear):          # bitsandbytes.nn.Linear4bit's class name
        pass

    class Packed(torch.nn.Module):              # GPTQ/AWQ-style: int32 packed weights, no float weight
        def __init__(self):
            super().__init__()
            self.register_buffer("qweight", torch.zeros(8, 64, dtype=torch.int32))

    for make, what in ((lambda m: Linear4bit(64, 64), "Linear4bit"), (lambda m: Packed(), "qweight")):
        m = tiny_model("llama")
        m.model.layers[0].mlp.down_proj = make(m)
        with pytest.raises(GaugeError, match=what):
            hf_gauge.apply_gauge(m, hf_gauge.random_gauge(tiny_model("llama"), seed=1))
    assert hf_gauge.models.quantization(tiny_model("llama")) is None


def test_quantized_checkpoint_refused(tmp_path):
    m = tiny_model("llama")
    m.config.quantization_config = {"quant_method": "awq"}
    m.save_pretrained(tmp_path / "q")
    with pytest.raises(GaugeError, match="quantized checkpoint \\(awq"):
        hf_gauge.apply_gauge_to_checkpoint(tmp_path / "q", hf_gauge.random_gauge(tiny_model("llama")), tmp_path / "o",
                                           progress=False)
    assert not (tmp_path / "o").exists()
