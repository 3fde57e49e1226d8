"""Claim `adamw`: resuming AdamW in a new chart needs B_d-transported state; permutation-only state diverges.

A small Llama-architecture model (d=128, 4 layers, SwiGLU, RMSNorm with trained gains, byte-level vocabulary of
256, random init, seed 0) is trained with AdamW on a Gutenberg novel (Botchan) for ``N0`` steps. At that point the
model is moved into a random B_d gauge (``apply_gauge``: functionally identical) and training resumes for ``M``
steps on the same batches with the optimizer state
- transported under B_d: ``gauge.transport(opt.state_dict(), model=model)`` (``exp_avg`` signed-permuted,
  ``exp_avg_sq`` permuted);
- transported under S_d: the same permutation, all signs +1 (``Gauge(residual=SignedPermutation(perm))``);
- reset (a fresh AdamW), for reference.
Each run is mapped back with ``gauge.inverse()`` and compared with the uninterrupted reference run: loss curves and
the parameter deviation ``||theta - theta_ref|| / ||theta_ref - theta_N0||``.
Paper: signed transport preserves the resumed trajectory; permutation-only follows a different one.
Usage: python benchmarks/claim_adamw.py [--quick]
"""
from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import claims_common as cc  # noqa: E402
import hf_gauge  # noqa: E402

PAPER = {"bd": "trajectory preserved", "sd": "different trajectory",
         "text": "signed AdamW-state transport preserves the resumed trajectory; permutation-only does not"}
HP = dict(lr=2e-3, betas=(0.9, 0.95), weight_decay=0.01)


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: torch.Tensor) -> float:
    model.train()
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)   # global norm: gauge invariant
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


HEADLINE = ["bd_final_rel_deviation", "sd_final_rel_deviation", "reset_final_rel_deviation", "bd_max_abs_loss_diff",
            "sd_max_abs_loss_diff"]


def one_seed(seed: int, q: bool) -> dict[str, Any]:
    """One run: init ``seed``, hidden gauge ``3 + seed``, batches ``900000 + step + 10**6 * seed``."""
    N0, M, batch, T, every = (30, 20, 8, 64, 5) if q else (300, 150, 16, 128, 10)
    ids = cc.split_ids(cc.byte_ids(cc.botchan_text()))[0]
    batches = [cc.windows(ids, batch, T, seed=900_000 + s + 10**6 * seed) for s in range(N0 + M)]
    model = cc.tiny_llama(seed)
    opt = torch.optim.AdamW(model.parameters(), **HP)
    pre = [step(model, opt, batches[s]) for s in range(N0)]
    group = hf_gauge.symmetry_group(model, warn=False)
    snap_model = copy.deepcopy(model)
    snap_opt = copy.deepcopy(opt.state_dict())
    theta0 = flat(model)

    ref_loss, ref_params = [], {}
    for s in range(M):
        ref_loss.append(step(model, opt, batches[N0 + s]))
        if (s + 1) % every == 0 or s == M - 1:
            ref_params[s + 1] = flat(model)

    g = hf_gauge.random_gauge(snap_model, seed=3 + seed)
    g_sd = hf_gauge.Gauge(residual=cc.permutation_only(g.residual))
    ginv = g.inverse()
    runs: dict[str, Any] = {}
    for name in ("bd", "sd", "reset"):
        m = copy.deepcopy(snap_model)
        hf_gauge.apply_gauge(m, g)
        o = torch.optim.AdamW(m.parameters(), **HP)
        if name == "bd":
            o.load_state_dict(g.transport(snap_opt, model=snap_model))
        elif name == "sd":
            o.load_state_dict(g_sd.transport(snap_opt, model=snap_model))
        losses, dev = [], {}
        for s in range(M):
            losses.append(step(m, o, batches[N0 + s]))
            if (s + 1) in ref_params:
                back = copy.deepcopy(m)
                hf_gauge.apply_gauge(back, ginv)
                ref = ref_params[s + 1]
                dev[s + 1] = float((flat(back) - ref).norm() / (ref - theta0).norm())
        runs[name] = {"loss": losses, "deviation": dev,
                      "max_abs_loss_diff": max(abs(a - b) for a, b in zip(losses, ref_loss))}
        print(f"seed {seed}", name, "final deviation", dev[M], "max |loss - ref|", runs[name]["max_abs_loss_diff"],
              flush=True)
    measured = {"bd_final_rel_deviation": runs["bd"]["deviation"][M], "sd_final_rel_deviation":
                runs["sd"]["deviation"][M], "reset_final_rel_deviation": runs["reset"]["deviation"][M],
                "bd_max_abs_loss_diff": runs["bd"]["max_abs_loss_diff"],
                "sd_max_abs_loss_diff": runs["sd"]["max_abs_loss_diff"],
                "reset_max_abs_loss_diff": runs["reset"]["max_abs_loss_diff"],
                "sd_first_step_loss_minus_ref": runs["sd"]["loss"][1] - ref_loss[1],
                "ref_final_loss": ref_loss[-1], "bd_final_loss": runs["bd"]["loss"][-1],
                "sd_final_loss": runs["sd"]["loss"][-1], "reset_final_loss": runs["reset"]["loss"][-1]}
    return {"measured": measured, "runs": runs, "pre": pre, "ref_loss": ref_loss, "group": group,
            "N0": N0, "M": M, "batch": batch, "T": T}


