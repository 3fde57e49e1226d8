"""Data-free features: read from the spec, transform exactly like the gauge says, and match exactly."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_model
import hf_gauge
from hf_gauge import GaugeError
from hf_gauge.features import WeightFeatures, feature_correlation, paired_weight_features


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


def test_default_row_cap_is_2048_rows_at_every_width(monkeypatch):
    """The Gram of the top rows is the costly step at 7B+ widths: by default each signed tensor contributes its
    ``DEFAULT_MAX_ROWS`` largest vocabulary rows, whatever the width (a vocabulary larger than the cap here)."""
    import hf_gauge.features as F

    monkeypatch.setattr(F, "DEFAULT_MAX_ROWS", 100)           # the tiny vocabulary stands in for a large one
    A, B, hidden = _pair(seed=6)
    fa, _ = paired_weight_features(A, B)
    n_vocab = len([n for n in fa.signed_names if n in ("model.embed_tokens.weight", "lm_head.weight")])
    assert n_vocab == 2 and A.config.vocab_size > 100
    assert fa.signed.shape[1] == 2 * 100 + (len(fa.signed_names) - 2)
    assert hf_gauge.find_gauge(A, B) == hidden.restrict("residual")


def test_feature_correlation_in_place_is_the_formula():
    """The in-place similarity (row blocks, no d×d temporaries) equals the module docstring's formula to float64
    rounding, zero-norm coordinates (exactly cosine 0) and constant invariant features (dropped) included."""
    gen = torch.Generator().manual_seed(0)
    d = 600                                                     # more rows than one in-place block (256)
    sa = torch.randn(d, 40, generator=gen, dtype=torch.float64)
    sb = torch.randn(d, 40, generator=gen, dtype=torch.float64)
    sa[3] = 0
    sb[7] = 0
    ua, ub = torch.rand(d, 5, generator=gen, dtype=torch.float64), torch.rand(d, 5, generator=gen, dtype=torch.float64)
    ua[:, 2] = ub[:, 2] = 1.5
    na, nb = sa.norm(dim=1), sb.norm(dim=1)
    cos = (sa @ sb.T) / (na[:, None] * nb[None, :]).clamp_min(1e-300)
    cos = torch.where((na[:, None] > 0) & (nb[None, :] > 0), cos, torch.zeros_like(cos)).clamp_(-1.0, 1.0)
    both = torch.cat([ua, ub], 0)
    keep = torch.tensor([True, True, False, True, True])
    za = (ua[:, keep] - both.mean(0)[keep]) / both.std(0)[keep]
    zb = (ub[:, keep] - both.mean(0)[keep]) / both.std(0)[keep]
    dist = ((za * za).sum(1)[:, None] + (zb * zb).sum(1)[None, :] - 2.0 * za @ zb.T).clamp_min(0.0) / 4
    empty = torch.zeros(d, 0, dtype=torch.float64)
    both_c = feature_correlation(WeightFeatures(sa, ua), WeightFeatures(sb, ub))
    cos_c = feature_correlation(WeightFeatures(sa, empty), WeightFeatures(sb, empty))
    inv_c = feature_correlation(WeightFeatures(empty, ua), WeightFeatures(empty, ub))
    # float64 products in other blockings than the formula's GEMM: the BLAS kernel picks each summation order, per
    # CPU, so the agreement is to rounding (40 and 4 terms: ~1e-15), not to the bit
    for got, want in ((both_c, cos * torch.exp(-dist)), (cos_c, cos), (inv_c, torch.exp(-dist))):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    # what the code guarantees exactly, on every CPU: zero-norm coordinates give cosine 0, cosines stay in [-1, 1]
    for got in (both_c, cos_c):
        assert got[3].abs().max() == 0 and got[:, 7].abs().max() == 0
        assert got.abs().max() <= 1.0


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
