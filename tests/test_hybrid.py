"""Hybrid decoders (issue 25): Qwen3-Next (Gated DeltaNet + gated attention + MoE) and granitemoehybrid (Mamba-2 +
attention + MoE). Spaces follow each config's layer types (``layers_where``); the grouped head kinds
(``linear_heads``, ``ssm_heads``) refuse a permutation that mixes groups, and that permutation does break the model;
config variants the tiny configs do not cover go through the battery's checks (function, inverse, recovery from
weights and activations, streaming apply, find and verify from files)."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import hf_gauge
from hf_gauge import Gauge, GaugeError, SignedPermutation, apply_gauge, random_gauge
from hf_gauge.fileverify import verify_files
from hf_gauge.kinds import get_kind
from hf_gauge.specs import Axis, Rule, get_spec
from hf_gauge.view import ConfigView

from test_architectures import (FULL, VOCAB, _apply_by_hand, _same_gauge, _with_axes, assert_bit_equal,
                                assert_files_agree, assert_gauged_copy, build, close, logits)

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = {
    "qwen3_next_sparse_step_2": ("qwen3_next", {"decoder_sparse_step": 2, "mlp_only_layers": []}),
    "qwen3_next_attention_first": ("qwen3_next", {"layer_types": ["full_attention", "linear_attention",
                                                                  "linear_attention"], "mlp_only_layers": [0]}),
    "qwen3_next_one_key_head": ("qwen3_next", {"linear_num_key_heads": 1}),
    "qwen3_next_no_value_groups": ("qwen3_next", {"linear_num_key_heads": 2, "linear_num_value_heads": 2}),
    "granitemoehybrid_dense_rope": ("granitemoehybrid", {"num_local_experts": 0, "position_embedding_type": "rope",
                                                         "mamba_proj_bias": False, "mamba_conv_bias": False}),
    "granitemoehybrid_one_group": ("granitemoehybrid", {"num_hidden_layers": 3, "mamba_n_groups": 1,
                                                        "layer_types": ["mamba", "mamba", "attention"]}),
}


def _shared_rows_stay(model):
    """The model's spec with every ``kv`` part of a fused axis (the rows a group shares: DeltaNet q/k, Mamba-2 B/C)
    replaced by a part that never moves and spans the same rows."""
    spec, cfg = get_spec(model), ConfigView(model.config)
    extra: dict[str, int] = {}

    def stay(p: Axis) -> Axis:
        if not p.kv:
            return p
        sp = spec.spaces[p.space]                       # rules name the template
        n = get_kind(sp.kind).reduced_size(int(sp.size(cfg)), cfg)
        extra[p.block + "_all"] = n * spec.dims(cfg)[p.block]
        return Axis(p.axis, "", block=p.block + "_all")

    rules = tuple(Rule(r.pattern, tuple(dataclasses.replace(a, segments=tuple(stay(p) for p in a.segments))
                                        if a.segments else a for a in r.axes)) for r in spec.rules)
    return dataclasses.replace(spec, rules=rules, dims=lambda c: {**spec.dims(c), **extra})


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB - 1, (2, 9), generator=torch.Generator().manual_seed(7))


def test_spaces_follow_the_layer_types():
    qn = set(hf_gauge.gauge_spaces(build("qwen3_next")))
    assert {"lin.0", "lin.2", "attn.1", "moe.0", "moe.1", "shared.0", "shared.1", "mlp.2"} <= qn
    assert not {"lin.1", "attn.0", "attn.2", "moe.2", "shared.2", "mlp.0", "mlp.1"} & qn
    gr = hf_gauge.gauge_spaces(build("granitemoehybrid"))
    assert gr["ssm.0"] == 4 and gr["attn.1"] == 4 and "ssm.1" not in gr and "attn.0" not in gr
    dense = hf_gauge.gauge_spaces(build("granitemoehybrid", num_local_experts=0))
    assert not any(s.startswith(("moe.", "experts.")) for s in dense) and "shared.1" in dense
    with pytest.raises(GaugeError, match="lin.1"):
        apply_gauge(build("qwen3_next"), Gauge(spaces={"lin.1": SignedPermutation([1, 0, 2, 3])}))


@pytest.mark.parametrize("model_type,space,kv_field", [("qwen3_next", "lin.0", "q and k rows"),
                                                        ("granitemoehybrid", "ssm.0", "B and C rows")])
def test_grouped_heads_mixing_groups_refused_and_breaks(model_type, space, kv_field, ids):
    """Heads 0 and 1 share a group (a DeltaNet key head; a Mamba-2 group of B and C): swapping heads 1 and 2 mixes
    groups. Refused; moved by hand with the group's shared rows left in place, the logits change."""
    model = build(model_type)
    g = Gauge(spaces={space: SignedPermutation([0, 2, 1, 3])})
    with pytest.raises(GaugeError, match="mixes groups"):
        apply_gauge(copy.deepcopy(model), g)
    within = Gauge(spaces={space: SignedPermutation([1, 0, 3, 2])})        # within each group: admitted, exact
    ref = logits(model, ids)
    assert close(logits(apply_gauge(copy.deepcopy(model), within), ids), ref)
    _apply_by_hand(model, _shared_rows_stay(model), g)
    assert not close(logits(model, ids), ref, 1e-3), kv_field


