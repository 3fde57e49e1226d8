"""DeepSeek-V2 / V3 beyond the battery (tests/test_architectures.py runs both tiny configs): the plain ``q_proj``
layout (``q_lora_rank=None``, DeepSeek-V2-Lite), the router's ``e_score_correction_bias`` (a buffer that moves with
its expert), and the multi-token-prediction layer that V3's released files store after the model's layers."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_gauge
from hf_gauge import Gauge, GaugeError, SignedPermutation, apply_gauge, random_gauge
from hf_gauge.engine import move_tensors_, moves_for
from hf_gauge.fileverify import verify_files
from hf_gauge.specs import Rule, get_spec

from test_architectures import (FULL, VOCAB, _same_gauge, assert_bit_equal, assert_files_agree, assert_gauged_copy,
                                build, close, logits, state)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB - 1, (2, 9), generator=torch.Generator().manual_seed(7))


def _biased(model, seed: int = 5):
    """Random score-correction biases (zeros at init would hide their rule)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.copy_(torch.randn(gate.e_score_correction_bias.shape, generator=gen))
    return model


# --------------------------------------------------------------------------------------------- q_proj layout
def test_plain_q_proj_layout(ids, tmp_path):
    """``q_lora_rank=None``: no q latent space; q_proj rows are the heads' [q_nope | q_rot] blocks. Function kept,
    inverse bit-exact, recovered data-free, from activations and from files (whose config.json says
    ``"q_lora_rank": null``), and streamed like the live apply."""
    a = build("deepseek_v2", q_lora_rank=None)
    spaces = hf_gauge.gauge_spaces(a)
    assert "qlat.0" not in spaces and {"kvlat.0", "attn.1", "mlp.0", "moe.1", "shared.1"} <= set(spaces)
    assert "mlp.1" not in spaces and "moe.0" not in spaces          # first_k_dense_replace = 1
    g = random_gauge(a, seed=11, spaces=FULL)
    assert_files_agree(a, assert_gauged_copy(a, g, ids), g, tmp_path)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["q_lora_rank"] is None


def test_a_q_latent_gauge_is_refused_without_a_q_latent():
    a = build("deepseek_v2", q_lora_rank=None)
    with pytest.raises(GaugeError, match="qlat.0"):
        apply_gauge(a, Gauge(spaces={"qlat.0": SignedPermutation.identity(8)}))


# --------------------------------------------------------------------------------------------- router bias
def test_score_correction_bias_moves_with_its_expert(ids, tmp_path):
    """V3's ``e_score_correction_bias`` (a buffer, saved with the weights) picks the experts: under a permutation of
    the experts it must move with them, in the live model and in files alike; left in place, the logits change."""
    a = _biased(build("deepseek_v3"))
    ref = logits(a, ids)
    g = Gauge(spaces={"moe.1": SignedPermutation([2, 3, 1, 0])})     # routing groups {0, 1}, {2, 3} as wholes
    moved = apply_gauge(copy.deepcopy(a), g)
    assert close(logits(moved, ids), ref)
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert torch.equal(state(moved)[bias], state(a)[bias][g["moe.1"].perm])        # slot k takes expert perm[k]
    # the same tensor from files
    a.save_pretrained(tmp_path / "a")
    hf_gauge.apply_gauge_to_checkpoint(tmp_path / "a", g, tmp_path / "out", progress=False)
    assert_bit_equal(state(type(a).from_pretrained(tmp_path / "out", dtype=torch.float32)), state(moved))
    # without its rule the bias stays and the routing differs
    spec = get_spec(a)
    kept = dataclasses.replace(spec, rules=tuple(Rule(r.pattern, ()) if r.pattern.endswith("e_score_correction_bias")
                                                 else r for r in spec.rules))
    bad = copy.deepcopy(a)
    tensors = {**dict(bad.named_parameters()), **dict(bad.named_buffers())}
    plan = moves_for(kept, bad.config, g, [n for n in tensors if kept.match(n) is not None])
    move_tensors_((tensors[n].data, m) for n, m in plan.items())
    assert torch.equal(state(bad)[bias], state(a)[bias])
    assert not close(logits(bad, ids), ref, 1e-3)


# --------------------------------------------------------------------------------------------- multi-token prediction
MTP_MODULES = ("embed_tokens.weight", "enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
               "shared_head.head.weight")


