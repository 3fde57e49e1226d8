"""``ArchSpec.variant``: one model type, several layouts, resolved per config (``hf_gauge.view.spec_for``).

OPT's projected embeddings (``word_embed_proj_dim`` p != d: ``project_in`` / ``project_out``, embeddings and heads
in p-space) and post-LayerNorm blocks (``do_layer_norm_before=False``: no final LayerNorm), alone and together
(OPT-350m's layout), through the battery's checks: function preserved and inverse bit-exact, data-free and
activation recovery, streaming apply, LoRA transport, canonical charts, every head class."""
from __future__ import annotations

import copy

import pytest
import torch

import hf_gauge
from hf_gauge import GaugeError, apply_gauge, random_gauge
from hf_gauge.engine import move_tensor, moves_for
from hf_gauge.specs import get_spec
from hf_gauge.view import ModelView, spec_for

from test_architectures import (FULL, VOCAB, _same_gauge, assert_bit_equal, assert_lora_transported, build, close,
                                head_classes, inputs, logits, randomize, state, tiny_config)

LAYOUTS = {"projected": {"word_embed_proj_dim": 16}, "post_ln": {"do_layer_norm_before": False},
           "projected_post_ln": {"word_embed_proj_dim": 16, "do_layer_norm_before": False}}
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.parametrize("layout", sorted(LAYOUTS))]


@pytest.fixture
def ids():
    return torch.randint(0, 127, (2, 9), generator=torch.Generator().manual_seed(7))


def _pair(layout: str, seed: int = 11):
    a = build("opt", **LAYOUTS[layout])
    g = random_gauge(a, seed=seed, spaces=FULL)
    return a, apply_gauge(copy.deepcopy(a), g), g


def test_variant_is_resolved_per_config(layout):
    a = build("opt", **LAYOUTS[layout])
    spec, base = ModelView.of(a).spec, get_spec("opt")
    assert spec is not base and spec is spec_for(a.config) and spec.group == base.group == "S_d x {±1}"
    modules = dict(a.named_modules())
    assert spec.sites.final_norm in modules and spec.sites.embed in modules
    if "post_ln" in layout:                       # the base spec's final norm does not exist here
        assert base.sites.final_norm not in modules
    if "projected" in layout:
        assert spec.sites.embed == "model.decoder.project_in"
        with pytest.raises(GaugeError, match="width mismatch"):   # the base layout cannot move p-space tensors
            name = "model.decoder.embed_tokens.weight"
            move_tensor(a.model.decoder.embed_tokens.weight.detach(),
                        moves_for(base, a.config, random_gauge(a, seed=1), {name: 0})[name])


def test_logits_preserved_and_inverse_bit_exact(layout, ids):
    model = build("opt", **LAYOUTS[layout])
    ref, before = logits(model, ids), state(model)
    g = random_gauge(model, seed=11, spaces=FULL)
    apply_gauge(model, g)
    assert close(logits(model, ids), ref)
    moved = state(model)
    if "projected" in layout:                    # p-space tensors stay, project_in/out move
        for k in ("model.decoder.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(moved[k], before[k]), k
        for k in ("model.decoder.project_in.weight", "model.decoder.project_out.weight"):
            assert not torch.equal(moved[k], before[k]), k
    apply_gauge(model, g.inverse())
    assert_bit_equal(state(model), before)


def test_recovery_data_free_and_from_activations(layout):
    """Exact from the weights; from activations exact on every space except ReLU units that never fire on the data
    (post-LN OPT has a few here: an all-zero unit carries no evidence of where it went)."""
    a, b, g = _pair(layout)
    _same_gauge(hf_gauge.find_full_gauge(a, b), g)
    data = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(3))
    live = {}
    hooks = [a.model.decoder.layers[i].fc2.register_forward_hook(
        lambda mod, args, out, i=i: live.__setitem__(f"mlp.{i}", args[0].reshape(-1, args[0].shape[-1]).ne(0).any(0)))
        for i in range(2)]
    with torch.no_grad():
        a(data)
    for h in hooks:
        h.remove()
    found = hf_gauge.find_full_gauge(a, b, data=data)
    assert set(found.spaces) == set(g.spaces)
    for s, el in g.spaces.items():
        keep = live[s][el.perm] if s in live else torch.ones(el.size, dtype=torch.bool)    # B's unit j is A's perm[j]
        assert keep.float().mean() > 0.5, s                          # most units fire: the check has teeth
        assert torch.equal(found[s].perm[keep], el.perm[keep]) and torch.equal(found[s].sign[keep], el.sign[keep]), s


def test_streaming_apply_equals_live_apply(layout, tmp_path):
    a = build("opt", **LAYOUTS[layout])
    g = random_gauge(a, seed=4, spaces=FULL)
    a.save_pretrained(tmp_path / "src")
    hf_gauge.apply_gauge_to_checkpoint(tmp_path / "src", g, tmp_path / "out", progress=False)
    live = state(apply_gauge(a, g))
    assert_bit_equal(state(type(a).from_pretrained(tmp_path / "out", dtype=torch.float32)), live)


def test_lora_transport_reproduces_logits(layout, ids):
    a, b, g = _pair(layout)
    assert_lora_transported(a, b, g, ids)


def test_canonical_charts_bit_identical(layout):
    a, b, _ = _pair(layout)
    hf_gauge.canonicalize(a)
    hf_gauge.canonicalize(b)
    assert_bit_equal(state(a), state(b))


def test_every_head_class_keeps_its_outputs(layout, ids):
    for mapping, cls in head_classes("opt"):
        m = _with_layout(cls, layout)
        with torch.no_grad():
            ref = m(**inputs(m, ids))
        before = state(m)
        g = random_gauge(m, seed=2, spaces=FULL)
        apply_gauge(m, g)
        with torch.no_grad():
            out = m(**inputs(m, ids))
        if mapping == "MODEL":
            want = ref.last_hidden_state
            if "projected" not in layout:       # project_out takes the final residual back to p-space
                want = want[..., g.residual.perm] * g.residual.sign.float()
            assert close(out.last_hidden_state, want), cls
        else:
            for k in (["start_logits", "end_logits"] if mapping.endswith("ANSWERING") else ["logits"]):
                assert close(out[k], ref[k]), (cls, k)
        apply_gauge(m, g.inverse())
        assert_bit_equal(state(m), before)


def _with_layout(cls: str, layout: str):
    import transformers
    torch.manual_seed(0)
    cfg = tiny_config("opt", num_labels=3, pad_token_id=VOCAB - 1, **LAYOUTS[layout])
    return randomize(getattr(transformers, cls)._from_config(cfg, attn_implementation="eager")).eval()
