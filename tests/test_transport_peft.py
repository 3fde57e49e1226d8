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


pytestmark = pytest.mark.usefixtures("one_thread")


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

    moved = g.transport(pa)                          # a PeftModel in, a PeftModel out: gauge(A + adapter)
    assert isinstance(moved, PeftModel) and moved is not pa
    assert (logits(moved, ids) - ref).abs().max().item() < 1e-5
    sd_b = get_peft_model_state_dict(moved)
    assert set(sd_b) == set(before)
    err = (logits(_on_base(b, kw, sd_b), ids) - ref).abs().max().item()
    assert err < 1e-5, err

    # the input adapter is untouched
    for k, v in get_peft_model_state_dict(pa).items():
        assert torch.equal(v, before[k]), k
    # baselines that must fail: permutation-only transport, and the untransported adapter on the gauged base
    scale = ref.abs().mean().item()
    bad_perm = (logits(_on_base(b, kw, get_peft_model_state_dict(permutation_only(g).transport(pa))), ids)
                - ref).abs().max().item()
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
    with pytest.raises(GaugeError, match="base"):      # a random gauge records no distinct target model
        hf_gauge.transport_path(g, src, tmp_path / "adapter_b", config=a.config)
    out = hf_gauge.transport_path(g, src, tmp_path / "adapter_b", config=a.config, base="org/gauged-base")
    src_cfg, out_cfg = (json.loads((d / "adapter_config.json").read_text()) for d in (src, out))
    assert out_cfg.pop("base_model_name_or_path") == "org/gauged-base"
    src_cfg.pop("base_model_name_or_path")
    assert {k: v for k, v in out_cfg.items() if k in src_cfg} == {k: v for k, v in src_cfg.items() if k != "revision"
                                                                  } | {"revision": None}
    rec = json.loads((out / "hf_gauge_transport.json").read_text())
    assert rec["kind"] == "peft_adapter" and rec["spaces"]["residual"] == 64 and rec["base_model"] == "org/gauged-base"
    pb = PeftModel.from_pretrained(copy.deepcopy(b), out).eval()
    assert (logits(pb, ids) - ref).abs().max().item() < 1e-5
    # the same through gauge.transport(path, out=...)
    out2 = g.transport(src, out=tmp_path / "adapter_b2", config=a.config, base="org/gauged-base")
    assert (logits(PeftModel.from_pretrained(copy.deepcopy(b), out2).eval(), ids) - ref).abs().max().item() < 1e-5
    with pytest.raises(GaugeError, match="overwrite"):
        hf_gauge.transport_path(g, src, src, config=a.config, base="x")
    with pytest.raises(GaugeError, match="not empty"):
        hf_gauge.transport_path(g, src, out, config=a.config, base="x")
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


