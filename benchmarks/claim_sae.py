"""Claim `sae`: an SAE transported under B_d reconstructs the gauged model's activations; under S_d it fails.

A TopK SAE (SAELens orientation: ``W_enc [d, m]``, ``W_dec [m, d]``, ``b_enc``, ``b_dec``; encoder reads
``x - b_dec``) is trained on real SmolLM2-135M residual activations at the input of layer 15 (``hook_resid_pre``,
the middle of 30 layers), then moved with ``gauge.transport(sae_dict)`` to
1. the same model in a hidden random B_d gauge (gauge found by ``find_gauge(base, gauged, data=...)``), and
2. a fine-tuned + gauged model (the "pydoc" endpoint of claim `trajectory`, exported in a random gauge; trained
   first when its checkpoints are not cached).
Transport under B_d (the found gauge) vs two S_d baselines, side by side: "S_d matched" is permutation-only matching
as a user would run it (``find_gauge(..., method="permutation")``), "S_d oracle" the found B_d permutation with every
sign set to +1 (``Gauge(residual=SignedPermutation(perm))``: the true permutation, no signs), vs none. The signs of
the found gauge at the target's top-variance coordinates are measured and reported. NMSE = ||x_hat - x||^2 / ||x -
mean||^2 on held-out tokens, with and without position 0 of each window (``*_excl_pos0``: the attention-sink token,
whose few huge coordinates carry most of the variance). Three seeds (SAE init and batches, training windows, hidden
gauge); the quick mode runs one.
Paper (TinyLlama): NMSE 0.004 under B_d vs 1.08 under S_d.
Usage: python benchmarks/claim_sae.py [--quick]
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import claims_common as cc  # noqa: E402
import hf_gauge  # noqa: E402
import verdicts as V  # noqa: E402

PAPER = {"bd_nmse": 0.004, "sd_nmse": 1.08, "text": "TinyLlama SAE NMSE 0.004 (B_d) vs 1.08 (S_d)"}
LAYER = 15


@torch.no_grad()
def resid(model: torch.nn.Module, ids: torch.Tensor, layer: int = LAYER, bs: int = 8) -> torch.Tensor:
    """Residual activations at the input of ``model.layers[layer]`` (hidden_states[layer]), rows = tokens."""
    out = []
    for i in range(0, ids.shape[0], bs):
        hs = model(input_ids=ids[i:i + bs], output_hidden_states=True).hidden_states[layer]
        out.append(hs.reshape(-1, hs.shape[-1]).float())
    return torch.cat(out)


def sae_forward(sae: dict[str, torch.Tensor], x: torch.Tensor, k: int) -> torch.Tensor:
    """TopK SAE reconstruction (SAELens orientation, b_dec subtracted from the input)."""
    pre = (x - sae["b_dec"]) @ sae["W_enc"] + sae["b_enc"]
    top = torch.topk(pre, k, dim=-1)
    f = torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))
    return f @ sae["W_dec"] + sae["b_dec"]


def train_sae(x: torch.Tensor, m: int, k: int, steps: int, lr: float = 1e-3, bs: int = 256,
              seed: int = 0) -> dict[str, torch.Tensor]:
    """A TopK SAE trained with Adam on the rows of ``x`` (decoder rows kept at unit norm)."""
    g = torch.Generator().manual_seed(seed)
    d = x.shape[1]
    W_dec = torch.randn(m, d, generator=g)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    params = {"W_enc": W_dec.t().clone().requires_grad_(), "W_dec": W_dec.clone().requires_grad_(),
              "b_enc": torch.zeros(m, requires_grad=True), "b_dec": x.mean(0).clone().requires_grad_()}
    opt = torch.optim.Adam(params.values(), lr=lr)
    scale = float((x - x.mean(0)).pow(2).sum(1).mean())
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (bs,), generator=g)
        xb = x[idx]
        loss = (sae_forward(params, xb, k) - xb).pow(2).sum(1).mean() / scale
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            params["W_dec"] /= params["W_dec"].norm(dim=1, keepdim=True)
    return {n: p.detach().clone() for n, p in params.items()}


def fine_tuned_gauged(quick: bool) -> tuple[torch.nn.Module, str]:
    """(a fine-tuned model in a random chart, description): ``claim_trajectory``'s pydoc endpoint (its current
    SmolLM2 fine-tuning recipe; trained first when not cached), as exported in its random gauge."""
    import claim_trajectory as ct
    ft = ct.finetuned_endpoint("pydoc", quick)
    return ft["regauged"], ft["desc"]


def nmse_excl_pos0(x_hat: torch.Tensor, x: torch.Tensor, T: int) -> float:
    """NMSE over the rows that are not position 0 of their window (rows are window-major, ``T`` per window): position
    0 is the attention-sink token, whose few huge coordinates dominate the variance otherwise."""
    keep = torch.arange(x.shape[0]) % T != 0
    return cc.nmse(x_hat[keep], x[keep])


def variance_share_pos0(x: torch.Tensor, T: int) -> float:
    """Share of the total sum of squares about the mean (the NMSE denominator) carried by position-0 rows."""
    ss = ((x.double() - x.double().mean(0)) ** 2).sum(1)
    return float(ss[torch.arange(x.shape[0]) % T == 0].sum() / ss.sum())


HEADLINE = ["within_model_nmse_excl_pos0", "gauged_bd_nmse_excl_pos0", "gauged_sd_matched_nmse_excl_pos0",
            "gauged_sd_nmse_excl_pos0", "ft_gauged_sd_matched_nmse_excl_pos0", "gauged_bd_nmse",
            "gauged_sd_matched_nmse", "gauged_sd_nmse"]


def one_seed(seed: int, base: torch.nn.Module, ft: torch.nn.Module, ft_desc: str, data: dict[str, Any],
             q: bool) -> tuple[dict[str, float], dict[str, Any]]:
    """(measured, details) for one seed: the SAE's init and batches, its training windows and the hidden gauge."""
    T, k, m, steps = data["T"], data["k"], data["m"], data["steps"]
    train_ids = torch.cat([cc.windows(data["novel_train"], data["n_train"] // 2, T, 1 + 2 * seed),
                           cc.windows(data["pydoc_train"], data["n_train"] // 2, T, 2 + 2 * seed)])
    test_ids = data["test_ids"]
    t0 = time.perf_counter()
    sae = train_sae(resid(base, train_ids), m, k, steps, seed=seed)
    t_sae = time.perf_counter() - t0
    x_test = resid(base, test_ids)
    within = sae_forward(sae, x_test, k)
    results: dict[str, Any] = {"within_model_nmse": cc.nmse(within, x_test), "sae_train_s": t_sae,
                               "within_model_nmse_excl_pos0": nmse_excl_pos0(within, x_test, T),
                               "variance_share_pos0": variance_share_pos0(x_test, T)}
    targets = {"gauged": (cc.gauged_copy(base, hf_gauge.random_gauge(base, seed=41 + seed)),
                          f"base in random_gauge(seed={41 + seed})"),
               "finetuned_gauged": (ft, ft_desc)}
    for name, (target, desc) in targets.items():
        g = hf_gauge.find_gauge(base, target, data=data["match_ids"], **data["match_kw"])
        g_sd = hf_gauge.Gauge(residual=cc.permutation_only(g.residual))
        g_sdm = hf_gauge.find_gauge(base, target, data=data["match_ids"], method="permutation", **data["match_kw"])
        x_t = resid(target, test_ids)
        var = x_t.double().var(0)
        top = var.argsort(descending=True)[:5]
        rec = {lab: sae_forward(gg.transport(sae), x_t, k)
               for lab, gg in (("bd", g), ("sd", g_sd), ("sd_matched", g_sdm))}
        rec["untransported"] = sae_forward(sae, x_t, k)
        r: dict[str, Any] = {"target": desc}
        for lab, x_hat in rec.items():
            r[f"{lab}_nmse"] = cc.nmse(x_hat, x_t)
            r[f"{lab}_nmse_excl_pos0"] = nmse_excl_pos0(x_hat, x_t, T)
            r[f"{lab}_nmse_per_coordinate"] = cc.nmse_per_coordinate(x_hat, x_t)
        r.update({"sd_matched_index_accuracy_vs_bd": float((g_sdm.residual.perm == g.residual.perm).double().mean()),
                  "top5_variance_coordinates": top.tolist(),
                  "top5_variance_gauge_signs": g.residual.sign[top].tolist(),
                  "top5_variance_sd_matched_signs_right": float((g_sdm.residual.perm[top] == g.residual.perm[top])
                                                                .double().mean()),
                  "variance_share_top5_coordinates": float(var.sort(descending=True).values[:5].sum() / var.sum()),
                  "variance_share_pos0": variance_share_pos0(x_t, T),
                  "positive_fraction_of_gauge": g.residual.positive_fraction,
                  "gauge_mean_matched": g.metrics.get("mean_matched")})
        results[name] = r
        print(f"seed {seed}", name, json.dumps(r), flush=True)
    measured = {k_: results[k_] for k_ in ("within_model_nmse", "within_model_nmse_excl_pos0", "variance_share_pos0")}
    measured["within_model_nmse_per_coordinate"] = cc.nmse_per_coordinate(within, x_test)
    measured["variance_share_top5_coordinates"] = results["gauged"]["variance_share_top5_coordinates"]
    for pre, key in (("gauged", "gauged"), ("ft_gauged", "finetuned_gauged")):
        r = results[key]
        for lab in ("bd", "sd", "sd_matched", "untransported"):
            for suffix in ("", "_excl_pos0", "_per_coordinate"):
                if lab != "untransported" or suffix != "_per_coordinate":
                    measured[f"{pre}_{lab}_nmse{suffix}"] = r[f"{lab}_nmse{suffix}"]
        measured[f"{pre}_top5_variance_positive_signs"] = sum(1 for x in r["top5_variance_gauge_signs"] if x > 0)
        measured[f"{pre}_top5_variance_sd_matched_index_right"] = r["top5_variance_sd_matched_signs_right"]
    return measured, results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, t_start = cc.start(__doc__, argv)
    base, tok = cc.load_base()
    q = args.quick
    seeds = [0] if q else [0, 1, 2]
    n_train, n_test, T = (24, 8, 64) if q else (160, 32, 64)
    m, k, steps = (1152, 32, 150) if q else (4608, 32, 3000)
    novel = cc.split_ids(cc.tokenize_text(tok, cc.botchan_text()))
    pydoc = cc.split_ids(cc.tokenize_text(tok, cc.pydoc_text()))
    data = {"T": T, "k": k, "m": m, "steps": steps, "n_train": n_train, "novel_train": novel[0],
            "pydoc_train": pydoc[0],
            "test_ids": torch.cat([cc.strided_windows(novel[1], n_test // 2, T),
                                   cc.strided_windows(pydoc[1], n_test // 2, T)]),
            "match_ids": cc.matching_data(tok, 4 if q else 8, 32 if q else 64),
            "match_kw": {"layers": [0, 15, 29]} if q else {}}
    ft, ft_desc = fine_tuned_gauged(q)
    per_seed = [one_seed(s, base, ft, ft_desc, data, q) for s in seeds]
    measured, spread = cc.over_seeds([p[0] for p in per_seed], HEADLINE)
    details = {str(s): p[1] for s, p in zip(seeds, per_seed)}
    bars = lambda x: [cc.bar(spread, measured, f"within_model_nmse{x}", "within-model"),  # noqa: E731
                      cc.bar(spread, measured, f"gauged_bd_nmse{x}", "B_d"),
                      cc.bar(spread, measured, f"gauged_sd_matched_nmse{x}", "S_d matched"),
                      cc.bar(spread, measured, f"gauged_sd_nmse{x}", "S_d oracle"),
                      cc.bar(spread, measured, f"gauged_untransported_nmse{x}", "untransported")]
    fig = cc.bar_figure("sae", q, [
        {"ylabel": "NMSE, all tokens (log scale)", "bars": bars(""), "log": True,
         "paper": {"B_d": PAPER["bd_nmse"], "S_d oracle": PAPER["sd_nmse"]},
         "title": "all positions (paper: TinyLlama, all tokens)"},
        {"ylabel": "NMSE without position 0 (log scale)", "bars": bars("_excl_pos0"), "log": True,
         "hlines": [(V.FAIL_FACTOR * measured["within_model_nmse_excl_pos0"], f"S_d fails above {V.FAIL_FACTOR}x within")],
         "title": f"without the attention-sink token ({measured['variance_share_pos0']:.0%} of the variance)"}],
        title=f"SAE at SmolLM2-135M layer {LAYER}, base in a hidden gauge ({len(seeds)} seed(s))")
    res = {"claim": "sae", "paper": PAPER, "measured": measured, "spread": spread, "figure": cc.figure_ref(fig),
           "ours_bd": f"gauged {measured['gauged_bd_nmse']:.4f} ({measured['gauged_bd_nmse_excl_pos0']:.3f} without "
                      f"position 0), fine-tuned+gauged {measured['ft_gauged_bd_nmse']:.4f} (within-model "
                      f"{measured['within_model_nmse']:.4f}, {measured['within_model_nmse_excl_pos0']:.3f} without "
                      f"position 0)",
           "ours_baseline": f"without position 0: S_d matched (find_gauge method=permutation) gauged "
                            f"{measured['gauged_sd_matched_nmse_excl_pos0']:.3f}, fine-tuned+gauged "
                            f"{measured['ft_gauged_sd_matched_nmse_excl_pos0']:.3f}; S_d oracle (true permutation, "
                            f"signs +1) gauged {measured['gauged_sd_nmse_excl_pos0']:.3f} (with position 0: "
                            f"{measured['gauged_sd_nmse']:.3f})",
           "seeds": {"sae_init_and_batches": seeds, "hidden_gauge": [41 + s for s in seeds],
                     "train_windows": [[1 + 2 * s, 2 + 2 * s] for s in seeds], "finetuned_gauge": 77},
           "details": {**details["0"], "by_seed": details},
           "setup": {"layer": f"resid_pre of layer {LAYER}", "sae": f"TopK k={k}, m={m} ({m // 576}x d), Adam 1e-3, "
                                                                   f"{steps} steps of 256 tokens",
                     "train_tokens": n_train * T, "test_tokens": int(data["test_ids"].numel()), "T": T,
                     "sae_train_s": sum(p[1]["sae_train_s"] for p in per_seed)}}
    return cc.finish(res, q, t_start)


if __name__ == "__main__":
    main()
