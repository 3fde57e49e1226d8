"""Claim `trajectory`: composing local B_d gauges along two fine-tuning runs recovers cross-run coordinates.

Two full fine-tuning runs of real SmolLM2-135M-Instruct start from the same base: run "novel" on a Gutenberg novel
(*Botchan*, from the sentencepiece sdist) and run "pydoc" on the Python documentation (``pydoc_data.topics``).
Every saved checkpoint (and the base) is exported in a FRESH random B_d gauge (``random_gauge(..., seed=...)``
applied before ``save_pretrained``), so no method can rely on index identity. The export seeds are known, so the true
cross-run correspondence between run-1 step t and run-2 step t is ``G2_t @ G1_t^{-1}`` (training never permutes).

Three estimates of that correspondence per step t (all with ``find_gauge(..., data=held-out tokens)``, signed):
- endpoint: ``find_gauge(run1_t, run2_t)``;
- via base (two hops): ``compose_path([run1_t, run2_t], via=base)``;
- path: every local gauge along ``run1_t -> ... -> run1_1 -> base -> run2_1 -> ... -> run2_t``, composed. Each local
  hop is found once with ``find_gauge`` and composed with the group law (``Gauge.__matmul__``); at the last step the
  same path is also computed end to end with ``compose_path`` and checked to agree.
The same three are also computed data-free (``find_gauge(a, b)``: from the weights alone).

Paper (Qwen/TinyLlama, 1500 steps): 91.1% (path) vs 60.3% (endpoint).
A second setting, ``tiny``, runs the same protocol on a from-scratch Llama (d=128, 4 layers, bytes) briefly
pretrained on both texts, then fine-tuned on each at lr 3e-3: a high-drift regime the CPU budget can reach.
Usage: python benchmarks/claim_trajectory.py [--quick] [--setting smollm2|tiny|both] [--train-only --run novel|pydoc]
Checkpoints are cached under ~/.cache/hf_gauge/bench/trajectory[_quick]/ (not in the repo).
"""
from __future__ import annotations

import gc
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import claims_common as cc  # noqa: E402
import hf_gauge  # noqa: E402

PAPER = {"path": 0.911, "endpoint": 0.603, "steps": 1500, "text": "91.1% (path) vs 60.3% (endpoint) at 1500 steps"}
RUNS = ("novel", "pydoc")


SETTINGS = ("smollm2", "tiny")


def config(quick: bool, setting: str = "smollm2") -> dict[str, Any]:
    """Training / matching configuration of one setting (``smollm2``: real weights; ``tiny``: from-scratch Llama)."""
    if setting == "tiny":
        if quick:
            return {"steps": 40, "every": 10, "lr": 3e-3, "warmup": 5, "batch": 8, "T": 64, "n_match": 4,
                    "T_match": 64, "layers": None, "pretrain": 40}
        return {"steps": 2000, "every": 100, "lr": 3e-3, "warmup": 20, "batch": 16, "T": 64, "n_match": 16,
                "T_match": 64, "layers": None, "pretrain": 200}
    if quick:
        return {"steps": 4, "every": 2, "lr": 1e-3, "warmup": 1, "batch": 2, "T": 32, "n_match": 2, "T_match": 32,
                "layers": [0, 15, 29]}
    return {"steps": 100, "every": 20, "lr": 1e-3, "warmup": 10, "batch": 4, "T": 64, "n_match": 8, "T_match": 64,
            "layers": None}


def ckpt_root(quick: bool, setting: str = "smollm2") -> Path:
    return cc.bench_cache() / ("trajectory" + ("_tiny" if setting == "tiny" else "") + ("_quick" if quick else ""))


def export_seed(run: str, step: int) -> int:
    """The seed of the random gauge a checkpoint is exported in (base: run='base', step=0)."""
    return {"base": 1000, "novel": 2000, "pydoc": 3000}[run] + step


def ckpt_dir(root: Path, run: str, step: int) -> Path:
    return root / ("base" if run == "base" else f"{run}_step{step:05d}")