def test_adapter_config_keeps_the_source_list_order(setup, tmp_path):
    """PEFT holds ``target_modules`` as a set: the rewritten ``adapter_config.json`` keeps the source file's order
    (a fixed, non-alphabetical one here: a set happens to iterate in it with probability 1/8!), whatever the hash
    seed, so a user's diff shows only the base."""
    a, _, g = setup
    src = tmp_path / "adapter"
    _adapter(copy.deepcopy(a), CASES["lora+embedding+modules_to_save"]).save_pretrained(src)
    cfg = json.loads((src / "adapter_config.json").read_text())
    order = ["v_proj", "embed_tokens", "q_proj", "down_proj", "o_proj", "up_proj", "k_proj", "gate_proj"]
    assert sorted(cfg["target_modules"]) == sorted(order)
    (src / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": order}, indent=2))
    out = hf_gauge.transport_path(g, src, tmp_path / "adapter_b", config=a.config, base="org/gauged-base")
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == order


@pytest.fixture()
def saved_pair(setup, tmp_path):
    """A and the gauged B saved as local folders, reloaded from them, and the gauge fitted between the reloads
    (so its target records B's folder as model id)."""
    from transformers import AutoModelForCausalLM
    a, b, _ = setup
    a.save_pretrained(tmp_path / "A")
    b.save_pretrained(tmp_path / "B")
    la, lb = (AutoModelForCausalLM.from_pretrained(tmp_path / n, dtype=torch.float32).eval() for n in "AB")
    g = la.gauge_to(lb, spaces="all")
    assert g.target["model_id"] == str(tmp_path / "B")
    return la, lb, g


def test_adapter_folder_loads_on_gauged_base_with_auto_peft(saved_pair, ids, tmp_path):
    """AutoPeftModelForCausalLM.from_pretrained(OUT) loads the gauged base named in the folder (a local folder: no
    Hub) and reproduces the original adapter's logits; the README card names the same base."""
    from huggingface_hub import ModelCard
    from peft import AutoPeftModelForCausalLM
    la, lb, g = saved_pair
    kw = CASES["lora+embedding+modules_to_save"]
    pa = _adapter(copy.deepcopy(la), kw)
    ref = logits(pa, ids)
    pa.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(tmp_path / "A")
    out = hf_gauge.transport_path(g, tmp_path / "adapter", tmp_path / "adapter_b")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tmp_path / "B")
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == str(tmp_path / "B") and card.data.library_name == "peft"
    loaded = AutoPeftModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (logits(loaded, ids) - ref).abs().max().item() < 1e-5
    # the untransported folder loads the ungauged base: the mistake this prevents is large
    assert (logits(_on_base(lb, kw, get_peft_model_state_dict(pa)), ids) - ref).abs().max().item() > 0.1

    # second transport through the same gauge, and the wrong direction, are refused from the recorded provenance
    with pytest.raises(GaugeError, match="already transported through this gauge"):
        hf_gauge.transport_path(g, out, tmp_path / "twice")
    other = random_gauge(la, seed=3)          # another gauge from A's chart: OUT is not in A's chart any more
    with pytest.raises(GaugeError, match="chart"):
        hf_gauge.transport_path(other, out, tmp_path / "wrong", base="x")
    # going back with the inverse gauge restores the original base and the original adapter, bit for bit
    back = hf_gauge.transport_path(g.inverse(), out, tmp_path / "adapter_a")
    assert json.loads((back / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tmp_path / "A")
    from safetensors.torch import load_file
    orig, again = (load_file(d / "adapter_model.safetensors") for d in (tmp_path / "adapter", back))
    assert orig.keys() == again.keys() and all(torch.equal(orig[k], again[k]) for k in orig)
    assert not (tmp_path / "twice").exists() and not (tmp_path / "wrong").exists()


def test_adapter_of_the_target_is_refused_as_wrong_direction(saved_pair, tmp_path):
    la, lb, g = saved_pair
    pb = get_peft_model(copy.deepcopy(lb), _cfg(dict(target_modules=["q_proj"])))
    pb.save_pretrained(tmp_path / "adapter_of_b")
    with pytest.raises(GaugeError, match="wrong direction"):
        hf_gauge.transport_path(g, tmp_path / "adapter_of_b", tmp_path / "out")
    out = hf_gauge.transport_path(g.inverse(), tmp_path / "adapter_of_b", tmp_path / "out")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tmp_path / "A")


def test_peft_model_transport_to_gauged_base(saved_pair, ids):
    """``peft_model.transport(peft_model, to=gauged_base)`` fits the gauge from the adapter's base and returns the
    PeftModel moved into the target chart (as ``g.transport(peft_model)`` does); its adapter state dict loads on the
    gauged base."""
    la, lb, g = saved_pair
    kw = CASES["dora+embedding"]
    pa = _adapter(copy.deepcopy(la), kw)
    ref = logits(pa, ids)
    sd = get_peft_model_state_dict(pa.transport(pa, to=lb, spaces="all"))
    want = get_peft_model_state_dict(g.transport(pa))
    assert sd.keys() == want.keys() and all(torch.equal(sd[k], want[k]) for k in sd)
    assert (logits(_on_base(lb, kw, sd), ids) - ref).abs().max().item() < 1e-5


def test_lora_on_fused_moe_experts_folder_and_ambiguity(tmp_path):
    """PEFT's ``ParamWrapper`` LoRA on fused experts (``experts.lora_A``, ``experts.base_layer.lora_A``; which
    parameter each wraps is told by shape): an adapter folder transported through a gauge that permutes experts and
    their units reproduces the logits on the gauged base; a factor fitting no stacked parameter is refused."""
    from test_architectures import build
    a = build("qwen3_moe")
    g = random_gauge(a, seed=3, spaces="all")
    b = apply_gauge(copy.deepcopy(a), g)
    torch.manual_seed(0)
    pa = get_peft_model(copy.deepcopy(a), LoraConfig(r=2, target_modules=["q_proj"],
                                                     target_parameters=["mlp.experts.gate_up_proj",
                                                                        "mlp.experts.down_proj"],
                                                     init_lora_weights=False)).eval()
    keys = [k for k in get_peft_model_state_dict(pa) if ".experts." in k]
    assert any(".base_layer.lora_A" in k for k in keys) and any(".experts.lora_B" in k for k in keys)
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(1))
    ref = logits(pa, ids)
    pa.save_pretrained(tmp_path / "adapter")
    out = hf_gauge.transport_path(g, tmp_path / "adapter", tmp_path / "adapter_b", config=a.config, base="org/b")
    pb = PeftModel.from_pretrained(copy.deepcopy(b), out).eval()
    assert (logits(pb, ids) - ref).abs().max().item() < 1e-5
    untransported = PeftModel.from_pretrained(copy.deepcopy(b), tmp_path / "adapter").eval()
    assert (logits(untransported, ids) - ref).abs().max().item() > 1e-3
    sd = get_peft_model_state_dict(pa)
    bad = {k: (v[:, :-1] if k.endswith("experts.lora_A.weight") else v) for k, v in sd.items()}
    with pytest.raises(GaugeError, match="fits no stacked parameter"):
        g.transport(bad, config=a.config)


