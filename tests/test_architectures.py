"""The architecture battery: every entry of ``hf_gauge.specs.SPECS`` on a tiny random config (tests/tiny_configs.json)
with random gains and biases. A new spec file is tested here by adding one tiny-config entry."""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

import hf_gauge
from hf_gauge import Gauge, GaugeError, SignedPermutation, apply_gauge, random_gauge
from hf_gauge.engine import axes_for, move_tensor_, moves_for
from hf_gauge.kinds import get_kind
from hf_gauge.specs import SPECS, Rule, get_spec
from hf_gauge.view import ConfigView

TINY = json.loads((Path(__file__).parent / "tiny_configs.json").read_text())
MODEL_TYPES = sorted(SPECS)
FULL = "all"          # random_gauge: every space family of the model's spec
VOCAB = TINY["_common"]["vocab_size"]


def tiny_config(model_type: str, **over):
    from transformers import AutoConfig
    if model_type not in TINY:
        raise AssertionError(f"add a tiny config for {model_type!r} to tests/tiny_configs.json")
    entry = dict(TINY[model_type])
    nest = entry.pop("_nest", None)
    kw = dict(TINY["_common"])
    for k, v in (entry.pop(nest) if nest else entry).items():
        if v is None:
            kw.pop(k, None)
        else:
            kw[k] = v
    if nest:
        kw = {**entry, nest: kw}
    kw.update(over)
    return AutoConfig.for_model(model_type, **kw)


