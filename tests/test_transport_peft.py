"""PEFT adapters: the transported adapter on the gauged base reproduces the original adapter's logits exactly;
the permutation-only transport (same perms, all signs +1) and the untransported adapter do not."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import logits, tiny_model, permutation_only

import hf_gauge
from hf_gauge import GaugeError, apply_gauge, random_gauge

from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "lora+embedding+modules_to_save": dict(target_modules=PROJ + ["embed_tokens"], modules_to_save=["lm_head", "norm"]),
    "dora+embedding": dict(target_modules=PROJ + ["embed_tokens"], use_dora=True),
    "lora_bias+trainable_tokens": dict(target_modules=PROJ, lora_bias=True,
                                       trainable_token_indices={"embed_tokens": [1, 5, 9]}),
    # base-layer biases (q/k/v/o/gate/up/down: the tiny Llama has attention_bias and mlp_bias) saved in the adapter
    "lora+bias_all": dict(target_modules=PROJ, bias="all"),
    # a full trainable copy of the token embedding saved in the adapter
    "lora+modules_to_save_embed": dict(target_modules=PROJ, modules_to_save=["embed_tokens"]),
}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread beats two contended ones on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(kw) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw)


def _adapter(base, kw, seed=0):
    torch.manual_seed(seed)
    pm = get_peft_model(base, _cfg(kw))
    with torch.no_grad():   # make every adapter tensor generic (DoRA magnitudes, token deltas, biases, copies)
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p) * (p.abs().mean() + 0.1))
    return pm.eval()


@pytest.fixture(scope="module")
def setup():
    a = tiny_model("llama", seed=3)
    g = random_gauge(a, seed=11, spaces=("residual", "mlp", "attn"))
    assert 0.2 < g.residual.positive_fraction < 0.8
    b = apply_gauge(copy.deepcopy(a), g)
    return a, b, g


def _on_base(base, kw, sd):
    pm = get_peft_model(copy.deepcopy(base), _cfg(kw))
    res = set_peft_model_state_dict(pm, sd)
    assert not res.unexpected_keys
    return pm.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_state_transport_reproduces_logits(setup, ids, case):
    a, b, g = setup
    kw = CASES[case]
    pa = _adapter(copy.deepcopy(a), kw)
    ref = logits(pa, ids)
    before = {k: v.clone() for k, v in get_peft_model_state_dict(pa).items()}

    sd_b = g.transport(pa)
    assert set(sd_b) == set(before)
    err = (logits(_on_base(b, kw, sd_b), ids) - ref).abs().max().item()
    assert err < 1e-5, err

    # the input adapter is untouched
    for k, v in get_peft_model_state_dict(pa).items():
        assert torch.equal(v, before[k]), k
    # baselines that must fail: permutation-only transport, and the untransported adapter on the gauged base
    scale = ref.abs().mean().item()
    bad_perm = (logits(_on_base(b, kw, permutation_only(g).transport(pa)), ids) - ref).abs().max().item()
    bad_raw = (logits(_on_base(b, kw, before), ids) - ref).abs().max().item()
    assert bad_perm > 0.05 * scale and bad_perm > 1e3 * max(err, 1e-7), (bad_perm, err)
    assert bad_raw > 0.05 * scale, bad_raw

    # a state dict in (model_type and head geometry given explicitly) gives the same tensors, bit for bit
    snapshot = {k: v.clone() for k, v in before.items()}
    sd_b2 = g.transport(before, model_type="llama", config=a.config)
    for k in sd_b:
        assert torch.equal(sd_b[k], sd_b2[k]), k
    # ... and the input state dict is never mutated; the outputs are new tensors
    assert set(before) == set(snapshot)
    for k, v in before.items():
        assert torch.equal(v, snapshot[k]), k
        assert sd_b2[k].data_ptr() != v.data_ptr(), k


def test_transport_peft_model_builds_new_model(setup, ids):
    a, b, g = setup
    kw = CASES["dora+embedding"]
    pa = _adapter(copy.deepcopy(a), kw)
    ref = logits(pa, ids)
    pb = hf_gauge.transport_peft_model(g, pa, copy.deepcopy(b), strict=True)
    assert isinstance(pb, PeftModel)
    assert (logits(pb.eval(), ids) - ref).abs().max().item() < 1e-5
    with pytest.raises(GaugeError, match="fingerprint"):
        hf_gauge.transport_peft_model(g, pa, copy.deepcopy(a), strict=True)   # the base is not in the target chart


def test_adapter_folder_roundtrip(setup, ids, tmp_path):
    a, b, g = setup
    kw = CASES["lora+embedding+modules_to_save"]
    pa = _adapter(copy.deepcopy(a), kw)
    ref = logits(pa, ids)
    src = tmp_path / "adapter"
    pa.save_pretrained(src)
    src_bytes = {p.relative_to(src): p.read_bytes() for p in sorted(src.rglob("*")) if p.is_file()}
    assert (src / "adapter_model.safetensors").relative_to(src) in src_bytes
    out = hf_gauge.transport_path(g, src, tmp_path / "adapter_b", config=a.config)
    assert (out / "adapter_config.json").read_text() == (src / "adapter_config.json").read_text()
    rec = json.loads((out / "hf_gauge_transport.json").read_text())
    assert rec["kind"] == "peft_adapter" and rec["spaces"]["residual"] == 64
    pb = PeftModel.from_pretrained(copy.deepcopy(b), out).eval()
    assert (logits(pb, ids) - ref).abs().max().item() < 1e-5
    # the same through gauge.transport(path, out=...)
    out2 = g.transport(src, out=tmp_path / "adapter_b2", config=a.config)
    assert (logits(PeftModel.from_pretrained(copy.deepcopy(b), out2).eval(), ids) - ref).abs().max().item() < 1e-5
    with pytest.raises(GaugeError, match="overwrite"):
        hf_gauge.transport_path(g, src, src, config=a.config)
    with pytest.raises(GaugeError, match="not empty"):
        hf_gauge.transport_path(g, src, out, config=a.config)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    # the source folder is never mutated: same files, same bytes
    assert {p.relative_to(src): p.read_bytes() for p in sorted(src.rglob("*")) if p.is_file()} == src_bytes


def test_adapter_for_other_architecture_is_refused(setup):
    a, b, g = setup
    neox = tiny_model("gpt_neox", seed=1)
    pn = get_peft_model(neox, LoraConfig(r=2, target_modules=["query_key_value"], init_lora_weights=False))
    sd = get_peft_model_state_dict(pn)
    with pytest.raises(GaugeError, match=r"gpt_neox\.layers\.0\.attention\.query_key_value"):
        g.transport(sd, model_type="llama", config=a.config)
    # a Llama adapter of another width: the error names the offending key
    small = tiny_model("llama", hidden_size=32, heads=4, kv_heads=2, intermediate=48)
    ps = get_peft_model(small, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    with pytest.raises(GaugeError, match=r"q_proj\.lora_A\.weight.*width mismatch"):
        g.restrict("residual").transport(get_peft_model_state_dict(ps), model_type="llama")
    # same key names, same width, another architecture: a Qwen2 PeftModel through a Llama-fitted gauge
    qwen = tiny_model("qwen2", seed=1)
    pq = get_peft_model(qwen, LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    with pytest.raises(GaugeError, match=r"(?s)(qwen2.*llama|llama.*qwen2)"):
        g.transport(pq)
    with pytest.raises(GaugeError, match=r"(?s)(qwen2.*llama|llama.*qwen2)"):
        hf_gauge.transport_peft_model(g, pq, tiny_model("qwen2", seed=1))
    # no architecture known at all
    g_anon = hf_gauge.Gauge(residual=g.residual)
    with pytest.raises(GaugeError, match="model_type"):
        g_anon.transport(sd)
