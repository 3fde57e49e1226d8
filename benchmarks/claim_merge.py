"""Claim `merge`: a midpoint merge of two fine-tuning runs works after B_d alignment, degrades under S_d / none.

The two endpoints of claim `trajectory` (SmolLM2-135M fine-tuned on a Gutenberg novel and on the Python docs, each
saved in its own random B_d export gauge) are merged at weight 0.5 with ``hf_gauge.merge``:
- B_d: ``merge(a, b, method="signed", data=...)`` (gauge found by sign-marginalized matching of the endpoints);
- oracle: ``merge(a, b, gauge=<true export-gauge composition>)``;
- S_d found: ``merge(a, b, method="permutation", data=...)`` (Hungarian on the signed correlation);
- S_d same-perm: the B_d permutation with every sign +1;
- none: ``merge(a, b, method="none")`` (index-by-index average, as if the charts were the same).
Reported: mean next-token loss on held-out text of both runs (and of the endpoints and the base).
Paper: coordinate-preserving merges behave like transport (B_d works, permutation-only does not).
Usage: python benchmarks/claim_merge.py [--quick]  (trains the trajectory checkpoints first if missing)
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any


sys.path.insert(0, str(Path(__file__).resolve().parent))
import claims_common as cc  # noqa: E402
import claim_trajectory as ct  # noqa: E402
import hf_gauge  # noqa: E402

PAPER = {"text": "coordinate-preserving merges behave the same way as transport: B_d-aligned merge works, S_d does not"}


HEADLINE = ["bd_loss_mean", "oracle_loss_mean", "sd_found_loss_mean", "sd_same_perm_loss_mean", "none_loss_mean",
            "base_loss_mean", "novel_endpoint_loss_mean", "pydoc_endpoint_loss_mean"]
LABELS = {"base": "base", "novel_endpoint": "novel endpoint", "pydoc_endpoint": "pydoc endpoint", "bd": "B_d merge",
          "oracle": "oracle-gauge merge", "sd_found": "S_d matched merge", "sd_same_perm": "S_d oracle merge",
          "none": "no alignment"}


def one_seed(seed: int, q: bool, base_ref: Any, tok: Any) -> tuple[dict[str, float], dict[str, Any]]:
    """(measured, losses) for the trajectory runs of training seed ``seed`` (trained first if missing)."""
    cfg = ct.config(q)
    root = ct.ckpt_root(q, "smollm2", seed)
    for run in ct.RUNS:
        ct.train_run(run, q, "smollm2", seed)
    T = cfg["steps"]
    a = ct.load(ct.ckpt_dir(root, "novel", T))
    b = ct.load(ct.ckpt_dir(root, "pydoc", T))
    base = ct.load(root / "base")
    truth = ct.true_gauge(base_ref, "novel", T, "pydoc", T, seed)
    data = ct.corpora(tok)
    n_eval, T_eval = (4, 64) if q else (24, 128)
    evals = {r: cc.strided_windows(data[r][1], n_eval, T_eval) for r in ct.RUNS}
    match = cc.matching_data(tok, 4 if q else 8, 32 if q else 64)
    kw: dict[str, Any] = {"layers": [0, 15, 29]} if q else {}
    g_bd = hf_gauge.find_gauge(a, b, data=match, **kw)
    g_perm = hf_gauge.find_gauge(a, b, data=match, method="permutation", **kw)
    variants = {
        "bd": hf_gauge.merge(a, b, 0.5, gauge=g_bd),
        "oracle": hf_gauge.merge(a, b, 0.5, gauge=truth),
        "sd_found": hf_gauge.merge(a, b, 0.5, gauge=g_perm),
        "sd_same_perm": hf_gauge.merge(a, b, 0.5, gauge=hf_gauge.Gauge(residual=cc.permutation_only(g_bd.residual))),
        "none": hf_gauge.merge(a, b, 0.5, method="none"),
    }
    models = {"base": base, "novel_endpoint": a, "pydoc_endpoint": b, **variants}
    losses: dict[str, dict[str, float]] = {}
    for name, m in models.items():
        losses[name] = {r: cc.mean_loss(m, evals[r]) for r in ct.RUNS}
        losses[name]["mean"] = (losses[name]["novel"] + losses[name]["pydoc"]) / 2
        print(f"seed {seed} {name:14s} novel {losses[name]['novel']:.3f}  pydoc {losses[name]['pydoc']:.3f}",
              flush=True)
    measured = {f"{n}_loss_mean": v["mean"] for n, v in losses.items()}
    measured.update({f"{n}_loss_novel": v["novel"] for n, v in losses.items()})
    measured.update({f"{n}_loss_pydoc": v["pydoc"] for n, v in losses.items()})
    measured["bd_gauge_signed_accuracy"] = cc.recovery(g_bd.residual, truth.residual)["signed_accuracy"]
    measured["sd_found_index_accuracy"] = cc.recovery(g_perm.residual, truth.residual)["index_accuracy"]
    return measured, {"losses": losses, "n_eval": n_eval, "T_eval": T_eval, "matching_tokens": int(match.numel())}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, t_start = cc.start(__doc__, argv)
    q = args.quick
    warnings.filterwarnings("ignore", message=".*fingerprint.*")
    seeds = list(ct.GRID["quick_seeds" if q else "seeds"]["smollm2"])
    base_ref, tok = cc.load_base()
    per = [one_seed(s, q, base_ref, tok) for s in seeds]
    measured, spread = cc.over_seeds([p_[0] for p_ in per], HEADLINE)
    cfg = ct.config(q)
    fig = cc.bar_figure("merge", q, [{
        "ylabel": "mean held-out loss, both texts (nats per token)",
        "bars": [cc.bar(spread, measured, f"{k}_loss_mean", lab) for k, lab in LABELS.items()],
        "colors": ["tab:gray", "tab:gray", "tab:gray", "tab:green", "tab:green", "tab:red", "tab:red", "tab:orange"],
        "title": f"SmolLM2-135M, midpoint merges of the trajectory endpoints ({len(seeds)} seed(s)); the paper gives "
                 "no number"}])
    res = {"claim": "merge", "paper": PAPER, "measured": measured, "spread": spread,
           "seeds": {"trajectory_training_seeds": seeds,
                     "export_gauges": "claim_trajectory.export_seed (smollm2 setting) of each training seed"},
           "ours_bd": f"mean held-out loss {measured['bd_loss_mean']:.3f} (oracle {measured['oracle_loss_mean']:.3f};"
                      f" endpoints {measured['novel_endpoint_loss_mean']:.3f}/{measured['pydoc_endpoint_loss_mean']:.3f};"
                      f" base {measured['base_loss_mean']:.3f})",
           "ours_baseline": f"S_d found {measured['sd_found_loss_mean']:.2f}, S_d same-perm "
                            f"{measured['sd_same_perm_loss_mean']:.2f}, none {measured['none_loss_mean']:.2f}",
           "losses": {str(s): p_[1]["losses"] for s, p_ in zip(seeds, per)}, "figure": cc.figure_ref(fig),
           "setup": {"endpoints": f"claim_trajectory step {cfg['steps']} (lr {cfg['lr']}, recipe {ct.recipe_name()})",
                     "eval_windows_per_text": per[0][1]["n_eval"], "T_eval": per[0][1]["T_eval"],
                     "matching_tokens": per[0][1]["matching_tokens"]}}
    return cc.finish(res, q, t_start)


if __name__ == "__main__":
    main()