def randomize(model, seed: int = 0):
    """Generic gains around 1, random biases and no all-zero matrix (every coordinate identifiable)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if n.endswith("weight") else 0.0))
            elif not p.any():            # zero-initialised matrices (Gemma 3's projector) would hide their rule
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    return model


def build(model_type: str, auto: str = "AutoModelForCausalLM", seed: int = 0, dtype=torch.float32, **over):
    import transformers
    torch.manual_seed(seed)
    cfg = tiny_config(model_type, **over)
    model = getattr(transformers, auto).from_config(cfg, attn_implementation="eager")
    return randomize(model, seed).to(dtype).eval()


def head_classes(model_type: str) -> list[tuple[str, str]]:
    """(mapping, class name) of every base/head class transformers registers for ``model_type``."""
    from transformers.models.auto import modeling_auto as ma
    out = []
    for mapping in ("MODEL", "MODEL_FOR_SEQUENCE_CLASSIFICATION", "MODEL_FOR_TOKEN_CLASSIFICATION",
                    "MODEL_FOR_QUESTION_ANSWERING"):
        name = getattr(ma, mapping + "_MAPPING_NAMES").get(model_type)
        if name:
            out.append((mapping, name))
    return out


def build_class(model_type: str, class_name: str, seed: int = 0):
    import transformers
    torch.manual_seed(seed)
    cfg = tiny_config(model_type, num_labels=3, pad_token_id=VOCAB - 1)
    if hasattr(cfg, "text_config"):
        cfg.text_config.pad_token_id = VOCAB - 1
    model = getattr(transformers, class_name)._from_config(cfg, attn_implementation="eager")
    return randomize(model, seed).eval()


def inputs(model, ids) -> dict:
    """``input_ids``; for a vision-language model also one image per row, its tokens placed after the first."""
    cfg = model.config
    if not hasattr(cfg, "vision_config"):
        return {"input_ids": ids}
    ids = ids.clone()
    n = cfg.mm_tokens_per_image
    ids[:, 1:1 + n] = cfg.image_token_id
    s = cfg.vision_config.image_size
    pixels = torch.randn(ids.shape[0], 3, s, s, generator=torch.Generator().manual_seed(5))
    return {"input_ids": ids, "pixel_values": pixels.to(next(model.parameters()).dtype)}


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(model, ids)).logits.float()


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{k} differs"


def close(out: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> bool:
    return bool((out - ref).abs().max() <= rel * ref.abs().max())


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB - 1, (2, 9), generator=torch.Generator().manual_seed(7))


pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_spec_has_a_tiny_config():
    assert sorted(k for k in TINY if not k.startswith("_")) == MODEL_TYPES


# --------------------------------------------------------------------------------------------- coverage
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_parameter_of_every_class_is_classified(model_type):
    """Coverage: no parameter of the causal LM, the base model or any head class is left unclassified."""
    models = [build(model_type)] + [build_class(model_type, c) for _, c in head_classes(model_type)]
    for m in models:
        view = hf_gauge.unwrap(m)
        spec = get_spec(view)
        names = [n for n, _ in view.named_parameters()]
        assert [n for n in names if axes_for(spec, n) is None] == [], type(m).__name__
        for n, p in view.named_parameters():
            for a in axes_for(spec, n):
                assert a.axis < p.dim(), n


# --------------------------------------------------------------------------------------------- function
@pytest.mark.parametrize("spaces", [("residual",), FULL], ids=["residual", "full"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_logits_preserved_and_inverse_bit_exact(model_type, spaces, ids):
    model = build(model_type)
    ref, before = logits(model, ids), state(model)
    g = random_gauge(model, seed=11, spaces=spaces)
    assert not any(el.is_identity for el in g.spaces.values())
    apply_gauge(model, g)
    moved, spec = state(model), get_spec(model)
    movable = [k for k in before if any(a.space in g.spaces for a in axes_for(spec, k) or ())]
    assert sum(not torch.equal(before[k], moved[k]) for k in movable) >= 0.8 * len(movable)
    out = logits(model, ids)
    assert close(out, ref), (out - ref).abs().max() / ref.abs().max()
    apply_gauge(model, g.inverse())
    assert_bit_equal(state(model), before)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_bf16_inverse_bit_exact(model_type):
    model = build(model_type, dtype=torch.bfloat16)
    before = state(model)
    g = random_gauge(model, seed=5, spaces=FULL)
    apply_gauge(model, g)
    assert any(not torch.equal(before[k], v) for k, v in state(model).items())
    apply_gauge(model, g.inverse())
    assert_bit_equal(state(model), before)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_moved_tensor_is_needed(model_type, ids):
    """No rule is decorative: leaving any one moved tensor in the old chart changes the logits, unless the function
    ignores that tensor's value altogether (a key bias without rotary adds ``q . b_k`` to every score of a row,
    which softmax drops: OPT)."""
    model = build(model_type)
    ref, before = logits(model, ids), state(model)
    g = random_gauge(model, seed=3, spaces=FULL)
    apply_gauge(model, g)
    after = state(model)
    params = dict(model.named_parameters())
    moved = [n for n in params if not torch.equal(before[n], after[n])]
    assert moved
    for n in moved:
        with torch.no_grad():
            params[n].copy_(before[n])
            if close(logits(model, ids), ref, 1e-3):
                params[n].normal_(generator=torch.Generator().manual_seed(0))
                assert close(logits(model, ids), ref, 1e-3), f"{n}: its move is not needed?"
            params[n].copy_(after[n])


def _with_axes(spec, change):
    """A copy of ``spec`` whose every axis (and every part of a fused axis) is replaced by ``change(axis)`` (None
    drops it)."""
    def deep(a):
        a2 = change(a)
        if a2 is not None and a2.segments:
            a2 = dataclasses.replace(a2, segments=tuple(change(p) or p for p in a2.segments))
        return a2
    rules = tuple(Rule(r.pattern, tuple(a2 for a2 in (deep(a) for a in r.axes) if a2 is not None))
                  for r in spec.rules)
    return dataclasses.replace(spec, rules=rules)


def _apply_by_hand(model, spec, gauge):
    params = dict(model.named_parameters())
    for n, mv in moves_for(spec, hf_gauge.unwrap(model).config, gauge, params).items():
        move_tensor_(params[n].data, mv)


def _one_space_per_template() -> list[tuple[str, str]]:
    """(model_type, space): for every space template of every spec, one instance (layer 1 where the template has a
    layer, every other placeholder 1 where it exists); a template the tiny config puts on no layer (Qwen-MoE's dense
    ``mlp.{i}`` when every layer routes: tests/test_moe_layouts.py) has none."""
    out = []
    for mt in MODEL_TYPES:
        sizes = get_spec(mt).space_sizes(ConfigView(tiny_config(mt)))
        for tmpl in get_spec(mt).spaces:
            names = [n for n in sizes if get_spec(mt).parse_space(n)[0] == tmpl]
            if names:
                out.append((mt, names[min(1, len(names) - 1)]))
    return out


@pytest.mark.parametrize("model_type,space", _one_space_per_template())
def test_refused_signs_would_break_the_function(model_type, space, ids):
    """Where the spec admits no sign (LayerNorm residuals, GELU MLP units, heads, norm gains, gate rows), signs
    applied anyway change the logits; where the spec admits signs, the admitted gauge preserves them."""
    model = build(model_type)
    spec = get_spec(model)
    rule = spec.spaces[spec.space_template(space)[0]].signs
    size = hf_gauge.gauge_spaces(model)[space]
    gen = torch.Generator().manual_seed(1)
    sign = torch.where(torch.rand(size, generator=gen) < 0.5, -1, 1)
    sign[0], sign[-1] = -1, 1
    g = Gauge(spaces={space: SignedPermutation(torch.arange(size), sign)})
    ref = logits(model, ids)
    if rule == "any":
        apply_gauge(copy.deepcopy(model), g)          # admitted
        ok = copy.deepcopy(model)
        apply_gauge(ok, g)
        assert close(logits(ok, ids), ref)
    else:
        with pytest.raises(GaugeError):
            apply_gauge(copy.deepcopy(model), g)
    # every axis of the space signed (gains, gate rows, head blocks), KV heads left alone: the refused move
    signed_everywhere = _with_axes(spec, lambda a: dataclasses.replace(a, signed=True))
    bad = copy.deepcopy(model)
    _apply_by_hand(bad, signed_everywhere, g)
    cfg = ConfigView(model.config)
    if space.startswith("attn.") and cfg.n_kv_heads == cfg.n_heads and model_type not in SHARED_ROPE_KEY:
        # Without KV sharing (GPT-NeoX, GPT-2 and kin), negating a head's q, k and v and its output columns together
        # is an exact symmetry. It lies in the in-head gauges (V/O: any invertible map; Q/K: -I commutes with
        # RoPE), which the head space does not model, so the space stays permute-only.
        assert close(logits(bad, ids), ref)
    else:
        assert not close(logits(bad, ids), ref, 1e-3)


# Multi-head latent attention (DeepSeek): one RoPE key (the last rows of kv_a_proj_with_mqa) is shared by every
# head and never moves, so negating a head's q rows flips its q_rot . k_rot term: no in-head sign survives.
SHARED_ROPE_KEY = {"deepseek_v2", "deepseek_v3"}


def _has_kv_groups(mt: str) -> bool:
    """The tiny config has a heads space whose query heads share KV heads in groups of 2 or more."""
    cfg = ConfigView(tiny_config(mt))
    return "attn.0" in get_spec(mt).space_sizes(cfg) and 1 < cfg.n_kv_heads < cfg.n_heads


@pytest.mark.parametrize("model_type", [mt for mt in MODEL_TYPES if _has_kv_groups(mt)])
def test_head_permutation_mixing_kv_groups_refused_and_breaks(model_type, ids):
    model = build(model_type)
    g = Gauge(spaces={"attn.0": SignedPermutation([0, 2, 1, 3])})
    with pytest.raises(GaugeError, match="KV group"):
        apply_gauge(copy.deepcopy(model), g)
    spec = get_spec(model)
    if any(p.kv for r in spec.rules for a in r.axes for p in a.segments):
        return          # fused q|k|v rows (phi3): "K/V do not follow" cannot be written as a spec by dropping axes
    ref = logits(model, ids)
    _apply_by_hand(model, _with_axes(get_spec(model), lambda a: None if a.kv else a), g)   # K/V cannot follow
    assert not close(logits(model, ids), ref, 1e-3)


# --------------------------------------------------------------------------------------------- recovery
def _pair(model_type, seed=11):
    a = build(model_type)
    g = random_gauge(a, seed=seed, spaces=FULL)
    return a, apply_gauge(copy.deepcopy(a), g), g


def _same_gauge(found: Gauge, g: Gauge) -> None:
    assert set(found.spaces) == set(g.spaces)
    for s, el in g.spaces.items():
        assert torch.equal(found.spaces[s].perm, el.perm), s
        assert torch.equal(found.spaces[s].sign, el.sign), s


def assert_gauged_copy(a, g: Gauge, ids) -> torch.nn.Module:
    """B = g(A) computes A's logits, ``g.inverse()`` restores every tensor of A bit for bit, and the full gauge is
    recovered exactly from the weights and from activations; returns B."""
    ref, before = logits(a, ids), state(a)
    b = apply_gauge(copy.deepcopy(a), g)
    assert close(logits(b, ids), ref)
    assert_bit_equal(state(apply_gauge(copy.deepcopy(b), g.inverse())), before)
    _same_gauge(hf_gauge.find_full_gauge(a, b), g)
    data = torch.randint(0, VOCAB, (8, 24), generator=torch.Generator().manual_seed(3))
    _same_gauge(hf_gauge.find_full_gauge(a, b, data=data), g)
    return b


def assert_files_agree(a, b, g: Gauge, tmp_path: Path) -> None:
    """A and B = g(A) saved: streaming apply of g to A's files gives B bit for bit, and from the two checkpoints'
    files the full gauge is found exactly and verified bit-exact."""
    from hf_gauge.fileverify import verify_files
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    hf_gauge.apply_gauge_to_checkpoint(tmp_path / "a", g, tmp_path / "out", progress=False)
    assert_bit_equal(state(type(a).from_pretrained(tmp_path / "out", dtype=torch.float32)), state(b))
    _same_gauge(hf_gauge.find_gauge(tmp_path / "a", tmp_path / "b", spaces="all"), g)
    rep = verify_files(tmp_path / "a", tmp_path / "b", g)
    assert rep["ok"] and rep["weights_bit_exact"]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_data_free_recovery_is_exact(model_type):
    a, b, g = _pair(model_type)
    _same_gauge(hf_gauge.find_full_gauge(a, b), g)
    assert torch.equal(a.gauge_to(b).residual.perm, g.residual.perm)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_activation_recovery_is_exact(model_type):
    a, b, g = _pair(model_type, seed=12)
    data = torch.randint(0, VOCAB, (8, 24), generator=torch.Generator().manual_seed(3))
    _same_gauge(hf_gauge.find_full_gauge(a, b, data=data), g)


# --------------------------------------------------------------------------------------------- files, adapters, charts
@pytest.mark.parametrize("io", ["buffered", "direct"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_streaming_checkpoint_apply_equals_live_apply(model_type, io, tmp_path):
    from safetensors.torch import load_file
    a = build(model_type)
    g = random_gauge(a, seed=4, spaces=FULL)
    a.save_pretrained(tmp_path / "src")
    hf_gauge.apply_gauge_to_checkpoint(tmp_path / "src", g, tmp_path / "out", progress=False, io=io)
    src = load_file(str(tmp_path / "src" / "model.safetensors"))
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert out.keys() == src.keys() and any(not torch.equal(src[k], out[k]) for k in src)
    live = state(apply_gauge(a, g))
    loaded = state(type(a).from_pretrained(tmp_path / "out", dtype=torch.float32))
    assert_bit_equal(loaded, live)


def assert_lora_transported(a, b, g, ids, unmoved_differs: bool = False, **lora) -> None:
    """A LoRA with generic weights on A (by default on every linear but routers written as ``nn.Linear`` subclasses
    that return a tuple, which PEFT cannot wrap: Llama-4, PhiMoE), moved through ``g`` (B = g(A)), reproduces A's
    adapted logits on B by both routes: the adapter state dict loaded into a LoRA on B, and a ``PeftModel`` in, a
    ``PeftModel`` out. ``unmoved_differs``: the same adapter left unmoved on B does not."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    routers = [n for n, m in a.named_modules() if isinstance(m, torch.nn.Linear) and "Router" in type(m).__name__]
    cfg = {"r": 4, "target_modules": "all-linear", "init_lora_weights": False, "exclude_modules": routers or None,
           **lora}
    torch.manual_seed(0)
    pa = get_peft_model(copy.deepcopy(a), LoraConfig(**cfg))
    with torch.no_grad():
        for p in pa.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p) * (p.abs().mean() + 0.1))
    ref = logits(pa.eval(), ids)
    pb = get_peft_model(copy.deepcopy(b), LoraConfig(**cfg))
    assert not set_peft_model_state_dict(pb, g.transport(get_peft_model_state_dict(pa), model=pa)).unexpected_keys
    assert close(logits(pb.eval(), ids), ref)
    assert close(logits(g.transport(pa).eval(), ids), ref)
    if unmoved_differs:
        untransported = get_peft_model(copy.deepcopy(b), LoraConfig(**cfg))
        set_peft_model_state_dict(untransported, {k: v for k, v in pa.state_dict().items() if "lora_" in k})
        assert not close(logits(untransported.eval(), ids), ref, 1e-3)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_lora_transport_reproduces_logits(model_type, ids):
    a, b, g = _pair(model_type)
    assert_lora_transported(a, b, g, ids, unmoved_differs=True)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_canonical_charts_bit_identical(model_type):
    a, b, _ = _pair(model_type)
    hf_gauge.canonicalize(a)
    hf_gauge.canonicalize(b)
    assert_bit_equal(state(a), state(b))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_symmetry_group(model_type):
    model = build(model_type)
    spec = get_spec(model)
    assert model.symmetry_group() == spec.group == ("S_d x {±1}" if spec.norm == "layernorm" else "B_d")
    if spec.norm == "rmsnorm":                                  # every residual gain constant: any rotation works
        with torch.no_grad():
            for n, p in model.named_parameters():
                axes = axes_for(spec, n)
                if p.dim() == 1 and axes and all(x.space == "residual" and not x.signed for x in axes):
                    p.fill_(0.7)
        assert hf_gauge.symmetry_group(model, warn=False) == "O(d)"


