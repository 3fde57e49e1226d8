"""The trajectory grid of ``claim_trajectory`` across model widths, sized for one GPU.

For each width d (default 128, 256, 512, 1024, 2048) and seed, the claim's tiny protocol with the claim's own
functions (one training loop, one grid evaluation): the base is ``claim_trajectory.pretrain_tiny`` (a tiny Llama,
4 layers, bytes, d_ff 3d, pretrained on both texts), fine-tuned twice (Botchan; Python docs) by
``claim_trajectory.fine_tune`` for ``--steps`` (default 1500, as in the paper) with the tiny configuration
(``claim_trajectory.config(False, "tiny")``: AdamW lr 3e-3, wd 0, clip 1.0, warmup then constant, batch 16x64
bytes). Every ``--every`` steps the checkpoint is moved into a fresh random B_d gauge in memory
(``apply_gauge(random_gauge)``, exactly what saving it in that gauge would do) and the local hop from the previous
checkpoint is matched in every cell of the pre-registered grid (``claim_trajectory.Trajectory``: sites
pooled/few/one x 64/256/2048 tokens). At the end ``claim_trajectory.grid_cells`` scores path, via base and endpoint
in every cell against the known export gauges, and the cell verdicts and the finding use the claim's rules
(``cell_verdict`` / ``finding``). At d=128 this is the claim's tiny setting (the test suite checks that both give
the same cells on a short run).

Usage:
  python benchmarks/trajectory_gpu.py                       # device cuda, widths 128..2048, 1500 steps, seed 0
  python benchmarks/trajectory_gpu.py --widths 128,512 --seeds 0,1,2 --out results/trajectory_gpu.json
  python benchmarks/trajectory_gpu.py --smoke               # CPU, tiny widths and steps (what the test runs)
Designed to finish in under 10 minutes on one H100/H200-class GPU with the defaults (an estimate: it has not been
timed on a GPU yet, see RESULTS.md); ``--max-minutes`` stops before starting a width that would not fit.
Writes one JSON file (atomically) with every cell, the verdicts, the finding and the timings.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import claim_trajectory as ct  # noqa: E402
import claims_common as cc  # noqa: E402
import hf_gauge  # noqa: E402


def parse(argv: list[str] | None) -> argparse.Namespace:
    tiny = ct.config(False, "tiny")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="torch device (default cuda; --smoke uses cpu)")
    ap.add_argument("--widths", default="128,256,512,1024,2048", help="comma-separated hidden sizes")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (init, data order and export gauges)")
    ap.add_argument("--steps", type=int, default=tiny["steps"], help="fine-tuning steps per run (paper: 1500)")
    ap.add_argument("--every", type=int, default=tiny["every"], help="a checkpoint (and a local hop) every this many")
    ap.add_argument("--pretrain", type=int, default=tiny["pretrain"], help="pretraining steps of the shared base")
    ap.add_argument("--warmup", type=int, default=tiny["warmup"], help="fine-tuning warmup steps")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=tiny["batch"])
    ap.add_argument("--lr", type=float, default=tiny["lr"])
    ap.add_argument("--max-minutes", type=float, default=10.0, help="skip widths that would start after this")
    ap.add_argument("--out", default=str(cc.RESULTS / "trajectory_gpu.json"), help="output JSON file")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU smoke run: widths 16,32, 10 steps, a hop every 5, 5 pretraining steps, 5 warmup steps")
    args = ap.parse_args(argv)
    if args.smoke:
        args.device, args.widths, args.steps, args.every, args.pretrain, args.warmup = "cpu", "16,32", 10, 5, 5, 5
    if args.steps % args.every:
        ap.error("--steps must be a multiple of --every")
    return args


def protocol(args: argparse.Namespace) -> dict[str, Any]:
    """The claim's training configuration (``claim_trajectory.config``'s keys) with this run's values."""
    return {**ct.config(False, "tiny"), "steps": args.steps, "every": args.every, "pretrain": args.pretrain,
            "warmup": args.warmup, "batch": args.batch, "lr": args.lr}


@torch.no_grad()
def gauged(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy of ``model`` in ``random_gauge(seed)`` (what exporting the checkpoint in that gauge gives)."""
    m = copy.deepcopy(model).eval()
    hf_gauge.apply_gauge(m, hf_gauge.random_gauge(m, seed=seed))
    return m


def run_width(d: int, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One width and seed: ``claim_trajectory``'s base, fine-tuning and grid evaluation, with hops matched in memory."""
    t0 = time.perf_counter()
    cfg = protocol(args)
    dev = torch.device(args.device)
    data = ct.corpora(None, "tiny")
    datasets = ct.matching_data({r: v[1] for r, v in data.items()}, ct.GRID["tokens"])
    sets = ct.site_sets(args.layers)
    base = ct.pretrain_tiny(cfg, seed, d=d, layers=args.layers, device=dev).eval()
    base_g = gauged(base, ct.export_seed("base", 0, seed))
    steps = list(range(cfg["every"], cfg["steps"] + 1, cfg["every"]))
    runs = {run: ct.Trajectory(run, base_g, datasets, sets) for run in ct.RUNS}
    losses = {}
    for run in ct.RUNS:
        model = copy.deepcopy(base)

        def checkpoint(step: int, run: str = run, model: torch.nn.Module = model) -> None:
            runs[run].add(step, gauged(model, ct.export_seed(run, step, seed)))

        losses[run] = ct.fine_tune(model, data[run][0], run, cfg, seed, on_checkpoint=checkpoint)
        del model
    truth = ct.true_gauge(base, "novel", steps[-1], "pydoc", steps[-1], seed).residual
    cells, _, _ = ct.grid_cells(base_g, runs, datasets, sets, steps, truth)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return {"cells": cells, "train_loss": {r: {"first": v[0], "last": float(np.mean(v[-cfg["every"]:]))}
                                           for r, v in losses.items()},
            "seconds": time.perf_counter() - t0}


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device is available: run on a GPU machine, or pass --device cpu (slow) or --smoke")
    torch.manual_seed(0)
    widths = [int(x) for x in args.widths.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    t_start = time.perf_counter()
    out: dict[str, Any] = {"args": vars(args), "protocol": protocol(args), "grid": ct.GRID, "gap": ct.GAP,
                           "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
                           "widths": {}, "skipped": []}
    last_width_s = 0.0
    for d in widths:
        elapsed = (time.perf_counter() - t_start) / 60
        if elapsed + 2 * last_width_s / 60 > args.max_minutes:   # a width at least doubles the previous one's time
            out["skipped"].append(d)
            continue
        t0 = time.perf_counter()
        per_seed = {s: run_width(d, s, args) for s in seeds}
        cells = ct.aggregate(per_seed)
        out["widths"][str(d)] = {"cells": cells, "finding": ct.finding(cells),
                                 "per_seed": {str(s): v for s, v in per_seed.items()},
                                 "seconds": time.perf_counter() - t0}
        last_width_s = time.perf_counter() - t0
        print(f"d={d}: {out['widths'][str(d)]['finding']} ({last_width_s:.0f} s)", flush=True)
        out["total_s"] = time.perf_counter() - t_start
        write_json(Path(args.out), cc.jsonable(out))
    out["total_s"] = time.perf_counter() - t_start
    write_json(Path(args.out), cc.jsonable(out))
    return out


if __name__ == "__main__":
    main()
