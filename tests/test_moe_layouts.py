"""MoE models whose config makes some layers dense (``specs.base.layers_where``): Qwen2-MoE / Qwen3-MoE with
``mlp_only_layers`` or ``decoder_sparse_step > 1``, and the dense-first families (``first_k_dense_replace``), through
the battery's checks on each layout: the spaces live where the config puts them, function preserved and inverse
bit-exact, every moved tensor needed, data-free and activation recovery, streaming apply and find/verify from files,
LoRA transport, canonical charts. The tiny configs have 3 layers so that dense and MoE layers both occur."""
from __future__ import annotations

import copy

import pytest
import torch

import hf_gauge
from hf_gauge import apply_gauge, random_gauge

from test_architectures import (FULL, VOCAB, _same_gauge, assert_bit_equal, assert_files_agree, assert_lora_transported,
                                build, close, logits, state)

# (model_type, config overrides, the layers that route to experts)
LAYOUTS = {
    "qwen2_moe-sparse_step_2": ("qwen2_moe", {"decoder_sparse_step": 2}, (1,)),
    "qwen2_moe-mlp_only_0_2": ("qwen2_moe", {"mlp_only_layers": [0, 2]}, (1,)),
    "qwen3_moe-mlp_only_1": ("qwen3_moe", {"mlp_only_layers": [1]}, (0, 2)),
    "ernie4_5_moe-start_1": ("ernie4_5_moe", {"moe_layer_start_index": 1}, (1, 2)),
    "glm4_moe-first_k_dense_1": ("glm4_moe", {"first_k_dense_replace": 1}, (1, 2)),
    "ernie4_5_moe-interval_2-no_shared": ("ernie4_5_moe", {"moe_layer_interval": 2, "moe_num_shared_experts": 0}, (1,)),
}
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.parametrize("layout", sorted(LAYOUTS))]


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB - 1, (2, 9), generator=torch.Generator().manual_seed(7))


def _build(layout: str, seed: int = 0):
    mt, over, _ = LAYOUTS[layout]
    return build(mt, seed=seed, num_hidden_layers=3, **over)


def _pair(layout: str, seed: int = 11):
    a = _build(layout)
    g = random_gauge(a, seed=seed, spaces=FULL)
    return a, apply_gauge(copy.deepcopy(a), g), g


def test_spaces_follow_the_config(layout):
    moe = LAYOUTS[layout][2]
    a = _build(layout)
    sizes = hf_gauge.gauge_spaces(a)
    assert [s for s in sizes if s.startswith("moe.")] == [f"moe.{i}" for i in moe]
    assert [s for s in sizes if s.startswith("mlp.")] == [f"mlp.{i}" for i in range(3) if i not in moe]
    for i in range(3):                           # transformers built the same layout
        assert hasattr(a.model.layers[i].mlp, "experts") == (i in moe)


def test_logits_preserved_and_inverse_bit_exact(layout, ids):
    model = _build(layout)
    ref, before = logits(model, ids), state(model)
    g = random_gauge(model, seed=11, spaces=FULL)
    apply_gauge(model, g)
    assert close(logits(model, ids), ref)
    moved = state(model)
    dense = next(i for i in range(3) if i not in LAYOUTS[layout][2])
    for k in (f"model.layers.{dense}.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"
              if 1 not in LAYOUTS[layout][2] else "model.layers.1.mlp.experts.down_proj"):
        assert not torch.equal(moved[k], before[k]), k
    apply_gauge(model, g.inverse())
    assert_bit_equal(state(model), before)


def test_dense_units_gauge_is_needed(layout, ids):
    """Moving the dense layers' units (and nothing else) is exact; leaving their down_proj unmoved is not."""
    model = _build(layout)
    ref = logits(model, ids)
    g = random_gauge(model, seed=2, spaces="mlp")
    ok = apply_gauge(copy.deepcopy(model), g)
    assert close(logits(ok, ids), ref)
    dense = next(iter(g.spaces)).split(".")[1]
    with torch.no_grad():
        ok.model.layers[int(dense)].mlp.down_proj.weight.copy_(model.model.layers[int(dense)].mlp.down_proj.weight)
    assert not close(logits(ok, ids), ref, 1e-3)


def test_recovery_data_free_and_from_activations(layout):
    a, b, g = _pair(layout)
    _same_gauge(hf_gauge.find_full_gauge(a, b), g)
    data = torch.randint(0, VOCAB, (8, 24), generator=torch.Generator().manual_seed(3))
    _same_gauge(hf_gauge.find_full_gauge(a, b, data=data), g)


def test_files_apply_find_and_verify(layout, tmp_path):
    a, b, g = _pair(layout)
    assert_files_agree(a, b, g, tmp_path)


def test_lora_transport_and_canonical_charts(layout, ids):
    a, b, g = _pair(layout)
    assert_lora_transported(a, b, g, ids)
    hf_gauge.canonicalize(a)
    hf_gauge.canonicalize(b)
    assert_bit_equal(state(a), state(b))