# --------------------------------------------------------------------------------------------- heads, base models
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_head_class_keeps_its_outputs(model_type, ids):
    """Base models (``AutoModel``) and every classification/QA head: the methods exist, the outputs are preserved
    (the base model's hidden states move by the residual gauge: ``h_B = g(h_A)``), and the inverse is exact."""
    classes = head_classes(model_type)
    assert classes and classes[0][0] == "MODEL"
    for mapping, cls in classes:
        m = build_class(model_type, cls)
        with torch.no_grad():
            ref = m(**inputs(m, ids))
        before = state(m)
        g = m.symmetry_group() and random_gauge(m, seed=2, spaces=FULL)
        assert m.apply_gauge(g) is m
        with torch.no_grad():
            out = m(**inputs(m, ids))
        if mapping == "MODEL":
            r = g.residual
            want = ref.last_hidden_state[..., r.perm] * r.sign.float()
            assert close(out.last_hidden_state, want), cls
        else:
            keys = ["start_logits", "end_logits"] if mapping.endswith("ANSWERING") else ["logits"]
            for k in keys:
                assert close(out[k], ref[k]), (cls, k)
        apply_gauge(m, g.inverse())
        assert_bit_equal(state(m), before)


def test_base_model_gauge_to_and_transport():
    a = build("llama", auto="AutoModel")
    g = random_gauge(a, seed=1, spaces=FULL)
    b = apply_gauge(copy.deepcopy(a), g)
    found = a.gauge_to(b, spaces="all")
    _same_gauge(found, g)
    v = torch.randn(a.config.hidden_size)
    assert torch.equal(a.transport(v), g.transport(v))