def figure(r: dict[str, Any], spread: dict[str, Any], measured: dict[str, Any], q: bool) -> Path:
    """Loss curves and |loss - reference| of the first seed, and the final parameter deviation (mean, min-max over
    seeds). Steps where a run's loss equals the reference bit for bit have no point on the log axis (counted in the
    panel's title)."""
    import matplotlib.pyplot as plt
    runs, ref_loss, N0, M = r["runs"], r["ref_loss"], r["N0"], r["M"]
    fig_, (a1, a3, a2) = plt.subplots(1, 3, figsize=(15, 4))
    xs = list(range(N0 + 1, N0 + M + 1))
    a1.plot(range(1, N0 + 1), r["pre"], color="gray", lw=0.8, label="before the chart change")
    a1.plot(xs, ref_loss, color="k", lw=2, label="reference (no chart change)")
    for name, lab, st in (("bd", "new chart, B_d-transported state", "--"),
                          ("sd", "new chart, S_d (perm-only) state", "-"), ("reset", "new chart, fresh AdamW", ":")):
        a1.plot(xs, runs[name]["loss"], ls=st, label=lab)
    a1.set_xlabel("training step")
    a1.set_ylabel("training loss (nats per byte)")
    a1.legend(fontsize=7)
    a1.set_title("loss (first seed)", fontsize=9)
    zeros = {}
    for name in ("bd", "sd", "reset"):
        d = [(x, abs(a - b)) for x, a, b in zip(xs, runs[name]["loss"], ref_loss)]
        zeros[name] = sum(1 for _, v in d if v == 0.0)
        a3.plot([x for x, v in d if v > 0], [v for _, v in d if v > 0], marker=".", label=name)
    a3.set_yscale("log")
    a3.set_xlabel("training step")
    a3.set_ylabel("|loss - reference loss| (nats per byte)")
    a3.legend(fontsize=8)
    a3.set_title("difference from the reference run (first seed); steps equal bit for bit, not drawn: "
                 + ", ".join(f"{k} {v}/{M}" for k, v in zeros.items()), fontsize=7)
    labels = {"bd": "B_d state", "sd": "S_d state", "reset": "fresh AdamW"}
    for i, name in enumerate(("bd", "sd", "reset")):
        key = f"{name}_final_rel_deviation"
        mu = measured[key]
        lo, hi = spread.get(key, [mu, mu])
        a2.bar(i, mu, yerr=cc.whiskers([mu], [lo], [hi]), capsize=4, color=["tab:green", "tab:red", "tab:gray"][i])
    a2.set_xticks(range(3), [labels[k] for k in ("bd", "sd", "reset")])
    a2.set_yscale("log")
    a2.set_ylabel("||theta - theta_ref|| / ||theta_ref - theta_N0|| (after the last step)")
    a2.set_title(f"parameter deviation, mapped back (mean, min-max over {spread.get('n_seeds', 1)} seeds)", fontsize=9)
    plt.tight_layout()
    fig = cc.figure_path("adamw", q)
    plt.savefig(fig, dpi=110)
    plt.close()
    return fig


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, t_start = cc.start(__doc__, argv)
    warnings.filterwarnings("ignore", message=".*fingerprint.*")   # mapping a trained copy back: expected mismatch
    q = args.quick
    seeds = [0] if q else [0, 1, 2]
    per = [one_seed(s, q) for s in seeds]
    measured, spread = cc.over_seeds([r["measured"] for r in per], HEADLINE)
    r0 = per[0]
    fig = figure(r0, spread, measured, q)
    res = {"claim": "adamw", "paper": PAPER, "measured": measured, "spread": spread,
           "seeds": {"init": seeds, "gauge": [3 + s for s in seeds], "batches": "900000 + step + 10**6 * seed"},
           "ours_bd": f"relative deviation {measured['bd_final_rel_deviation']:.1e}, max |dloss| "
                      f"{measured['bd_max_abs_loss_diff']:.1e}",
           "ours_baseline": f"S_d: relative deviation {measured['sd_final_rel_deviation']:.3f}, max |dloss| "
                            f"{measured['sd_max_abs_loss_diff']:.3f} (fresh AdamW: "
                            f"{measured['reset_final_rel_deviation']:.3f})",
           "curves": {"pre": r0["pre"], "ref": r0["ref_loss"], **{k: v["loss"] for k, v in r0["runs"].items()},
                      "deviation": {k: v["deviation"] for k, v in r0["runs"].items()}},
           "by_seed": {str(s): r["measured"] for s, r in zip(seeds, per)},
           "figure": cc.figure_ref(fig),
           "setup": {"model": "LlamaForCausalLM d=128, 4 layers, heads 4/2, d_ff 384, vocab 256 (bytes), init seeds "
                              + ", ".join(map(str, seeds)),
                     "N0": r0["N0"], "M": r0["M"], "batch": r0["batch"], "T": r0["T"],
                     "optimizer": f"AdamW {HP}, grad clip 1.0", "symmetry_group_at_N0": r0["group"],
                     "gauge": "random_gauge(seed=3 + seed), residual B_d"}}
    return cc.finish(res, q, t_start,
                     model="tiny Llama (d=128, 4 layers, bytes) trained from scratch on Botchan")


if __name__ == "__main__":
    main()