@pytest.mark.parametrize("model_type,space", [("qwen3_next", "lin.0"), ("granitemoehybrid", "ssm.0")])
def test_head_signs_refused_and_break(model_type, space, ids):
    """No sign on a DeltaNet / Mamba-2 head: its rows pass through SiLU (conv1d), sigmoid or softplus."""
    model = build(model_type)
    g = Gauge(spaces={space: SignedPermutation(torch.arange(4), torch.tensor([-1, 1, 1, 1]))})
    with pytest.raises(GaugeError, match="permutations only"):
        apply_gauge(copy.deepcopy(model), g)
    ref = logits(model, ids)
    signed = _with_axes(get_spec(model), lambda a: a if a.kv else a.on(a.axis, signed=True))
    _apply_by_hand(model, signed, g)
    assert not close(logits(model, ids), ref, 1e-3)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_through_the_battery(variant, ids, tmp_path):
    model_type, over = VARIANTS[variant]
    a = build(model_type, **over)
    g = random_gauge(a, seed=11, spaces=FULL)
    assert_files_agree(a, assert_gauged_copy(a, g, ids), g, tmp_path)


def _add_mtp(folder, seed: int = 5) -> dict[str, torch.Tensor]:
    """Qwen3-Next's multi-token-prediction module, as released checkpoints store it beside the model: ``mtp.fc``,
    its norms, and one full-attention MoE layer shaped as the model's layer 1 (random values)."""
    from safetensors.torch import load_file, save_file
    path = folder / "model.safetensors"
    sd = load_file(str(path))
    gen = torch.Generator().manual_seed(seed)
    d = sd["model.norm.weight"].numel()
    mtp = {"mtp.fc.weight": torch.randn(d, 2 * d, generator=gen) * 0.2}
    mtp.update({f"mtp.{n}.weight": torch.randn(d, generator=gen) * 0.3
                for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm")})
    mtp.update({"mtp.layers.0." + k[len("model.layers.1."):]: torch.randn(v.shape, generator=gen) * 0.2
                for k, v in sd.items() if k.startswith("model.layers.1.")})
    save_file({**sd, **mtp}, str(path), metadata={"format": "pt"})
    return mtp


def test_mtp_module_moves_with_the_residual_in_files(tmp_path):
    """Streaming apply moves the MTP module by the residual gauge (its heads and experts stay): ``fc`` applied to the
    normalised ``[embedding | hidden]`` pair in the new chart gives the old output in the new chart; the layer's
    readers, writers and gains are the residual's index moves; find and verify from files work with it present."""
    from safetensors.torch import load_file
    a = build("qwen3_next")
    g = random_gauge(a, seed=11, spaces=FULL)
    b = apply_gauge(copy.deepcopy(a), g)
    a.save_pretrained(tmp_path / "a")
    src = _add_mtp(tmp_path / "a")
    hf_gauge.apply_gauge_to_checkpoint(tmp_path / "a", g, tmp_path / "b", progress=False)
    out = load_file(str(tmp_path / "b" / "model.safetensors"))
    b.save_pretrained(tmp_path / "live")
    assert_bit_equal({k: v for k, v in out.items() if not k.startswith("mtp.")},
                     load_file(str(tmp_path / "live" / "model.safetensors")))
    perm, sign = g.residual.perm, g.residual.sign.to(torch.float32)

    def norm(x, w):
        return x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * (1 + w)

    def mtp_in(sd, e, h):
        x = torch.cat([norm(e, sd["mtp.pre_fc_norm_embedding.weight"]), norm(h, sd["mtp.pre_fc_norm_hidden.weight"])], -1)
        return x @ sd["mtp.fc.weight"].T

    e, h = torch.randn(5, 32), torch.randn(5, 32)
    ya, yb = mtp_in(src, e, h), mtp_in(out, e[:, perm] * sign, h[:, perm] * sign)
    assert torch.allclose(yb, ya[:, perm] * sign, atol=1e-5)
    for k, v in src.items():
        if not k.startswith("mtp.layers."):
            continue
        if k.endswith(("q_norm.weight", "k_norm.weight", "q_proj.bias", "k_proj.bias", "v_proj.bias")):
            want = v                                          # head space
        elif k.endswith("layernorm.weight"):
            want = v[perm]                                    # gains
        elif k.endswith(("o_proj.weight", "down_proj.weight", "o_proj.bias")):
            want = v[perm] * sign.view(-1, *[1] * (v.dim() - 1))   # writers: rows (and bias)
        else:
            want = v[:, perm] * sign                          # readers: columns
        assert torch.equal(out[k], want), k
    b_dir = tmp_path / "b"
    assert verify_files(tmp_path / "a", b_dir, g)["weights_bit_exact"]
    _same_gauge(hf_gauge.find_gauge(tmp_path / "a", b_dir, spaces="all"), g)


def test_width_mismatch_names_the_group_field(tmp_path):
    """A config whose Mamba-2 group count does not match the files is refused naming that field (not the KV heads)."""
    import json
    a = build("granitemoehybrid")
    a.save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg["mamba_n_groups"] = 4
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GaugeError, match=r"width mismatch: tensor 'model\.layers\.0\.mamba\..*"
                                         r"grouped by mamba_n_groups=4"):
        hf_gauge.apply_gauge_to_checkpoint(tmp_path / "a", random_gauge(a, seed=1), tmp_path / "b", progress=False)