def test_unsupported_model_methods_raise_gauge_error():
    from transformers import AutoConfig, AutoModelForCausalLM, XGLMModel
    cfg = AutoConfig.for_model("xglm", d_model=32, num_layers=1, attention_heads=2, vocab_size=50, ffn_dim=64)
    for m in (AutoModelForCausalLM.from_config(cfg), XGLMModel(cfg)):
        for call in (lambda: m.apply_gauge(Gauge(residual=SignedPermutation.identity(32))), lambda: m.gauge_to(m), lambda: m.transport(torch.zeros(32)),
                     lambda: m.symmetry_group()):
            with pytest.raises(GaugeError, match="model_type='xglm'.*gemma.*llama.*olmo2"):
                call()


# --------------------------------------------------------------------------------------------- mixtures of experts
MOE_TYPES = [mt for mt in MODEL_TYPES if get_spec(mt).spaces_of_kind("experts", "grouped_experts")]
FIRST_LAYER_MOE = next(mt for mt in MOE_TYPES if "moe.0" in get_spec(mt).space_sizes(ConfigView(tiny_config(mt))))


def _derangement(model, name: str, n: int, seed: int) -> SignedPermutation:
    """Every expert moves: a roll by ``1 + seed % (n - 1)``, or by whole routing groups (group-limited routing with
    more than one group)."""
    kind = get_kind(get_spec(model).space(name).kind)
    g = kind.group_size(n, ConfigView(model.config))
    return SignedPermutation(torch.roll(torch.arange(n), g if 1 < g < n else 1 + seed % (n - 1)))