def _with_mtp_layers(folder, n_extra: int = 1, seed: int = 3) -> dict[str, torch.Tensor]:
    """Write DeepSeek-V3's multi-token-prediction layers into a saved tiny checkpoint, as the released files store
    them (README_WEIGHTS.md): ``model.layers.{N+k}`` holds a full MoE decoder layer (per-expert tensors) plus
    ``embed_tokens``, ``enorm``, ``hnorm``, ``eh_proj [d, 2d]`` and ``shared_head.{norm, head}``."""
    path = folder / "model.safetensors"
    t = load_file(str(path))
    cfg = json.loads((folder / "config.json").read_text())
    n, d, vocab = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]
    gen = torch.Generator().manual_seed(seed)
    last = f"model.layers.{n - 1}."
    for k in range(n_extra):
        new = f"model.layers.{n + k}."
        for name, v in list(t.items()):
            if name.startswith(last):
                t[new + name[len(last):]] = v + 0.1 * torch.randn(v.shape, generator=gen)
        t[new + "embed_tokens.weight"] = t["model.embed_tokens.weight"].clone()
        t[new + "shared_head.head.weight"] = t["lm_head.weight"].clone()
        for m in ("enorm", "hnorm", "shared_head.norm"):
            t[new + m + ".weight"] = 1 + 0.3 * torch.randn(d, generator=gen)
        t[new + "eh_proj.weight"] = 0.2 * torch.randn(d, 2 * d, generator=gen)
    save_file(t, str(path), metadata={"format": "pt"})
    assert vocab == t["lm_head.weight"].shape[0]
    return t


