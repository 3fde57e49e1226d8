"""Orthogonal Procrustes maps: exact recovery of known rotations (synthetic and a rotated O(d)-regime model),
signed-permutation limit, transport rules (vectors, SAEs), diagnostics, and apply_gauge's refusal."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from scipy.stats import ortho_group

from conftest import tiny_model
import hf_gauge
from hf_gauge import GaugeError, OrthogonalMap
from hf_gauge.engine import axes_for
from hf_gauge.orthogonal import procrustes_from_cross
from hf_gauge.stats import PairStats


def _haar(d, seed):
    return torch.from_numpy(ortho_group.rvs(d, random_state=seed))


def test_synthetic_rotation_recovered_across_sites_of_different_scale():
    d = 12
    R = _haar(d, 0)
    g = torch.Generator().manual_seed(0)
    st = PairStats(["s0", "s1", "s2"], d)
    for s, scale in enumerate((1.0, 30.0, 500.0)):
        mix = torch.randn(d, d, generator=g, dtype=torch.float64)          # anisotropic, site-dependent
        xa = scale * torch.randn(300, d, generator=g, dtype=torch.float64) @ mix + 5.0
        st.update(s, xa, xa @ R)
    R_hat = procrustes_from_cross(st.cross_covariance())
    np.testing.assert_allclose(R_hat, R.numpy(), atol=1e-9)


def _rotate_model(model, R: torch.Tensor):
    """Rotate every residual axis: readers W -> W R, writers W -> R^T W, biases b -> b R (x_B = x_A R)."""
    spec = hf_gauge.get_spec(model)
    Rf = R.float()
    with torch.no_grad():
        for n, p in model.named_parameters():
            res = [a for a in axes_for(spec, n) or () if a.space == "residual"]
            if not res:
                continue
            if not res[0].signed:                 # a gain: must be constant, then rotation-invariant
                assert torch.all(p == p[0]), f"{n}: gains must be constant in the O(d) regime"
                continue
            p.copy_(p @ Rf if res[0].axis == 1 else (Rf.T @ p if p.dim() == 2 else p @ Rf))


def _constant_gain_model():
    m = tiny_model("llama", seed=1)
    spec = hf_gauge.get_spec(m)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if any(a.space == "residual" and not a.signed for a in axes_for(spec, n) or ()):
                p.fill_(1.0)
    return m


def test_rotated_constant_gain_model_recovered(ids):
    A = _constant_gain_model()
    assert A.symmetry_group(warn=False) == "O(d)"
    R = _haar(A.config.hidden_size, 1)
    B = copy.deepcopy(A)
    _rotate_model(B, R)
    with torch.no_grad():                      # the rotation is a symmetry of this model: same logits
        torch.testing.assert_close(A(ids).logits, B(ids).logits, atol=1e-4, rtol=1e-4)
    data = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    om = A.gauge_to(B, data=data, method="procrustes", progress=False)
    assert isinstance(om, OrthogonalMap) and om.source == hf_gauge.describe(A)
    torch.testing.assert_close(om.R, R, atol=1e-4, rtol=0)
    diag = om.diagnostics()
    assert abs(diag["dist_identity"] / diag["dist_identity_random"] - 1) < 0.2
    assert diag["dist_signed_permutation"] > 5 and diag["ks_pvalue"] > 1e-3
    with torch.no_grad():
        hA = A(data, output_hidden_states=True).hidden_states[2]
        hB = B(data, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(om.transport(hA), hB, atol=1e-3, rtol=1e-3)


def test_gauge_equivalent_models_give_a_signed_permutation(ids):
    A = tiny_model("llama")
    B = copy.deepcopy(A)
    hidden = hf_gauge.random_gauge(B, seed=7)
    B.apply_gauge(hidden)
    data = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    om = hf_gauge.find_gauge(A, B, data=data, method="procrustes", progress=False)
    diag = om.diagnostics()
    assert diag["dist_signed_permutation"] < 1e-4
    assert om.nearest_signed_permutation().element == hidden.residual
    torch.testing.assert_close(om.R, hidden.residual.to_dense().T, atol=1e-5, rtol=0)
    v = torch.randn(5, 64)
    torch.testing.assert_close(om.transport(v), hidden.residual.apply(v), atol=1e-5, rtol=0)
    near_id = OrthogonalMap(torch.linalg.matrix_exp(0.01 * (lambda X: X - X.T)(torch.randn(64, 64, dtype=torch.float64))))
    assert near_id.diagnostics()["ks_pvalue"] < 1e-6                     # all angles near 0: not Haar


def test_sae_transport_preserves_codes_and_reconstructions():
    d, m = 16, 40
    R = _haar(d, 3)
    om = OrthogonalMap(R)
    g = torch.Generator().manual_seed(0)
    sae = {"W_enc": torch.randn(d, m, generator=g, dtype=torch.float64),
           "W_dec": torch.randn(m, d, generator=g, dtype=torch.float64),
           "b_enc": torch.randn(m, generator=g, dtype=torch.float64),
           "b_dec": torch.randn(d, generator=g, dtype=torch.float64), "threshold": torch.ones(m)}
    new = om.transport(sae)
    xa = torch.randn(7, d, generator=g, dtype=torch.float64)
    xb = xa @ R

    def encode(s, x):
        return torch.relu((x - s["b_dec"]) @ s["W_enc"] + s["b_enc"])

    def decode(s, f):
        return f @ s["W_dec"] + s["b_dec"]

    torch.testing.assert_close(encode(new, xb), encode(sae, xa))
    torch.testing.assert_close(decode(new, encode(new, xb)), decode(sae, encode(sae, xa)) @ R)
    assert new["b_enc"] is sae["b_enc"] and new["threshold"] is sae["threshold"]
    with pytest.raises(GaugeError, match="SAELens orientation"):
        om.transport({"W_enc": torch.zeros(m, d), "W_dec": torch.zeros(m, d)})
    with pytest.raises(GaugeError, match="width mismatch"):
        om.transport(torch.zeros(3, d + 1))


def test_apply_refuses_orthogonal_maps():
    A = tiny_model("llama")
    om = OrthogonalMap(_haar(64, 0))
    for bad in (om, om.R, om.R.numpy()):
        with pytest.raises(GaugeError, match="only signed permutations commute with a diagonal gain"):
            A.apply_gauge(bad)
    with pytest.raises(GaugeError, match="expects a hf_gauge.Gauge"):
        hf_gauge.apply_gauge(A, "not a gauge")
    with pytest.raises(GaugeError, match="not orthogonal"):
        OrthogonalMap(torch.ones(4, 4))


def test_inverse_and_composition():
    R1, R2 = _haar(8, 1), _haar(8, 2)
    a, b = OrthogonalMap(R1), OrthogonalMap(R2)
    v = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close((b @ a).transport(v), b.transport(a.transport(v)))
    torch.testing.assert_close(a.inverse().transport(a.transport(v)), v)
    assert math.isclose(a.diagnostics()["dist_identity_random"], 4.0)