def _moe_gauge(model, seed: int) -> Gauge:
    """A random gauge on every space, with every expert permutation a derangement (so every expert moves)."""
    g = random_gauge(model, seed=seed, spaces="all")
    sp = dict(g.spaces)
    for name in sp:
        if get_spec(model).space(name).kind in ("experts", "grouped_experts"):
            sp[name] = _derangement(model, name, sp[name].size, seed)
    return Gauge(spaces=sp)


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_expert_permutation_needs_router_rows_and_expert_weights_together(model_type, ids):
    """The permutation of experts is exact only when each router row moves with its expert's weights; moving either
    alone (router rows, or the fused expert slices) changes the logits."""
    model = build(model_type)
    spec = get_spec(model)
    ref = logits(model, ids)
    sizes = hf_gauge.gauge_spaces(model)
    g = Gauge(spaces={n: _derangement(model, n, k, 0) for n, k in sizes.items() if n.startswith("moe.")})
    ok = apply_gauge(copy.deepcopy(model), g)
    assert close(logits(ok, ids), ref)
    experts_space = lambda a: a.space.startswith("moe.")               # noqa: E731
    for drop in (lambda a: dataclasses.replace(a, space="") if experts_space(a) and a.stack else a,  # router only
                 lambda a: None if experts_space(a) and not a.stack else a):       # expert weights only
        bad = copy.deepcopy(model)
        _apply_by_hand(bad, _with_axes(spec, drop), g)
        assert not close(logits(bad, ids), ref, 1e-3)


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_carried_expert_spaces_compose_as_a_wreath_product(model_type):
    """Per-expert unit gauges are indexed by the source expert: ``g2 @ g1`` applied once equals ``g1`` then ``g2``,
    ``g.inverse() @ g`` is the identity on every space, and composition is associative, bit for bit."""
    model = build(model_type)
    g1, g2, g3 = (_moe_gauge(model, s) for s in (1, 2, 3))
    seq = apply_gauge(apply_gauge(copy.deepcopy(model), g1), g2)
    once = apply_gauge(copy.deepcopy(model), g2 @ g1)
    assert_bit_equal(state(seq), state(once))
    assert all(el.is_identity for el in (g1.inverse() @ g1).spaces.values())
    assert all(el.is_identity for el in (g1 @ g1.inverse()).spaces.values())
    assert (g3 @ g2) @ g1 == g3 @ (g2 @ g1)
    # a per-space (direct-product) composition would be wrong: B's slot k holds A's expert perm[k]
    naive = Gauge(spaces={n: g2.spaces[n] @ g1.spaces[n] for n in g1.spaces})
    assert naive != g2 @ g1