def _rms(w: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _mtp_logits(config, t: dict[str, torch.Tensor], layer: int, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The MTP module's logits: ``head(norm(block(eh_proj([enorm(embed(ids)) | hnorm(h)]))))``, the block a
    transformers ``DeepseekV3DecoderLayer`` (MoE) loaded with the layer's tensors from the files."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RotaryEmbedding
    p = f"model.layers.{layer}."
    block = DeepseekV3DecoderLayer(config, layer_idx=config.num_hidden_layers - 1).eval()
    sd = {k[len(p):]: v for k, v in t.items()
          if k.startswith(p) and ".experts." not in k and k[len(p):] not in MTP_MODULES}
    ex = lambda e, w: t[f"{p}mlp.experts.{e}.{w}.weight"]          # noqa: E731
    experts = range(config.n_routed_experts)
    sd["mlp.experts.gate_up_proj"] = torch.stack([torch.cat([ex(e, "gate_proj"), ex(e, "up_proj")]) for e in experts])
    sd["mlp.experts.down_proj"] = torch.stack([ex(e, "down_proj") for e in experts])
    block.load_state_dict(sd, strict=True)
    eps = config.rms_norm_eps
    emb = torch.nn.functional.embedding(ids, t[p + "embed_tokens.weight"])
    x = torch.cat([_rms(t[p + "enorm.weight"], emb, eps), _rms(t[p + "hnorm.weight"], h, eps)], -1)
    x = torch.nn.functional.linear(x, t[p + "eh_proj.weight"])
    pos = DeepseekV3RotaryEmbedding(config)(x, torch.arange(ids.shape[1])[None])
    with torch.no_grad():
        x = block(x, position_embeddings=pos, attention_mask=None)
    return torch.nn.functional.linear(_rms(t[p + "shared_head.norm.weight"], x, eps), t[p + "shared_head.head.weight"])


def test_multi_token_prediction_layer_moves_with_the_residual(ids, tmp_path):
    """Streaming apply moves the MTP layer stored after the model's layers (its inner spaces are no spaces of the
    model: it moves with the residual only): the MTP logits are kept, the model loads as the live apply, and find /
    verify from files recover the gauge with the layer present."""
    a = _biased(build("deepseek_v3"))
    g = random_gauge(a, seed=4, spaces=FULL)
    a.save_pretrained(tmp_path / "a")
    src = _with_mtp_layers(tmp_path / "a")
    hf_gauge.apply_gauge_to_checkpoint(tmp_path / "a", g, tmp_path / "b", progress=False)
    out = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert out.keys() == src.keys()
    assert not torch.equal(out["model.layers.2.eh_proj.weight"], src["model.layers.2.eh_proj.weight"])
    live = apply_gauge(copy.deepcopy(a), g)
    b = type(a).from_pretrained(tmp_path / "b", dtype=torch.float32, attn_implementation="eager").eval()
    assert_bit_equal(state(b), state(live))
    with torch.no_grad():
        h_a, h_b = a.model(ids).last_hidden_state, b.model(ids).last_hidden_state
    ref = _mtp_logits(a.config, src, 2, h_a, ids)
    assert close(_mtp_logits(a.config, out, 2, h_b, ids), ref)
    # the rules are needed: the MTP layer left in the source chart gives other logits
    kept = {**out, **{k: v for k, v in src.items() if k.startswith("model.layers.2.")}}
    assert not close(_mtp_logits(a.config, kept, 2, h_b, ids), ref, 1e-3)
    _same_gauge(hf_gauge.find_gauge(tmp_path / "a", tmp_path / "b", spaces="all"), g)
    rep = verify_files(tmp_path / "a", tmp_path / "b", g)
    assert rep["ok"] and rep["weights_bit_exact"]


def test_more_layers_on_disk_than_the_config_allows_are_refused(tmp_path):
    a = build("deepseek_v3")
    a.save_pretrained(tmp_path / "a")
    _with_mtp_layers(tmp_path / "a", n_extra=2)                 # num_nextn_predict_layers = 1
    g = random_gauge(a, seed=1)
    with pytest.raises(GaugeError, match=r"stores layers \[2, 3\] after the model's 2.*at most 1"):
        hf_gauge.apply_gauge_to_checkpoint(tmp_path / "a", g, tmp_path / "b", progress=False)
    a.save_pretrained(tmp_path / "w")                          # an MTP tensor of the wrong width
    t = _with_mtp_layers(tmp_path / "w")
    t["model.layers.2.eh_proj.weight"] = t["model.layers.2.eh_proj.weight"][:, :40].contiguous()
    save_file(t, str(tmp_path / "w" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(GaugeError, match="width mismatch.*model.layers.2.eh_proj.weight"):
        hf_gauge.apply_gauge_to_checkpoint(tmp_path / "w", g, tmp_path / "wout", progress=False)
    b = build("deepseek_v2")                                    # V2 files hold no MTP layer
    b.save_pretrained(tmp_path / "v2")
    _with_mtp_layers(tmp_path / "v2")
    with pytest.raises(GaugeError, match="re-download"):
        hf_gauge.apply_gauge_to_checkpoint(tmp_path / "v2", random_gauge(b, seed=1), tmp_path / "v2out",
                                           progress=False)


# --------------------------------------------------------------------------------------------- group-limited routing
GROUPED = {"deepseek_v3": {"n_group": 2, "topk_group": 1},
           "deepseek_v2": {"topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1}}


@pytest.mark.parametrize("model_type", sorted(GROUPED))
def test_group_limited_routing_moves_experts_within_groups_and_groups_as_wholes(model_type, ids):
    """The router first keeps ``topk_group`` of ``n_group`` consecutive expert groups: a permutation of experts is
    exact when it permutes within groups and moves groups as wholes (drawn, applied, recovered so); one that mixes
    groups is refused, and applied by hand changes the logits."""
    model = _biased(build(model_type, **GROUPED[model_type]))
    ref = logits(model, ids)
    g = random_gauge(model, seed=3, spaces=FULL)
    moe = g["moe.1"].perm
    assert set(moe[:2].tolist()) in ({0, 1}, {2, 3})                 # groups of 2 experts move as wholes
    b = apply_gauge(copy.deepcopy(model), g)
    assert close(logits(b, ids), ref)
    _same_gauge(hf_gauge.find_full_gauge(model, b), g)
    swap = Gauge(spaces={"moe.1": SignedPermutation([0, 2, 1, 3])})        # experts 1 and 2 change groups
    with pytest.raises(GaugeError, match="routing groups"):
        apply_gauge(copy.deepcopy(model), swap)
    bad = copy.deepcopy(model)
    tensors = {**dict(bad.named_parameters()), **dict(bad.named_buffers())}
    spec = get_spec(model)
    plan = moves_for(spec, bad.config, swap, [n for n in tensors if spec.match(n) is not None])
    move_tensors_((tensors[n].data, m) for n, m in plan.items())
    assert not close(logits(bad, ids), ref, 1e-3)


def test_a_router_transformers_does_not_implement_is_refused():
    model = build("deepseek_v2", topk_method="noaux_tc")
    with pytest.raises(GaugeError, match="topk_method='noaux_tc'.*'greedy' or 'group_limited_greedy'"):
        random_gauge(model)


@pytest.mark.parametrize("dense", [0, 2], ids=["every_layer_routes", "every_layer_dense"])
def test_dense_first_layers_at_the_extremes_from_files(dense, tmp_path):
    """``first_k_dense_replace`` = 0 (no dense layer) or = num_hidden_layers (no MoE layer: no tensor carries the
    experts' ``{e}``, which the file checks then do not ask for) through find, verify and streaming apply."""
    a = build("deepseek_v3", first_k_dense_replace=dense)
    spaces = hf_gauge.gauge_spaces(a)
    assert ("mlp.1" in spaces) == (dense == 2) and ("moe.0" in spaces) == (dense == 0)
    g = random_gauge(a, seed=2, spaces=FULL)
    b = apply_gauge(copy.deepcopy(a), g)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    _same_gauge(hf_gauge.find_gauge(tmp_path / "a", tmp_path / "b", spaces="all"), g)
    assert verify_files(tmp_path / "a", tmp_path / "b", g)["ok"]
    hf_gauge.apply_gauge_to_checkpoint(tmp_path / "a", g, tmp_path / "out", progress=False)
    assert_bit_equal(state(type(a).from_pretrained(tmp_path / "out", dtype=torch.float32)), state(b))
