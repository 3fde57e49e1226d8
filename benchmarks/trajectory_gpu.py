"""The trajectory grid of ``claim_trajectory`` across model widths, sized for one GPU.

For each width d (default 128, 256, 512, 1024, 2048) and seed: a tiny Llama (4 layers, bytes, d_ff 3d) is pretrained
on both texts, then fine-tuned twice (Botchan; Python docs) for ``--steps`` (default 1500, as in the paper) with the
tiny protocol's optimizer (AdamW lr 3e-3, wd 0, clip 1.0, warmup then constant, batch 16x64 bytes). Every
``--every`` steps the checkpoint is moved into a fresh random B_d gauge in memory (``apply_gauge(random_gauge)``,
exactly what saving it in that gauge would do) and the local hop from the previous checkpoint is matched in every
cell of the pre-registered grid (``claim_trajectory.GRID``: sites pooled/few/one x 64/256/2048 tokens) with the same
matcher as the claim (``claim_trajectory.match_cells``). At the end: path, via base and endpoint in every cell,
scored against the known export gauges, the cell verdicts and the finding (``claim_trajectory.cell_verdict`` /
``finding``: the same rules as the claim).

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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="torch device (default cuda; --smoke uses cpu)")
    ap.add_argument("--widths", default="128,256,512,1024,2048", help="comma-separated hidden sizes")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (init, data order and export gauges)")
    ap.add_argument("--steps", type=int, default=1500, help="fine-tuning steps per run (paper: 1500)")
    ap.add_argument("--every", type=int, default=100, help="a checkpoint (and a local hop) every this many steps")
    ap.add_argument("--pretrain", type=int, default=200, help="pretraining steps of the shared base")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--max-minutes", type=float, default=10.0, help="skip widths that would start after this")
    ap.add_argument("--out", default=str(cc.RESULTS / "trajectory_gpu.json"), help="output JSON file")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU smoke run: widths 16,32, 10 steps, a hop every 5, 5 pretraining steps")
    args = ap.parse_args(argv)
    if args.smoke:
        args.device, args.widths, args.steps, args.every, args.pretrain = "cpu", "16,32", 10, 5, 5
    if args.steps % args.every:
        ap.error("--steps must be a multiple of --every")
    return args


def train(model: torch.nn.Module, ids: torch.Tensor, steps: int, args: argparse.Namespace, data_seed: int,
          on_checkpoint: Any = None) -> list[float]:
    """AdamW (wd 0), clip 1.0, 20-step linear warmup then constant; ``on_checkpoint(step)`` every ``args.every``."""
    dev = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warm = min(20, max(1, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    losses = []
    model.train()
    for step in range(1, steps + 1):
        b = cc.windows(ids, args.batch, 64, seed=data_seed * 100_000 + step).to(dev)
        loss = model(input_ids=b, labels=b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if on_checkpoint is not None and step % args.every == 0:
            model.eval()
            on_checkpoint(step)
            model.train()
    model.eval()
    return losses


@torch.no_grad()
def gauged(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy of ``model`` in ``random_gauge(seed)`` (what exporting the checkpoint in that gauge gives)."""
    m = copy.deepcopy(model).eval()
    hf_gauge.apply_gauge(m, hf_gauge.random_gauge(m, seed=seed))
    return m


def run_width(d: int, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    dev = torch.device(args.device)
    data = {r: cc.split_ids(cc.byte_ids(t)) for r, t in (("novel", cc.botchan_text()), ("pydoc", cc.pydoc_text()))}
    datasets = {}
    for n_tok in ct.GRID["tokens"]:
        n, T = ct.token_windows(n_tok)
        datasets[n_tok] = torch.cat([cc.strided_windows(data[r][1], n, T) for r in ct.RUNS])
    sets = ct.site_sets(args.layers)
    base = cc.tiny_llama(seed, d=d, layers=args.layers).to(dev)
    train(base, torch.cat([data["novel"][0], data["pydoc"][0]]), args.pretrain, args, data_seed=7 + seed)
    base_g = gauged(base, ct.export_seed("base", 0, seed))
    steps = list(range(args.every, args.steps + 1, args.every))
    hops: dict[str, dict[int, dict[str, Any]]] = {"novel": {}, "pydoc": {}}
    finals: dict[str, torch.nn.Module] = {}
    losses = {}
    for run in ct.RUNS:
        model = copy.deepcopy(base)
        state = {"prev": base_g}

        def checkpoint(step: int, run: str = run, model: torch.nn.Module = model, state: dict = state) -> None:
            cur = gauged(model, ct.export_seed(run, step, seed))
            pair = (cur, state["prev"]) if run == "novel" else (state["prev"], cur)
            hops[run][step] = ct.match_cells(*pair, datasets, sets)
            state["prev"] = cur

        losses[run] = train(model, data[run][0], args.steps, args, data_seed=(17 if run == "novel" else 29)
                            + 1000 * seed, on_checkpoint=checkpoint)
        finals[run] = state["prev"]
        del model
    a, b = finals["novel"], finals["pydoc"]
    to_base = ct.match_cells(a, base_g, datasets, sets)
    from_base = ct.match_cells(base_g, b, datasets, sets)
    end = ct.match_cells(a, b, datasets, sets)
    truth = ct.true_gauge(base, "novel", steps[-1], "pydoc", steps[-1], seed).residual
    cells, _ = ct.score_cells(hops["novel"], hops["pydoc"], to_base, from_base, end, steps, truth)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return {"cells": cells, "train_loss": {r: {"first": v[0], "last": float(np.mean(v[-args.every:]))}
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
    out: dict[str, Any] = {"args": vars(args), "grid": ct.GRID, "gap": ct.GAP,
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