PER_EXPERT_FILES = [mt for mt in MOE_TYPES if any("{e}" in r.pattern for r in get_spec(mt).file_rules)]


@pytest.mark.parametrize("io", ["buffered", "direct"])
@pytest.mark.parametrize("model_type", PER_EXPERT_FILES)     # granitemoehybrid's files keep the experts fused
def test_streaming_apply_renames_experts_across_shards(model_type, io, tmp_path):
    """Checkpoint files store one tensor per expert (gpt-oss: the fused tensors, as in memory): under a permutation
    of experts, each output tensor is read from its source expert's name, in whichever shard that lies."""
    from safetensors.torch import load_file
    a = build(model_type)
    a.save_pretrained(tmp_path / "src", max_shard_size="24KB")
    shards = sorted((tmp_path / "src").glob("*.safetensors"))
    assert len(shards) > 3
    g = _moe_gauge(a, 4)
    hf_gauge.apply_gauge_to_checkpoint(tmp_path / "src", g, tmp_path / "out", progress=False, io=io)
    live = state(apply_gauge(a, g))
    loaded = state(type(a).from_pretrained(tmp_path / "out", dtype=torch.float32))
    assert_bit_equal(loaded, live)
    out = {k: v for s in sorted((tmp_path / "out").glob("*.safetensors")) for k, v in load_file(str(s)).items()}
    src = {k: v for s in shards for k, v in load_file(str(s)).items()}
    first = min(int(k.split("layers.")[1].split(".")[0]) for k in src if ".experts." in k)    # first MoE layer
    moved = [k for k in src if ".experts." in k and f"layers.{first}." in k]
    assert moved and all(not torch.equal(src[k], out[k]) for k in moved)


