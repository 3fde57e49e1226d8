"""Data-free features: read from the spec, transform exactly like the gauge says, and match exactly."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_model
import hf_gauge
from hf_gauge import GaugeError
from hf_gauge.features import feature_correlation, paired_weight_features


def _pair(model_type="llama", tie=False, spaces=("residual", "mlp", "attn"), seed=3):
    A = tiny_model(model_type, tie=tie)
    B = copy.deepcopy(A)
    hidden = hf_gauge.random_gauge(B, seed=seed, spaces=spaces)
    B.apply_gauge(hidden)
    return A, B, hidden


@pytest.mark.parametrize("tie", [False, True])
def test_feature_kinds_come_from_the_spec(tie):
    A, B, _ = _pair(tie=tie)
    fa, fb = paired_weight_features(A, B)
    assert "model.embed_tokens.weight" in fa.signed_names
    assert ("lm_head.weight" in fa.signed_names) is (not tie)          # tied: one tensor, counted once
    assert "model.layers.0.self_attn.o_proj.bias" in fa.signed_names    # writer bias: sign-carrying scalar
    assert "model.norm.weight" in fa.invariant_names                      # gains: permute only
    assert "model.layers.1.mlp.down_proj.weight" in fa.invariant_names    # writer rows: norms only
    assert "model.layers.0.self_attn.q_proj.bias" not in fa.signed_names + fa.invariant_names   # head space
    assert fa.signed.dtype == torch.float64 and fa.signed.shape[0] == A.config.hidden_size


def test_features_transform_as_the_gauge_says():
    """Signed features move as sign[j] * f[perm[j]], invariant ones as f[perm[j]], whatever the inner gauges."""
    A, B, hidden = _pair()
    q = hidden.residual
    fa, fb = paired_weight_features(A, B)
    s = q.sign.double()[:, None]
    torch.testing.assert_close(fb.signed, s * fa.signed[q.perm], atol=1e-12, rtol=1e-6)
    torch.testing.assert_close(fb.invariant, fa.invariant[q.perm], atol=1e-6, rtol=1e-5)
    C = feature_correlation(fa, fb)
    d = q.size
    matched = C[q.perm, torch.arange(d)]
    torch.testing.assert_close(matched, q.sign.double(), atol=1e-9, rtol=0)
    off = C.abs().clone()
    off[q.perm, torch.arange(d)] = 0
    assert float(off.max()) < 0.99


def test_row_cap_still_exact():
    A, B, hidden = _pair(seed=5)
    fa, fb = paired_weight_features(A, B, max_rows=16)
    assert fa.signed.shape[1] < 2 * 128
    assert hf_gauge.find_gauge(A, B, max_rows=16) == hidden.restrict("residual")


def test_gpt_neox_features_and_refusals():
    A, B, hidden = _pair("gpt_neox", spaces=("residual", "mlp", "attn"), seed=1)
    fa, _ = paired_weight_features(A, B)
    assert "gpt_neox.embed_in.weight" in fa.signed_names and "gpt_neox.final_layer_norm.bias" in fa.signed_names
    assert hf_gauge.find_gauge(A, B) == hidden.restrict("residual")
    C = tiny_model("llama", hidden_size=64)
    with pytest.raises(GaugeError):
        hf_gauge.find_gauge(A, C)


def test_vocab_mismatch_refused():
    A = tiny_model("llama")
    from transformers import AutoModelForCausalLM
    cfg = copy.deepcopy(A.config)
    cfg.vocab_size = 100
    B = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(GaugeError, match="do not share an architecture"):
        hf_gauge.find_gauge(A, B)