@pytest.mark.parametrize("model_type, over", [("gpt2", {}), ("opt", {"word_embed_proj_dim": 16})])
def test_dora_on_conv1d_and_on_a_projected_embedding_input(model_type, over, ids):
    """DoRA on GPT-2's Conv1D (PEFT's ``fan_in_fan_out``: the magnitude ``[out]`` follows the weight's axis 1) and on
    OPT's ``project_in`` (the embedding site of that layout, yet a Linear: its magnitude follows the residual rows),
    transported, reproduces the adapted logits on the gauged base."""
    from test_architectures import assert_lora_transported, build
    a = build(model_type, **over)
    g = random_gauge(a, seed=3, spaces="all")
    assert_lora_transported(a, apply_gauge(copy.deepcopy(a), g), g, ids, use_dora=True)


# --------------------------------------------------------------------------- issue 27: PEFT as its users expect
def test_peft_model_with_two_adapters_moves_every_adapter(setup, ids):
    """Two adapters: every one comes back moved (keyed by adapter name), or only ``adapter_name=``'s; each computes
    on the result what it computed on A."""
    a, b, g = setup
    pa = _adapter(copy.deepcopy(a), CASES["dora+embedding"])
    pa.add_adapter("other", _cfg(dict(target_modules=["q_proj", "down_proj"])))
    with torch.no_grad():
        for n, p in pa.named_parameters():
            if ".other." in n:
                p.add_(0.3 * torch.randn_like(p))
    refs = {}
    for name in ("default", "other"):
        pa.set_adapter(name)
        refs[name] = logits(pa, ids)
    moved = g.transport(pa)
    assert isinstance(moved, PeftModel) and set(moved.peft_config) == {"default", "other"}
    for name in ("default", "other"):
        moved.set_adapter(name)
        assert (logits(moved, ids) - refs[name]).abs().max().item() < 1e-5, name
        sd = get_peft_model_state_dict(moved, adapter_name=name)
        want = g.transport(get_peft_model_state_dict(pa, adapter_name=name), model=pa)
        assert sd.keys() == want.keys() and all(torch.equal(sd[k], want[k]) for k in sd), name
    only = g.transport(pa, adapter_name="other")
    assert set(only.peft_config) == {"other"} and (logits(only, ids) - refs["other"]).abs().max().item() < 1e-5
    with pytest.raises(GaugeError, match="no adapter 'nope'"):
        g.transport(pa, adapter_name="nope")


def test_load_adapter_onto_b_from_a_folder_and_the_hub(setup, ids, tmp_path, monkeypatch):
    """``hf_gauge.load_adapter(model_b, adapter, gauge=g)``: a real PEFT LoRA trained on A, saved, loaded onto B
    through the gauge: B + the moved adapter computes what gauge(A + adapter) computes; the same from a Hub id."""
    from hub_server import HubServer
    a, b, g = setup
    kw = dict(target_modules=PROJ)
    pa = _adapter(copy.deepcopy(a), kw)
    pa.save_pretrained(tmp_path / "adapter")
    want = logits(g.transport(pa), ids)
    pb = hf_gauge.load_adapter(copy.deepcopy(b), tmp_path / "adapter", gauge=g, strict=True)
    assert isinstance(pb, PeftModel) and not pb.training
    assert (logits(pb, ids) - want).abs().max().item() < 1e-5
    raw = get_peft_model(copy.deepcopy(b), _cfg(kw))                     # the adapter loaded without the gauge
    set_peft_model_state_dict(raw, get_peft_model_state_dict(pa))
    assert (logits(raw.eval(), ids) - want).abs().max().item() > 1e-2
    with pytest.raises(GaugeError, match="fingerprint"):
        hf_gauge.load_adapter(copy.deepcopy(a), tmp_path / "adapter", gauge=g, strict=True)
    with HubServer() as hub:
        from huggingface_hub import HfApi
        HfApi(endpoint=hub.url).create_repo("org/adapter-for-a")
        hub.commit("org/adapter-for-a", {f"sub/{p.name}": p.read_bytes() for p in (tmp_path / "adapter").iterdir()})
        pb2 = hf_gauge.load_adapter(copy.deepcopy(b), "org/adapter-for-a/sub", gauge=g, endpoint=hub.url,
                                    cache_dir=tmp_path / "cache")
    assert (logits(pb2, ids) - want).abs().max().item() < 1e-5
