"""Claim `procrustes`: independently trained models differ by a near-orthogonal map of the residual stream.

Two small Llama-architecture models (d=128, 4 layers, heads 4/2, SwiGLU d_ff 384, RMSNorm with trained gains,
byte-level vocabulary of 256, untied embeddings) are trained from different init seeds (0 and 1) on the same real
text (Botchan, same batches). At the input of layer 2 (the middle), a TopK SAE is trained on each seed's residual
activations. Then, on held-out text:
- cross-seed explained variance (EV = 1 - NMSE) of seed-0's SAE on seed-1's activations, before and after the
  Procrustes map ``R = find_gauge(m0, m1, data=..., method="procrustes")`` (``OrthogonalMap.transport(sae)``), next
  to the within-seed ceiling (seed-1's own SAE);
- decoder "universality": mean over seed-0 features of the max cosine with seed-1's decoder rows, raw and after R;
- ``OrthogonalMap.diagnostics()``: ``||R - I||_F`` vs ``sqrt(2d)``, distance to the nearest signed permutation, KS
  p-value of R's eigenvalue angles against Haar samples.
R is fitted two ways: pooled over every residual site (the library default) and at the SAE's site only. Controls:
the same diagnostics for a random signed permutation (``control_*``: a gauge, which ``||R - I||`` and the KS test do
not tell from a rotation) and a Haar rotation (``haar_*``), plus the peak mass per row (``peak_mass``), which does;
and a same-model ceiling for the decoder cosine (two SAE seeds on seed-0's own activations). Three model pairs in the
full mode (init seeds 0/1, 2/3, 4/5), one in the quick mode.
Paper (Pythia-70m, 9 seeds): EV negative before, within 0.025 of the within-seed ceiling after; decoder cosine ~98%;
``||R - I||_F`` = sqrt(2d) to 0.1%; KS p ~ 1.0 (Haar). Note: Pythia uses LayerNorm; ours RMSNorm with trained gains,
where only signed permutations are exact symmetries, so R need not be Haar.
Usage: python benchmarks/claim_procrustes.py [--quick]
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import claims_common as cc  # noqa: E402
import hf_gauge  # noqa: E402
from claim_sae import sae_forward, train_sae  # noqa: E402

PAPER = {"ev_before": "negative", "ev_after_gap_to_ceiling": 0.025, "decoder_cos": 0.98,
         "dist_identity_over_sqrt2d": 1.0, "ks_p": 1.0,
         "text": "EV < 0 before R, within 0.025 of ceiling after; decoder cos 98%; ||R-I|| = sqrt(2d); KS p ~ 1"}
LAYER = 2


def trained(seed: int, quick: bool) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A tiny Llama trained from init ``seed`` (cached under ~/.cache/hf_gauge/bench/procrustes)."""
    from transformers import AutoModelForCausalLM
    steps, batch, T, lr = (60, 8, 64, 3e-3) if quick else (800, 16, 64, 3e-3)
    folder = cc.bench_cache() / ("procrustes_quick" if quick else "procrustes") / f"seed{seed}_s{steps}"
    meta = folder / "train_meta.json"
    if meta.exists():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), json.loads(meta.read_text())
    model = cc.tiny_llama(seed)
    ids = cc.split_ids(cc.byte_ids(cc.botchan_text()))[0]
    t0 = time.perf_counter()
    losses, _ = cc.train_lm(model, ids, steps, batch=batch, T=T, lr=lr, data_seed=0, log_every=100)
    info = {"steps": steps, "batch": batch, "T": T, "lr": lr, "loss_first": losses[0],
            "loss_last": sum(losses[-20:]) / len(losses[-20:]), "train_s": time.perf_counter() - t0}
    model.save_pretrained(folder)
    meta.write_text(json.dumps(info))
    return model.eval(), info


@torch.no_grad()
def resid(model: torch.nn.Module, ids: torch.Tensor, layer: int = LAYER) -> torch.Tensor:
    hs = model(input_ids=ids, output_hidden_states=True).hidden_states[layer]
    return hs.reshape(-1, hs.shape[-1]).float()


def mmcs(W1: torch.Tensor, W2: torch.Tensor) -> float:
    """Mean over rows of W1 of the max cosine with a row of W2."""
    a = torch.nn.functional.normalize(W1.double(), dim=1)
    b = torch.nn.functional.normalize(W2.double(), dim=1)
    return float((a @ b.T).max(dim=1).values.mean())


def peak_mass(R: torch.Tensor) -> float:
    """Mean over rows of an orthogonal matrix of the largest squared entry (each row's squares sum to 1): 1 for a
    signed permutation, about ``2 ln(d) / d`` for a Haar-random rotation. Unlike ``||R - I||_F`` and the eigenvalue-
    angle KS test, it separates the two."""
    return float((R.double() ** 2).max(dim=1).values.mean())


