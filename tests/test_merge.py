"""Merging in a common chart: A merged with a gauged copy of itself returns A under B_d; unaligned or
permutation-only merges do not."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import assert_state_equal, logits, state, tiny_model, permutation_only

import hf_gauge
from hf_gauge import GaugeError, apply_gauge, random_gauge


pytestmark = pytest.mark.usefixtures("one_thread")


def _max_param_diff(m1, m2) -> float:
    p2 = dict(m2.named_parameters())
    return max((p - p2[n]).abs().max().item() for n, p in m1.named_parameters())


@pytest.fixture(scope="module")
def pair():
    a = tiny_model("llama", seed=7, tie=True)
    g = random_gauge(a, seed=9, spaces=("residual", "mlp", "attn"))
    return a, apply_gauge(copy.deepcopy(a), g), g


def test_merge_with_gauged_self_returns_self(pair, ids):
    a, b, g = pair
    sa, sb = state(a), state(b)
    m = hf_gauge.merge(a, b, weight=0.5, gauge=g)
    assert m is not a and m is not b
    assert _max_param_diff(m, a) < 1e-6
    assert (logits(m, ids) - logits(a, ids)).abs().max().item() < 1e-5
    assert_state_equal(sa, state(a))              # inputs untouched
    assert_state_equal(sb, state(b))
    ref = logits(a, ids)
    perm = (logits(hf_gauge.merge(a, b, gauge=permutation_only(g)), ids) - ref).abs().max().item()
    raw = (logits(hf_gauge.merge(a, b, method="none"), ids) - ref).abs().max().item()
    assert perm > 0.05 and raw > 0.05, (perm, raw)
    assert _max_param_diff(hf_gauge.merge(a, b, gauge=permutation_only(g)), a) > 0.1


def test_merge_of_two_finetunes_is_coordinatewise(pair):
    a, _, g = pair
    a2 = copy.deepcopy(a)
    with torch.no_grad():
        for p in a2.parameters():
            p.add_(0.01 * torch.randn_like(p))
    b = apply_gauge(copy.deepcopy(a2), g)        # a fine-tune of A, expressed in another chart
    m = hf_gauge.merge(a, b, weight=0.25, gauge=g)
    pa2 = dict(a2.named_parameters())
    for n, p in m.named_parameters():
        q = dict(a.named_parameters())[n]
        assert torch.allclose(p, 0.75 * q + 0.25 * pa2[n], atol=1e-6), n


def test_merge_fits_the_gauge_when_none_given(ids):
    a = tiny_model("llama", seed=7, tie=True)
    g = random_gauge(a, seed=9, spaces=("residual",))
    b = apply_gauge(copy.deepcopy(a), g)
    m = hf_gauge.merge(a, b)                           # method="signed": sign-marginalized matching
    ref = logits(a, ids)
    assert (logits(m, ids) - ref).abs().max().item() < 1e-5
    mp = hf_gauge.merge(a, b, method="permutation")     # the S_d baseline runs, and fails to reproduce A
    assert (logits(mp, ids) - ref).abs().max().item() > 0.05


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gpt_neox"])
def test_merge_default_fits_every_gauge_space(family, ids):
    """B = A under a residual + MLP-unit + head gauge: the default merge (no gauge given) must align all three."""
    a = tiny_model(family, seed=7, tie=True)
    g = random_gauge(a, seed=11, spaces=("residual", "mlp", "attn"))
    b = apply_gauge(copy.deepcopy(a), g)
    sa, sb = state(a), state(b)
    ref = logits(a, ids)
    m = hf_gauge.merge(a, b)
    assert (logits(m, ids) - ref).abs().max().item() < 1e-5
    assert _max_param_diff(m, a) < 1e-5
    assert_state_equal(sa, state(a))              # inputs untouched
    assert_state_equal(sb, state(b))
    # residual-only alignment (the find_gauge default) leaves the inner spaces unaligned: the merge is wrong
    mr = hf_gauge.merge(a, b, spaces=("residual",))
    assert (logits(mr, ids) - ref).abs().max().item() > 1e-3


def test_merge_refuses_bad_input(pair):
    a, b, g = pair
    with pytest.raises(GaugeError, match="weight"):
        hf_gauge.merge(a, b, weight=1.5, gauge=g)
    with pytest.raises(GaugeError, match="gpt_neox"):
        hf_gauge.merge(a, tiny_model("gpt_neox"), gauge=g)
    with pytest.raises(GaugeError, match="Gauge"):
        hf_gauge.merge(a, b, gauge=g.residual)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_merge_aligns_permuted_experts(model_type):
    """B = A with its experts permuted and every expert's units gauged: the default merge realigns experts (router
    rows with their weights) before averaging, so it returns A; averaging unaligned experts does not."""
    from test_architectures import build, logits as arch_logits
    a = build(model_type)
    b = apply_gauge(copy.deepcopy(a), random_gauge(a, seed=2, spaces="all"))
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(4))
    ref = arch_logits(a, ids)
    assert _max_param_diff(hf_gauge.merge(a, b), a) < 1e-5
    assert (arch_logits(hf_gauge.merge(a, b, spaces=("residual", "attn")), ids) - ref).abs().max().item() > 1e-3