def corpora(tok, setting: str = "smollm2") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{run: (train ids, held-out ids)}: the last 10% of each text is held out (bytes for the tiny setting)."""
    if setting == "tiny":
        return {"novel": cc.split_ids(cc.byte_ids(cc.botchan_text())),
                "pydoc": cc.split_ids(cc.byte_ids(cc.pydoc_text()))}
    return {"novel": cc.split_ids(cc.tokenize_text(tok, cc.botchan_text())),
            "pydoc": cc.split_ids(cc.tokenize_text(tok, cc.pydoc_text()))}


def base_model(quick: bool, setting: str = "smollm2") -> tuple[torch.nn.Module, Any]:
    """(the shared starting point of both runs, tokenizer or None)."""
    if setting == "smollm2":
        return cc.load_base()
    from transformers import AutoModelForCausalLM
    cfg = config(quick, setting)
    plain = ckpt_root(quick, setting) / "base_plain"
    if not (plain / "config.json").exists():
        model = cc.tiny_llama(0)
        data = corpora(None, setting)
        mix = torch.cat([data["novel"][0], data["pydoc"][0]])
        cc.train_lm(model, mix, cfg["pretrain"], batch=cfg["batch"], T=cfg["T"], lr=cfg["lr"], data_seed=7)
        model.save_pretrained(plain)
    return AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).eval(), None


@torch.no_grad()
def export(model: torch.nn.Module, folder: Path, seed: int) -> None:
    """Save ``model`` in a fresh random B_d gauge, then restore it exactly (index operations only)."""
    g = hf_gauge.random_gauge(model, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_gauge.apply_gauge(model, g)
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        model.save_pretrained(tmp)
        hf_gauge.apply_gauge(model, g.inverse())
    if folder.exists():                      # another process exported the same checkpoint (same seed, same weights)
        import shutil
        shutil.rmtree(tmp)
        return
    tmp.rename(folder)


def train_run(run: str, quick: bool, setting: str = "smollm2") -> dict[str, Any]:
    """Fine-tune the base on ``run``'s text (AdamW, full parameters), exporting a gauged checkpoint every ``every``."""
    cfg = config(quick, setting)
    root = ckpt_root(quick, setting)
    root.mkdir(parents=True, exist_ok=True)
    meta_path = root / f"{run}_meta.json"
    last = ckpt_dir(root, run, cfg["steps"])
    if meta_path.exists() and last.exists() and json.loads(meta_path.read_text()).get("config") == cfg:
        return json.loads(meta_path.read_text())
    model, tok = base_model(quick, setting)
    if not (root / "base").exists():
        export(model, root / "base", export_seed("base", 0))
    train_ids, _ = corpora(tok, setting)[run]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg["warmup"]))
    model.train()
    losses = []
    t0 = time.perf_counter()
    for step in range(1, cfg["steps"] + 1):
        b = cc.windows(train_ids, cfg["batch"], cfg["T"], seed=(17 if run == "novel" else 29) * 100_000 + step)
        loss = model(input_ids=b, labels=b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % cfg["every"] == 0:
            model.eval()
            export(model, ckpt_dir(root, run, step), export_seed(run, step))
            model.train()
            print(f"[{run}] step {step} loss {sum(losses[-cfg['every']:]) / cfg['every']:.3f} "
                  f"({(time.perf_counter() - t0) / step:.2f} s/step)", flush=True)
    meta = {"config": cfg, "losses": losses, "train_s": time.perf_counter() - t0}
    meta_path.write_text(json.dumps(meta))
    del model, opt
    gc.collect()
    return meta


def _cached(run: str, quick: bool, setting: str) -> bool:
    cfg, root = config(quick, setting), ckpt_root(quick, setting)
    meta_path = root / f"{run}_meta.json"
    return (meta_path.exists() and ckpt_dir(root, run, cfg["steps"]).exists()
            and json.loads(meta_path.read_text()).get("config") == cfg)


def train_all(quick: bool, setting: str) -> float:
    """Train both runs (in parallel, one process per core, when there are two cores); returns the wall time of
    training (read back from ``train_wall.json`` when every run was cached)."""
    import subprocess
    root = ckpt_root(quick, setting)
    need = [r for r in RUNS if not _cached(r, quick, setting)]
    wall_path = root / "train_wall.json"
    if not need and wall_path.exists():
        return json.loads(wall_path.read_text())["train_wall_s"]
    t0 = time.perf_counter()
    if len(need) > 1 and (os.cpu_count() or 1) >= 2:
        root.mkdir(parents=True, exist_ok=True)
        model, _ = base_model(quick, setting)         # the shared base (and the tiny pretraining) exists once
        if not (root / "base").exists():
            export(model, root / "base", export_seed("base", 0))
        del model
        gc.collect()
        cmd = [sys.executable, __file__, "--train-only", "--setting", setting] + (["--quick"] if quick else [])
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen(cmd + ["--run", r], env=env) for r in need]
        if any(p.wait() for p in procs):
            raise SystemExit(f"training a {setting} run failed (see the output above)")
    for run in RUNS:
        train_run(run, quick, setting)
    wall = time.perf_counter() - t0
    if need:
        wall_path.write_text(json.dumps({"train_wall_s": wall, "parallel": len(need) > 1}))
    return wall


