"""apply_gauge on real SmolLM2-135M vs cloning every parameter once (``p.data = p.data.clone()``), in one run.

Also times a naive implementation (index, multiply, copy back) as a second baseline.
Usage: python benchmarks/bench_apply.py [--quick] [--dtype float32|bfloat16]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_gauge  # noqa: E402
from hf_gauge.engine import moves_for  # noqa: E402
from hf_gauge.specs import get_spec  # noqa: E402
from hf_gauge.weights import load_smollm2  # noqa: E402
from _common import median_time, write_result  # noqa: E402


def naive_apply(model, gauge) -> None:
    """Index, then multiply, then copy back into the parameter: three passes per tensor."""
    params = dict(model.named_parameters())
    for n, moves in moves_for(get_spec(model), model.config, gauge, params).items():
        p = params[n]
        y = p.data
        for m in moves:
            y = y.index_select(m.axis, m.index)
            if m.sign is not None:
                shape = [1] * y.dim()
                shape[m.axis] = -1
                y = y * m.sign.to(y.dtype).view(shape)
        p.data.copy_(y)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    model, _ = load_smollm2(dtype=dtype)
    g = hf_gauge.random_gauge(model, seed=0)
    ginv = g.inverse()
    reps = 3 if args.quick else 9
    params = list(model.parameters())
    n_bytes = sum(p.numel() * p.element_size() for p in params)

    def clone_all():   # the floor for any out-of-place per-tensor move: same allocations, one copy each
        for p in params:
            p.data = p.data.clone()

    state = {"flip": False}

    def apply_once():   # alternate g and its inverse so every run does real work and the model stays valid
        hf_gauge.apply_gauge(model, ginv if state["flip"] else g)
        state["flip"] = not state["flip"]

    def naive_once():
        naive_apply(model, ginv if state["flip"] else g)
        state["flip"] = not state["flip"]

    t_clone = median_time(clone_all, reps)
    t_apply = median_time(apply_once, reps)
    t_naive = median_time(naive_once, reps)
    t_clone2 = median_time(clone_all, reps)
    t_clone = min(t_clone, t_clone2)
    res = {
        "model": "SmolLM2-135M-Instruct", "dtype": args.dtype, "bytes": n_bytes, "reps": reps,
        "clone_s": t_clone, "apply_s": t_apply, "naive_s": t_naive,
        "apply_over_clone": t_apply / t_clone, "naive_over_clone": t_naive / t_clone, "goal_apply_over_clone": 1.5,
    }
    write_result(f"bench_apply_{args.dtype}" + ("_quick" if args.quick else ""), res)
    print(f"clone every parameter: {t_clone*1e3:8.1f} ms  ({n_bytes/2**20:.0f} MiB)")
    print(f"apply_gauge          : {t_apply*1e3:8.1f} ms  ratio {t_apply/t_clone:.2f} (goal <= 1.5)")
    print(f"naive index+mul+copy : {t_naive*1e3:8.1f} ms  ratio {t_naive/t_clone:.2f}")
    return res


if __name__ == "__main__":
    main()
