"""Data-free matching on real fine-tuned pairs: the vocabulary row cap ``features.DEFAULT_MAX_ROWS`` against the
former ``8 d`` rows.

Pairs: the trajectory claim's SmolLM2 endpoints (``claim_trajectory``: the "novel" and "pydoc" runs at their last
step, each exported in its own random B_d gauge), one pair per seed; the truth is the composition of the two export
gauges. Needs the claim's checkpoints (run ``benchmarks/claim_trajectory.py --setting smollm2`` first; they are cached
under the benchmark cache). Not a speed benchmark: it records recovery (index + sign) and the matching margins.

``--noise``: instead, real SmolLM2-135M against its gauged copy (a random full-rank B_d gauge per seed) with every
weight perturbed by Gaussian noise of 5/20/50% of its tensor's RMS, matched with 256 to 2048 vocabulary rows. The
statistic that decides a match is the largest chance cosine among ``d^2`` pairs, about ``sqrt(2 ln(d^2) / rows)``:
0.11 at d=576 with 2048 rows, 0.13 at d=8192 with 2048 rows; this sweep measures recovery when it is larger.

Usage: python benchmarks/bench_row_cap.py [--seeds 0,1,2] [--noise]
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import claim_trajectory as ct   # noqa: E402
import claims_common as cc      # noqa: E402
from _common import write_result   # noqa: E402

import hf_gauge   # noqa: E402
from hf_gauge.features import DEFAULT_MAX_ROWS   # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--noise", action="store_true", help="noisy gauged copies of SmolLM2 instead of fine-tuned pairs")
    args = ap.parse_args(argv)
    if args.noise:
        return noise_sweep([int(s) for s in args.seeds.split(",")])
    cfg = ct.config(False, "smollm2")
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        root = ct.ckpt_root(False, "smollm2", seed)
        last = cfg["steps"]
        if not (ct.ckpt_dir(root, "novel", last).is_dir() and ct.ckpt_dir(root, "pydoc", last).is_dir()):
            raise SystemExit(f"no SmolLM2 trajectory checkpoints for seed {seed} under {root}: run "
                             "benchmarks/claim_trajectory.py --setting smollm2 first")
        ref = ct.load(root / "base")
        a, b = ct.load(ct.ckpt_dir(root, "novel", last)), ct.load(ct.ckpt_dir(root, "pydoc", last))
        truth = ct.true_gauge(ref, "novel", last, "pydoc", last, seed).residual
        d = int(a.config.hidden_size)
        for label, cap in (("default", DEFAULT_MAX_ROWS), ("8d", 8 * d)):
            g = hf_gauge.find_gauge(a, b, max_rows=cap)
            rows.append({"seed": seed, "rows": label, "max_rows": cap, "step": last,
                         **cc.recovery(g.residual, truth),
                         "min_margin": g.metrics["min_margin"], "mean_margin": g.metrics["mean_margin"]})
            print(rows[-1])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    out = {"rows": rows, "commit": commit, "script_sha256": cc.file_sha256(Path(__file__))}
    write_result("bench_row_cap", out)
    return out


def noise_sweep(seeds: list[int], levels: tuple[float, ...] = (0.05, 0.2, 0.5),
                caps: tuple[int, ...] = (256, 512, 1024, 2048)) -> dict:
    """Recovery and margins of data-free matching against noisy gauged copies of SmolLM2, per row cap."""
    import torch

    base, _ = cc.load_base()
    d = int(base.config.hidden_size)
    rows = []
    for seed in seeds:
        truth = hf_gauge.random_gauge(base, seed=seed)
        gauged = cc.gauged_copy(base, truth)
        for level in levels:
            b = cc.clone_model(gauged)
            gen = torch.Generator().manual_seed(1000 * seed + int(100 * level))
            with torch.no_grad():
                for p in b.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * (level * p.pow(2).mean().sqrt()))
            for cap in caps:
                g = hf_gauge.find_gauge(base, b, max_rows=cap)
                rows.append({"seed": seed, "noise": level, "max_rows": cap, "d": d,
                             "chance_cosine": (2 * math.log(d * d) / cap) ** 0.5,
                             **cc.recovery(g.residual, truth.residual),
                             "min_margin": g.metrics["min_margin"], "mean_margin": g.metrics["mean_margin"]})
                print(rows[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    out = {"noise_rows": rows, "commit": commit, "script_sha256": cc.file_sha256(Path(__file__))}
    write_result("bench_row_cap_noise", out)
    return out


if __name__ == "__main__":
    main()