def load(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def true_gauge(model: torch.nn.Module, run_a: str, step_a: int, run_b: str, step_b: int) -> hf_gauge.Gauge:
    """The ground truth from checkpoint a's export chart to checkpoint b's: ``G_b @ G_a^{-1}``."""
    ga = hf_gauge.random_gauge(model, seed=export_seed(run_a, step_a))
    gb = hf_gauge.random_gauge(model, seed=export_seed(run_b, step_b))
    return gb @ ga.inverse()


def evaluate(setting: str, quick: bool) -> dict[str, Any]:
    """Train (if needed) and score endpoint / via-base / path recovery at every saved step of one setting."""
    cfg = config(quick, setting)
    root = ckpt_root(quick, setting)
    t_train = train_all(quick, setting)
    metas = {run: train_run(run, quick, setting) for run in RUNS}    # cached: the losses of each run
    ref, tok = base_model(quick, setting)
    data_all = corpora(tok, setting)
    # matching data: held-out windows of BOTH texts (neither run trained on them)
    data = torch.cat([cc.strided_windows(data_all[r][1], cfg["n_match"], cfg["T_match"]) for r in RUNS])
    kw: dict[str, Any] = {"data": data, "method": "signed"}
    if cfg["layers"] is not None:
        kw["layers"] = cfg["layers"]
    steps = list(range(cfg["every"], cfg["steps"] + 1, cfg["every"]))
    warnings.filterwarnings("ignore", message=".*fingerprint.*")

    base = load(root / "base")
    # local hops, found once each: run1 goes backwards (step_k -> step_{k-1}), run2 forwards
    hop1: dict[int, hf_gauge.Gauge] = {}   # run1 step_k -> run1 step_{k-1} (step_0 = base)
    hop2: dict[int, hf_gauge.Gauge] = {}   # run2 step_{k-1} -> run2 step_k
    free1: dict[int, hf_gauge.Gauge] = {}  # the same hops, data-free (from the weights alone)
    free2: dict[int, hf_gauge.Gauge] = {}
    t0 = time.perf_counter()
    for run, hops, free in (("novel", hop1, free1), ("pydoc", hop2, free2)):
        prev = base
        for s in steps:
            cur = load(ckpt_dir(root, run, s))
            pair = (cur, prev) if run == "novel" else (prev, cur)
            hops[s] = hf_gauge.find_gauge(*pair, **kw)
            free[s] = hf_gauge.find_gauge(*pair)
            prev = cur
            gc.collect()
    t_hops = time.perf_counter() - t0
    rows = []
    path_gauges: dict[int, hf_gauge.Gauge] = {}
    t0 = time.perf_counter()
    for i, s in enumerate(steps):
        a = load(ckpt_dir(root, "novel", s))
        b = load(ckpt_dir(root, "pydoc", s))
        truth = true_gauge(ref, "novel", s, "pydoc", s).residual
        g_end = hf_gauge.find_gauge(a, b, **kw)
        g_free = hf_gauge.find_gauge(a, b)                       # data-free endpoint, for reference
        g_perm = hf_gauge.find_gauge(a, b, **{**kw, "method": "permutation"})
        g_via = hf_gauge.compose_path([a, b], via=base, **kw)
        to_base = hop1[steps[0]]
        for s2 in steps[1:i + 1]:
            to_base = to_base @ hop1[s2]                          # run1_t -> ... -> base
        from_base = hop2[steps[0]]
        for s2 in steps[1:i + 1]:
            from_base = hop2[s2] @ from_base                      # base -> ... -> run2_t
        g_path = from_base @ to_base
        path_gauges[s] = g_path
        g_path_free = free1[steps[0]]
        for s2 in steps[1:i + 1]:
            g_path_free = g_path_free @ free1[s2]
        for s2 in steps[:i + 1]:
            g_path_free = free2[s2] @ g_path_free
        g_via_free = hf_gauge.compose_path([a, b], via=base)
        row = {"step": s,
               "endpoint": cc.recovery(g_end.residual, truth),
               "endpoint_data_free": cc.recovery(g_free.residual, truth),
               "endpoint_permutation_only": cc.recovery(g_perm.residual, truth),
               "via_base": cc.recovery(g_via.residual, truth),
               "path": cc.recovery(g_path.residual, truth),
               "via_base_data_free": cc.recovery(g_via_free.residual, truth),
               "path_data_free": cc.recovery(g_path_free.residual, truth),
               "endpoint_mean_matched": g_end.metrics.get("mean_matched"),
               "path_min_margin_hops": min(min(hop1[s2].metrics["min_margin"], hop2[s2].metrics["min_margin"])
                                           for s2 in steps[:i + 1])}
        rows.append(row)
        print(f"[{setting}] step {s:4d}: endpoint {row['endpoint']['signed_accuracy']:.3f}  via-base "
              f"{row['via_base']['signed_accuracy']:.3f}  path {row['path']['signed_accuracy']:.3f}  "
              f"(data-free endpoint {row['endpoint_data_free']['signed_accuracy']:.3f}, S_d endpoint index "
              f"{row['endpoint_permutation_only']['index_accuracy']:.3f}; data-free via base "
              f"{row['via_base_data_free']['signed_accuracy']:.3f}, path {row['path_data_free']['signed_accuracy']:.3f})",
              flush=True)
        del a, b
        gc.collect()
    t_eval = time.perf_counter() - t0
    # the library's compose_path over the whole path at the last step, from the saved folders
    T = steps[-1]
    full_path = ([ckpt_dir(root, "novel", s) for s in reversed(steps)] + [root / "base"]
                 + [ckpt_dir(root, "pydoc", s) for s in steps])
    t0 = time.perf_counter()
    g_cp = hf_gauge.compose_path([str(p) for p in full_path], **kw)
    t_cp = time.perf_counter() - t0
    cp_acc = cc.recovery(g_cp.residual, true_gauge(ref, "novel", T, "pydoc", T).residual)
    last = rows[-1]
    every = cfg["every"]
    measured = {
        "path_signed_accuracy": last["path"]["signed_accuracy"],
        "via_base_signed_accuracy": last["via_base"]["signed_accuracy"],
        "endpoint_signed_accuracy": last["endpoint"]["signed_accuracy"],
        "endpoint_data_free_signed_accuracy": last["endpoint_data_free"]["signed_accuracy"],
        "via_base_data_free_signed_accuracy": last["via_base_data_free"]["signed_accuracy"],
        "path_data_free_signed_accuracy": last["path_data_free"]["signed_accuracy"],
        "endpoint_permutation_only_index_accuracy": last["endpoint_permutation_only"]["index_accuracy"],
        "compose_path_signed_accuracy": cp_acc["signed_accuracy"],
        "compose_path_agrees_with_hop_composition": float(bool(g_cp.residual == path_gauges[T].residual)),
        "final_step": T,
        "train_loss_first_novel": metas["novel"]["losses"][0],
        "train_loss_last_novel": sum(metas["novel"]["losses"][-every:]) / every,
        "train_loss_first_pydoc": metas["pydoc"]["losses"][0],
        "train_loss_last_pydoc": sum(metas["pydoc"]["losses"][-every:]) / every,
    }
    return {"measured": measured, "curve": rows,
            "setup": {**cfg, "matching_tokens": int(data.numel()),
                      "optimizer": "AdamW(wd=0), grad clip 1.0, linear warmup then constant",
                      "export": "each checkpoint saved in random_gauge(seed=...) (B_d)"},
            "runtime_s": {"train": t_train, "local_hops": t_hops, "eval": t_eval, "compose_path": t_cp}}


def _from_old_row(row: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Settings already recorded in an existing row (a row without ``settings`` holds the SmolLM2 setting)."""
    if "settings" in row:
        return dict(row["settings"])
    if "curve" in row:
        keep = {k: v for k, v in row["measured"].items()}
        return {"smollm2": {"measured": keep, "curve": row["curve"], "setup": row.get("setup", {}),
                            "runtime_s": row.get("runtime_s", {})}}
    return {}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = cc.parser(__doc__)
    ap.add_argument("--train-only", action="store_true", help="only train (and export) the checkpoints of --run")
    ap.add_argument("--run", choices=RUNS, default=None)
    ap.add_argument("--setting", choices=SETTINGS + ("both",), default=None,
                    help="smollm2 (real weights), tiny (from-scratch Llama) or both (default; --quick: smollm2); a "
                         "setting not run keeps its entry from this script's previous row if its configuration is "
                         "unchanged")
    args = ap.parse_args(argv)
    cc.setup(args)
    t_start = time.perf_counter()
    setting = args.setting or ("smollm2" if args.quick else "both")
    todo = list(SETTINGS) if setting == "both" else [setting]
    if args.train_only:
        for setting in todo:
            for run in ([args.run] if args.run else RUNS):
                train_run(run, args.quick, setting)
        return {}
    prev = {r["claim"]: r for r in cc.read_claims(args.quick)}.get("trajectory")
    results = {k: v for k, v in (_from_old_row(prev) if prev else {}).items()
               if k not in todo and {kk: v["setup"].get(kk) for kk in config(args.quick, k)} == config(args.quick, k)}
    for setting in todo:
        results[setting] = evaluate(setting, args.quick)
    if "smollm2" not in results:
        raise SystemExit("the SmolLM2 setting has no result yet: run without --setting (or --setting smollm2)")

    fig = cc.figure_path("trajectory", args.quick)
    import matplotlib.pyplot as plt
    names = [s for s in SETTINGS if s in results]
    fig_, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    for ax, setting in zip(axes[0], names):
        rows, cfg = results[setting]["curve"], results[setting]["setup"]
        for key, lab in (("path", "path (compose every local gauge)"), ("via_base", "via base (2 hops)"),
                         ("endpoint", "endpoint (B_d, activations)"), ("endpoint_data_free", "endpoint (data-free)"),
                         ("via_base_data_free", "via base (data-free)"), ("path_data_free", "path (data-free)")):
            if rows and key not in rows[0]:
                continue
            ax.plot([r["step"] for r in rows], [r[key]["signed_accuracy"] for r in rows], marker="o", label=lab,
                    ls=":" if "data_free" in key else "-")
        ax.plot([r["step"] for r in rows], [r["endpoint_permutation_only"]["index_accuracy"] for r in rows],
                marker="x", ls="--", label="endpoint S_d (index only)")
        ax.set_xlabel(f"fine-tuning step (lr {cfg['lr']}, batch {cfg['batch']}x{cfg['T']})")
        ax.set_ylabel("cross-run coordinates recovered (index+sign)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title({"smollm2": "SmolLM2-135M (real weights), 2 runs", "tiny": "tiny Llama d=128 (bytes), 2 runs"}
                     [setting] + ", checkpoints in random gauges", fontsize=9)
        ax.legend(fontsize=8)
    plt.tight_layout()
    plt.savefig(fig, dpi=110)
    plt.close()

    measured = dict(results["smollm2"]["measured"])
    if "tiny" in results:
        measured.update({f"tiny_{k}": v for k, v in results["tiny"]["measured"].items()})
    m = measured
    bd = f"SmolLM2: path {m['path_signed_accuracy']:.3f} vs endpoint {m['endpoint_signed_accuracy']:.3f} (via base " \
         f"{m['via_base_signed_accuracy']:.3f}) at step {m['final_step']}"
    if "tiny" in results:
        bd += f"; tiny: path {m['tiny_path_signed_accuracy']:.3f} vs endpoint {m['tiny_endpoint_signed_accuracy']:.3f}" \
              f" (via base {m['tiny_via_base_signed_accuracy']:.3f}) at step {m['tiny_final_step']}"
    res = {
        "claim": "trajectory",
        "paper": PAPER,
        "measured": measured,
        "ours_bd": bd,
        "ours_baseline": f"endpoint S_d (index) {m['endpoint_permutation_only_index_accuracy']:.3f}"
                         + (f" / tiny {m['tiny_endpoint_permutation_only_index_accuracy']:.3f}" if "tiny" in results
                            else ""),
        "settings": results,
        "setup": {"runs": {"novel": "Botchan (Gutenberg, sentencepiece sdist test/botchan.txt)",
                           "pydoc": "pydoc_data.topics"},
                  "smollm2": results["smollm2"]["setup"], **({"tiny": results["tiny"]["setup"]} if "tiny" in results
                                                             else {})},
        "model": cc.MODEL_NAME + (" + tiny Llama d=128, 4 layers, bytes" if "tiny" in results else ""),
        "figure": cc.figure_ref(fig),
        "command": cc.command_for("claim_trajectory.py", args.quick),
        "runtime_s": {"total": sum(sum(v["runtime_s"].values()) for v in results.values()),
                      "this_process": time.perf_counter() - t_start},
    }
    cc.write_claim(res, args.quick)
    print(json.dumps(measured, indent=1))
    return res


if __name__ == "__main__":
    main()
