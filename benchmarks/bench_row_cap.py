"""Data-free matching on real fine-tuned pairs: the vocabulary row cap ``features.default_max_rows(d)`` against the
former ``8 d`` rows.

Pairs: the trajectory claim's SmolLM2 endpoints (``claim_trajectory``: the "novel" and "pydoc" runs at their last
step, each exported in its own random B_d gauge), one pair per seed; the truth is the composition of the two export
gauges. Needs the claim's checkpoints (run ``benchmarks/claim_trajectory.py --setting smollm2`` first; they are cached
under the benchmark cache). Not a speed benchmark: it records recovery (index + sign) and the matching margins.

Usage: python benchmarks/bench_row_cap.py [--seeds 0,1,2]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import claim_trajectory as ct   # noqa: E402
import claims_common as cc      # noqa: E402
from _common import write_result   # noqa: E402

import hf_gauge   # noqa: E402
from hf_gauge.features import default_max_rows   # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args(argv)
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
        for label, cap in (("default", default_max_rows(d)), ("8d", 8 * d)):
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


if __name__ == "__main__":
    main()