def test_expert_signs_are_refused():
    model = build(FIRST_LAYER_MOE)
    with pytest.raises(GaugeError, match="permutes whole experts"):
        apply_gauge(model, Gauge(spaces={"moe.0": SignedPermutation([1, 0, 2, 3], [1, -1, 1, 1])}))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_find_and_verify_from_checkpoint_files(model_type, tmp_path):
    """Data-free find and verify straight from files written by ``save_pretrained`` (names as files store them:
    per-expert tensors of MoE models), without loading a model: the hidden gauge is recovered exactly, verify passes
    bit-exactly with it and fails with another."""
    from hf_gauge.fileverify import verify_files
    a, b, g = _pair(model_type)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    found = hf_gauge.find_gauge(tmp_path / "a", tmp_path / "b", spaces="all")
    _same_gauge(found, g)
    # the final-norm gain is found under its on-disk name too (EXAONE's transformer.ln_f)
    assert (found.source["fingerprint"], found.target["fingerprint"]) == (hf_gauge.fingerprint(a), hf_gauge.fingerprint(b))
    rep = verify_files(tmp_path / "a", tmp_path / "b", g)
    assert rep["ok"] and rep["weights_bit_exact"] and rep["fingerprint_match"]
    wrong = random_gauge(a, seed=99, spaces=FULL)
    assert not verify_files(tmp_path / "a", tmp_path / "b", wrong)["ok"]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_streaming_apply_of_every_head_class_checkpoint(model_type, tmp_path):
    """Checkpoints of base models (``layers.0...``, no ``model.`` prefix) and QA heads (``transformer.``) are applied
    from files exactly as the live model is."""
    for _, cls in head_classes(model_type):
        m = build_class(model_type, cls)
        g = random_gauge(m, seed=1, spaces=FULL)
        m.save_pretrained(tmp_path / cls / "src")
        hf_gauge.apply_gauge_to_checkpoint(tmp_path / cls / "src", g, tmp_path / cls / "out", progress=False)
        live = state(apply_gauge(m, g))
        assert_bit_equal(state(type(m).from_pretrained(tmp_path / cls / "out", dtype=torch.float32)), live)


