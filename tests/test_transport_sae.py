"""SAEs: on the gauged model, the transported SAE gives the original's codes and NMSE; permutation-only does not."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import tiny_model, permutation_only

import hf_gauge
from hf_gauge import Gauge, GaugeError, SignedPermutation, apply_gauge, random_gauge

from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, SAE, StandardSAE, StandardSAEConfig  # noqa: E402
from sae_lens.saes.sae import SAEMetadata  # noqa: E402

LAYER = 15   # middle of SmolLM2's 30 blocks; hook_resid_pre of block 15 = hidden_states[15]


def nmse(sae, x: torch.Tensor) -> float:
    with torch.no_grad():
        xh = sae.decode(sae.encode(x))
    return float(((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def codes(sae, x):
    with torch.no_grad():
        return sae.encode(x)


@pytest.fixture(scope="module")
def real(smollm2_dir, smollm2_ids):
    """Residual activations of real SmolLM2-135M at block 15, in the original and in a gauged copy."""
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    g = random_gauge(m, seed=5, spaces=("residual",))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # a shared 2-core machine: one thread is faster than two contended ones
    try:
        return _real_acts(m, g, smollm2_ids)
    finally:
        torch.set_num_threads(threads)


def _real_acts(m, g, smollm2_ids):
    with torch.no_grad():
        xa = m(smollm2_ids, output_hidden_states=True).hidden_states[LAYER].reshape(-1, m.config.hidden_size)
        apply_gauge(m, g)
        xb = m(smollm2_ids, output_hidden_states=True).hidden_states[LAYER].reshape(-1, m.config.hidden_size)
    return xa.clone(), xb.clone(), g


def _steps(steps, x, scale, w_enc, w_dec, b_enc, b_dec, opt) -> None:
    for _ in range(steps):
        f = torch.relu((x - b_dec) @ w_enc + b_enc)
        loss = ((f @ w_dec + b_dec - x).pow(2).sum(1).mean() / scale
                + 1e-4 * (f * w_dec.norm(dim=1)).sum(1).mean() / scale.sqrt())
        opt.zero_grad()
        loss.backward()
        opt.step()


def _train_sae(x: torch.Tensor, d_sae: int = 512, steps: int = 250, seed: int = 0) -> StandardSAE:
    """A small ReLU SAE trained on ``x`` (plain tensors for speed), loaded into a SAELens ``StandardSAE``."""
    gen = torch.Generator().manual_seed(seed)
    d = x.shape[1]
    scale = x.pow(2).sum(1).mean()
    b_dec = x.mean(0).clone().requires_grad_(True)
    w_dec = torch.randn(d_sae, d, generator=gen)
    w_dec = (w_dec / w_dec.norm(dim=1, keepdim=True) * 0.1).requires_grad_(True)
    w_enc = w_dec.detach().T.clone().requires_grad_(True)
    b_enc = torch.zeros(d_sae, requires_grad=True)
    opt = torch.optim.Adam([w_enc, w_dec, b_enc, b_dec], lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # many small steps: one thread is much faster on a shared 2-core machine
    try:
        _steps(steps, x, scale, w_enc, w_dec, b_enc, b_dec, opt)
    finally:
        torch.set_num_threads(threads)
    sae = StandardSAE(
StandardSAEConfig(d_in=d, d_sae=d_sae,
                                        metadata=SAEMetadata(hook_name=f"blocks.{LAYER}.hook_resid_pre")))
    sae.load_state_dict({"W_enc": w_enc.detach(), "W_dec": w_dec.detach(), "b_enc": b_enc.detach(),
                         "b_dec": b_dec.detach()})
    return sae.eval()


def test_sae_on_real_smollm2(real):
    xa, xb, g = real
    assert torch.allclose(g.residual.apply(xa), xb, atol=1e-3, rtol=1e-3)   # the gauged model's chart
    sae = _train_sae(xa)
    base = nmse(sae, xa)
    assert base < 0.5, base                                        # it learned something
    before = {k: v.clone() for k, v in sae.state_dict().items()}

    sae_b = g.transport(sae)
    assert type(sae_b) is type(sae) and sae_b is not sae
    for k, v in sae.state_dict().items():                           # input untouched
        assert torch.equal(v, before[k])
    assert sae_b.cfg.d_sae == sae.cfg.d_sae
    rec = sae_b.cfg.metadata["hf_gauge"][-1]
    assert rec["space"] == "residual" and len(rec["fingerprint"]) == 16
    ca, cb = codes(sae, xa), codes(sae_b, xb)
    assert (ca > 0).float().mean() > 0.005
    assert torch.allclose(ca, cb, atol=2e-4, rtol=1e-4), (ca - cb).abs().max()
    assert torch.equal(ca > 1e-3, cb > 1e-3) or ((ca > 1e-3) != (cb > 1e-3)).float().mean() < 1e-4
    assert abs(nmse(sae_b, xb) - base) < 1e-4 * max(base, 1e-3) + 1e-6

    bad = nmse(permutation_only(g).transport(sae), xb)
    raw = nmse(sae, xb)
    assert bad > 0.1 and bad > 50 * base, (bad, base)             # measured: 0.314 vs 0.00089
    assert raw > base + 0.3, (raw, base)


def test_sae_folder_roundtrip(real, tmp_path):
    xa, xb, g = real
    torch.manual_seed(1)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=576, d_sae=64, metadata=SAEMetadata(hook_name=f"blocks.{LAYER}.hook_resid_pre")))
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.05)
        sae.b_dec.normal_()
        sae.threshold.uniform_(0.0, 0.5)
    src = tmp_path / "sae"
    sae.save_model(src)
    files_before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = hf_gauge.transport_path(g, src, tmp_path / "sae_b")
    assert {p.name: p.read_bytes() for p in src.iterdir()} == files_before
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["metadata"]["hf_gauge"][-1]["fingerprint"] == json.loads(
        (out / "hf_gauge_transport.json").read_text())["fingerprint"]
    sae_b = SAE.load_from_disk(out)
    assert type(sae_b) is JumpReLUSAE
    assert torch.equal(sae_b.threshold, sae.threshold) and torch.equal(sae_b.b_enc, sae.b_enc)
    assert torch.allclose(codes(sae_b, xb), codes(sae, xa), atol=2e-4, rtol=1e-4)
    with pytest.raises(GaugeError, match="overwrite"):
        hf_gauge.transport_path(g, src, src)
    with pytest.raises(GaugeError, match="not empty"):
        hf_gauge.transport_path(g, src, out)


def test_sae_plain_dict_is_exact_and_checks_width():
    torch.manual_seed(0)
    d, m = 16, 40
    g = Gauge(residual=SignedPermutation.random(d, 3))
    sd = {"W_enc": torch.randn(d, m), "W_dec": torch.randn(m, d), "b_enc": torch.randn(m), "b_dec": torch.randn(d),
          "threshold": torch.rand(m)}
    new = g.transport(sd)
    q = g.residual.to_dense()
    assert torch.equal(new["W_enc"].double(), q @ sd["W_enc"].double())       # rows: Q W_enc
    assert torch.equal(new["W_dec"].double(), sd["W_dec"].double() @ q.T)     # columns: W_dec Q^T
    assert torch.equal(new["b_dec"], g.residual.apply(sd["b_dec"]))
    assert torch.equal(new["threshold"], sd["threshold"]) and torch.equal(new["b_enc"], sd["b_enc"])
    assert torch.equal(g.inverse().transport(new)["W_enc"], sd["W_enc"])       # bit-exact round trip
    with pytest.raises(GaugeError, match="W_enc"):
        g.transport({**sd, "W_enc": torch.randn(d + 1, m)})
    with pytest.raises(GaugeError, match="whitening"):
        g.transport({**sd, "whitening": torch.randn(d, d)})


def test_layer_norm_sae_refuses_mixed_signs():
    d = 24
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=32, normalize_activations="layer_norm"))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    mixed = Gauge(residual=SignedPermutation.random(d, 0, positive_fraction=0.5))
    with pytest.raises(GaugeError, match="layer_norm"):
        mixed.transport(sae)
    x = torch.randn(10, d)
    for el in (SignedPermutation(mixed.residual.perm), SignedPermutation(mixed.residual.perm, -torch.ones(d))):
        moved = Gauge(residual=el).transport(sae)                  # permutations and one global flip are fine
        assert torch.allclose(codes(moved, el.apply(x)), codes(sae, x), atol=1e-5)


def test_mlp_neuron_sae(ids):
    """An SAE on SwiGLU units of layer 0 (hook blocks.0.mlp.hook_post -> space mlp.0)."""
    a = tiny_model("llama", seed=2)
    g = random_gauge(a, seed=4, spaces=("residual", "mlp", "attn"))
    b = apply_gauge(copy.deepcopy(a), g)

    def acts(model):
        got = {}
        h = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda mod, inp: got.setdefault("x", inp[0]))
        with torch.no_grad():
            model(ids)
        h.remove()
        return got["x"].reshape(-1, model.config.intermediate_size)

    xa, xb = acts(a), acts(b)
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=96, d_sae=48, metadata=SAEMetadata(hook_name="blocks.0.mlp.hook_post")))
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.2)
        sae.b_dec.normal_(0, 0.1)
    sae_b = g.transport(sae)
    assert sae_b.cfg.metadata["hf_gauge"][-1]["space"] == "mlp.0"
    assert torch.allclose(codes(sae_b, xb), codes(sae, xa), atol=1e-5)
    assert abs(nmse(sae_b, xb) - nmse(sae, xa)) < 1e-5 * nmse(sae, xa)
    assert not torch.allclose(codes(permutation_only(g).transport(sae), xb), codes(sae, xa), atol=1e-2)
    with pytest.raises(GaugeError, match="width mismatch"):
        g.transport(sae, space="residual")                          # 96 MLP units are not the residual width
    z = StandardSAE(StandardSAEConfig(d_in=64, d_sae=8, metadata=SAEMetadata(hook_name="blocks.0.attn.hook_z")))
    with pytest.raises(GaugeError, match="hook_z"):
        g.transport(z)