HEADLINE = ["ev_cross_before", "ev_cross_after_site_R", "ev_gap_after_site_R_to_ceiling", "decoder_mmcs_raw",
            "decoder_mmcs_after_R", "decoder_mmcs_same_model_sae_seeds", "site_peak_mass", "control_peak_mass",
            "site_dist_identity_over_sqrt2d", "site_ks_pvalue"]


def one_pair(s0: int, s1: int, q: bool) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(measured, diagnostics, training info) for the models trained from init seeds ``s0`` and ``s1``."""
    m0, info0 = trained(s0, q)
    m1, info1 = trained(s1, q)
    held = cc.split_ids(cc.byte_ids(cc.botchan_text()))[1]
    n_tr, n_te, n_fit, T = (32, 16, 8, 64) if q else (256, 64, 32, 128)
    train_ids = cc.windows(held[: len(held) // 2], n_tr, T, seed=1)
    fit_ids = cc.windows(held[: len(held) // 2], n_fit, T, seed=2)
    test_ids = cc.strided_windows(held[len(held) // 2:], n_te, T)
    m_sae, k, steps = (256, 8, 300) if q else (512, 16, 3000)
    x0_tr, x1_tr = resid(m0, train_ids), resid(m1, train_ids)
    sae0 = train_sae(x0_tr, m_sae, k, steps, seed=s0)
    sae1 = train_sae(x1_tr, m_sae, k, steps, seed=s1)   # independent SAE init: shared init would fake "universality"
    sae0b = train_sae(x0_tr, m_sae, k, steps, seed=100 + s0)   # same model, another SAE seed: the cosine's ceiling
    x0, x1 = resid(m0, test_ids), resid(m1, test_ids)
    ev = lambda s, x: 1.0 - cc.nmse(sae_forward(s, x, k), x)  # noqa: E731
    R_pool = hf_gauge.find_gauge(m0, m1, data=fit_ids, method="procrustes")
    R_site = hf_gauge.find_gauge(m0, m1, data=fit_ids, method="procrustes", layers=[LAYER], include_embed=False,
                                 include_final_norm=False)
    g_signed = hf_gauge.find_gauge(m0, m1, data=fit_ids, method="signed")
    sd0 = {kk: v for kk, v in sae0.items()}
    d = x0.shape[1]
    measured: dict[str, Any] = {
        "ev_within_seed0": ev(sae0, x0), "ev_within_seed1_ceiling": ev(sae1, x1),
        "ev_cross_before": ev(sae0, x1),
        "ev_cross_after_pooled_R": ev(R_pool.transport(sd0), x1),
        "ev_cross_after_site_R": ev(R_site.transport(sd0), x1),
        "ev_cross_after_signed_perm": ev(g_signed.transport(sd0), x1),
        "decoder_mmcs_raw": mmcs(sae0["W_dec"], sae1["W_dec"]),
        "decoder_mmcs_after_R": mmcs(R_site.transport(sd0)["W_dec"], sae1["W_dec"]),
        "decoder_mmcs_same_model_sae_seeds": mmcs(sae0["W_dec"], sae0b["W_dec"]),
    }
    # a reference for "universality": the same metric against a randomly rotated copy of seed-0's own decoder
    Qr = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(5 + s0), dtype=torch.float64))[0]
    measured["decoder_mmcs_seed0_vs_random_rotation"] = mmcs(sae0["W_dec"], sae0["W_dec"].double() @ Qr)
    measured["ev_gap_after_site_R_to_ceiling"] = measured["ev_within_seed1_ceiling"] - measured["ev_cross_after_site_R"]
    # the control: a random signed permutation, put through the same diagnostics (it is what a gauge would be)
    P = hf_gauge.SignedPermutation.random(d, 7 + s0).to_dense()
    diag = {}
    for name, R in (("pooled", R_pool), ("site", R_site), ("control", hf_gauge.OrthogonalMap(P)),
                    ("haar", hf_gauge.OrthogonalMap(Qr))):
        dg = R.diagnostics()
        diag[name] = dg
        measured[f"{name}_dist_identity"] = dg["dist_identity"]
        measured[f"{name}_dist_identity_over_sqrt2d"] = dg["dist_identity"] / dg["dist_identity_random"]
        measured[f"{name}_dist_signed_permutation"] = dg["dist_signed_permutation"]
        measured[f"{name}_dist_signed_permutation_over_sqrt2d"] = dg["dist_signed_permutation"] / dg[
            "dist_identity_random"]
        measured[f"{name}_ks_pvalue"] = dg["ks_pvalue"]
        measured[f"{name}_peak_mass"] = peak_mass(R.R)
    measured["sqrt_2d"] = math.sqrt(2 * d)
    measured["symmetry_group_seed0"] = hf_gauge.symmetry_group(m0, warn=False)
    for kk, v in measured.items():
        print(f"pair {s0}/{s1} {kk:42s} {v}", flush=True)
    setup = {"train": {"seed0": info0, "seed1": info1}, "sae": f"TopK k={k}, m={m_sae}, {steps} Adam steps",
             "fit_tokens": int(fit_ids.numel()), "test_tokens": int(test_ids.numel()),
             "symmetry_group": measured.pop("symmetry_group_seed0")}
    return measured, diag, setup


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, t_start = cc.start(__doc__, argv)
    q = args.quick
    pairs = [(0, 1)] if q else [(0, 1), (2, 3), (4, 5)]
    runs = [one_pair(s0, s1, q) for s0, s1 in pairs]
    measured, spread = cc.over_seeds([r[0] for r in runs], HEADLINE)
    su = runs[0][2]
    one = lambda k, lab: cc.bar(spread, measured, k, lab) if k in spread else (lab, measured[k], measured[k],  # noqa
                                                                                measured[k])
    fig = cc.bar_figure("procrustes", q, [
        {"ylabel": "explained variance on the other seed (1 - NMSE)",
         "bars": [one("ev_cross_before", "before R"), one("ev_cross_after_site_R", "after R (site)"),
                  one("ev_cross_after_pooled_R", "after R (pooled)"),
                  one("ev_cross_after_signed_perm", "nearest signed perm."),
                  one("ev_within_seed1_ceiling", "within-seed ceiling")],
         "paper": {"after R (site)": measured["ev_within_seed1_ceiling"] - PAPER["ev_after_gap_to_ceiling"]},
         "hlines": [(0.0, "")]},
        {"ylabel": "decoder mean max cosine", "bars": [
            one("decoder_mmcs_raw", "cross-seed, raw"), one("decoder_mmcs_after_R", "cross-seed, after R"),
            one("decoder_mmcs_seed0_vs_random_rotation", "random rotation"),
            one("decoder_mmcs_same_model_sae_seeds", "same model, 2 SAE seeds")],
         "paper": {"cross-seed, raw": PAPER["decoder_cos"]}},
        {"ylabel": "peak mass per row (mean max squared entry)", "bars": [
            one("site_peak_mass", "R (site)"), one("control_peak_mass", "random signed perm."),
            one("haar_peak_mass", "Haar rotation")]}],
        title=f"Procrustes between tiny Llamas from different init seeds ({len(pairs)} pair(s))")
    res = {"claim": "procrustes", "paper": PAPER, "figure": cc.figure_ref(fig),
           "seeds": {"model_init_pairs": pairs, "train_batches": 0, "sae_init": "the model's init seed (same-model "
                     "ceiling: 100 + seed)", "sae_windows": [1, 2], "random_rotation": "5 + first seed",
                     "control_signed_permutation": "7 + first seed"},
           "measured": measured, "spread": spread,
           "ours_bd": f"EV before {measured['ev_cross_before']:.3f} -> after R {measured['ev_cross_after_site_R']:.3f} "
                      f"(ceiling {measured['ev_within_seed1_ceiling']:.3f}); peak mass per row of R "
                      f"{measured['site_peak_mass']:.3f} (random signed permutation 1, Haar rotation "
                      f"{measured['haar_peak_mass']:.3f}); ||R-I||/sqrt(2d) "
                      f"{measured['site_dist_identity_over_sqrt2d']:.3f} (control "
                      f"{measured['control_dist_identity_over_sqrt2d']:.3f})",
           "ours_baseline": f"signed-perm map EV {measured['ev_cross_after_signed_perm']:.3f}; decoder MMCS raw "
                            f"{measured['decoder_mmcs_raw']:.3f} (vs random rotation "
                            f"{measured['decoder_mmcs_seed0_vs_random_rotation']:.3f}; same-model SAE seeds "
                            f"{measured['decoder_mmcs_same_model_sae_seeds']:.3f}; paper 0.98)",
           "diagnostics": {f"{a}/{b}": r[1] for (a, b), r in zip(pairs, runs)},
           "setup": {"models": "LlamaForCausalLM d=128, 4 layers, heads 4/2, d_ff 384, bytes; init seed pairs "
                               + ", ".join(f"{a}/{b}" for a, b in pairs),
                     "train": su["train"],
                     "train_by_pair": {f"{a}/{b}": r[2]["train"] for (a, b), r in zip(pairs, runs)},
                     "site": f"input of layers[{LAYER}]", "sae": su["sae"], "fit_tokens": su["fit_tokens"],
                     "test_tokens": su["test_tokens"], "symmetry_group": su["symmetry_group"]}}
    return cc.finish(res, q, t_start,
                     model="pairs of tiny Llamas (d=128, 4 layers, bytes) trained from different init seeds on Botchan")


if __name__ == "__main__":
    main()