def test_index_sets_of_an_expert_move_with_the_expert():
    """Neurons of A's expert a (``experts.i.a``) are, in B, neurons of the expert slot that A's expert moved to; an
    attribution over them keeps its scores on the same units."""
    model = build(FIRST_LAYER_MOE)
    g = _moe_gauge(model, 1)
    sigma = g["moe.0"]
    a = 2
    k = int(sigma.inverse().perm[a])
    assert k != a
    idx = hf_gauge.IndexSet([0, 5, 7], space=f"experts.0.{a}")
    moved = g.transport(idx)
    assert moved.space == f"experts.0.{k}"
    assert torch.equal(moved.indices, g[f"experts.0.{a}"].map_indices(idx.indices))
    back = g.inverse().transport(moved)
    assert back == idx


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_canonical_stability_follows_permuted_experts(model_type):
    """A gauge-equivalent pair keeps every canonical index, expert units included (compared in the expert's new
    slot; per-space comparison by name put 2% of them at the same place)."""
    a = build(model_type)
    g = _moe_gauge(a, 1)
    report = hf_gauge.canonical_stability(a, apply_gauge(copy.deepcopy(a), g), g)
    assert all(v == 1.0 for v in report.summary().values()), report.summary()


# --------------------------------------------------------------------------------------------- cohere
@pytest.mark.parametrize("qk_norm", [True, False], ids=["qk_norm", "plain"])
def test_cohere_admits_the_global_residual_sign(qk_norm, ids):
    """CohereLayerNorm is weight-only but mean-centring: LN(-x) = -LN(x) with no bias to flip, so the residual admits
    exactly S_d x {±1}. The global -1 (with random unit/head gauges) preserves the logits, with and without the
    per-head q/k LayerNorm, and is recovered data-free; one coordinate's sign alone is refused and breaks them."""
    model = build("cohere", use_qk_norm=qk_norm)
    assert hf_gauge.symmetry_group(model) == "S_d x {±1}"
    ref = logits(model, ids)
    g = random_gauge(model, seed=5, spaces=FULL)
    d = g.residual.perm.numel()
    flipped = Gauge(spaces={**g.spaces, "residual": SignedPermutation(g.residual.perm, -torch.ones(d, dtype=torch.long))})
    b = apply_gauge(copy.deepcopy(model), flipped)
    assert torch.equal(state(b)["model.embed_tokens.weight"], -state(model)["model.embed_tokens.weight"][:, g.residual.perm])
    assert close(logits(b, ids), ref)
    _same_gauge(hf_gauge.find_full_gauge(model, b), flipped)
    one = torch.ones(d, dtype=torch.long)
    one[3] = -1
    with pytest.raises(GaugeError):
        apply_gauge(copy.deepcopy(model), Gauge(residual=SignedPermutation(torch.arange(d), one)))
    bad = copy.deepcopy(model)
    _apply_by_hand(bad, get_spec(model), Gauge(residual=SignedPermutation(torch.arange(d), one)))
    assert not close(logits(bad, ids), ref, 1e-3)
