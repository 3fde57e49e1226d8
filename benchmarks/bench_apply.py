"""apply_gauge on real SmolLM2-135M vs cloning every parameter once (``p.data = p.data.clone()``), in one run.

``apply`` runs with the compiled kernels (``HF_GAUGE_KERNELS=numba``; numba loaded before timing: this is the
steady state of a process that has paid the 0.7 s load once), ``apply_torch`` with torch's gathers (what a fresh
process applying a model this small gets by default, ``auto``). Also times a naive implementation (index, multiply,
copy back) as a second baseline. Rounds interleave the four; the ratios are medians of the per-round ratios.
``--model llama-3-8b-width`` measures the regime the kernels are for: Llama-3-8B's shapes (d=4096, d_ff=14336,
vocab 128256, GQA 32/8, untied head) with 2 of its 32 layers, random weights (3 GB in bf16); there a clone of a
tensor pays page faults on fresh memory that SmolLM2's small, recycled tensors do not.
Usage: python benchmarks/bench_apply.py [--quick] [--dtype float32|bfloat16] [--model smollm2|llama-3-8b-width]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_gauge  # noqa: E402
from hf_gauge.engine import moves_for  # noqa: E402
from hf_gauge.specs import get_spec  # noqa: E402
from hf_gauge.weights import load_smollm2  # noqa: E402
from _common import write_result  # noqa: E402


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


def llama_8b_width(dtype: torch.dtype, layers: int = 2):
    """A LlamaForCausalLM with Llama-3-8B's shapes but ``layers`` layers, random weights in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model


def main(argv=None) -> dict:
    before = os.environ.get("HF_GAUGE_KERNELS")
    try:
        return run(argv)
    finally:                                      # the test suite calls main() in its own process
        if before is None:
            os.environ.pop("HF_GAUGE_KERNELS", None)
        else:
            os.environ["HF_GAUGE_KERNELS"] = before


def run(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default 15, 5 at 8B width, quick 3)")
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "llama-3-8b-width"])
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    load_before = os.getloadavg()
    big = args.model == "llama-3-8b-width"
    model = llama_8b_width(dtype) if big else load_smollm2(dtype=dtype)[0]
    g = hf_gauge.random_gauge(model, seed=0)
    ginv = g.inverse()
    reps = args.reps or (3 if args.quick else 5 if big else 15)
    params = list(model.parameters())
    n_bytes = sum(p.numel() * p.element_size() for p in params)

    def clone_all():   # the floor for any out-of-place per-tensor move: same allocations, one copy each
        for p in params:
            p.data = p.data.clone()

    state = {"flip": False}

    def apply_once():   # alternate g and its inverse so every run does real work and the model stays valid
        hf_gauge.apply_gauge(model, ginv if state["flip"] else g)
        state["flip"] = not state["flip"]

    def apply_torch_once():
        os.environ["HF_GAUGE_KERNELS"] = "torch"
        try:
            apply_once()
        finally:
            os.environ["HF_GAUGE_KERNELS"] = "numba"

    def naive_once():
        naive_apply(model, ginv if state["flip"] else g)
        state["flip"] = not state["flip"]

    # rounds interleave the four, so drift in the shared machine's speed weighs on all of them alike; the ratio
    # reported is the median of the per-round ratios (the medians of each time are reported too)
    os.environ["HF_GAUGE_KERNELS"] = "numba"
    times: dict[str, list[float]] = {"clone": [], "apply": [], "apply_torch": [], "naive": []}
    for fn in (clone_all, apply_once, apply_torch_once, naive_once):     # warm-up round (loads numba)
        fn()
    for _ in range(reps):
        for name, fn in (("clone", clone_all), ("apply", apply_once), ("apply_torch", apply_torch_once),
                         ("naive", naive_once)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    t_clone, t_apply, t_naive = med["clone"], med["apply"], med["naive"]
    ratio = statistics.median(a / c for a, c in zip(times["apply"], times["clone"]))
    res = {
        "model": "Llama-3-8B shapes, 2 of 32 layers, random weights" if big else "SmolLM2-135M-Instruct", "dtype": args.dtype, "bytes": n_bytes, "reps": reps,
        "clone_s": t_clone, "apply_s": t_apply, "naive_s": t_naive,
        "apply_over_clone": ratio,
        "naive_over_clone": statistics.median(a / c for a, c in zip(times["naive"], times["clone"])),
        "apply_over_clone_all_rounds": [a / c for a, c in zip(times["apply"], times["clone"])],
        "apply_torch_s": med["apply_torch"],
        "apply_torch_over_clone": statistics.median(a / c for a, c in zip(times["apply_torch"], times["clone"])),
        "goal_apply_over_clone": 1.5,
        "commit": subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                                 capture_output=True, text=True, timeout=30).stdout.strip(),
        "script_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "load_average": load_before, "load_average_after": os.getloadavg(),
    }
    write_result(f"bench_apply_{args.dtype}" + ("_8b_width" if big else "") + ("_quick" if args.quick else ""), res)
    print(f"clone every parameter: {t_clone*1e3:8.1f} ms  ({n_bytes/2**20:.0f} MiB)")
    print(f"apply_gauge (numba)  : {t_apply*1e3:8.1f} ms  ratio {ratio:.2f} (goal <= 1.5)")
    print(f"apply_gauge (torch)  : {med['apply_torch']*1e3:8.1f} ms  ratio {res['apply_torch_over_clone']:.2f}")
    print(f"naive index+mul+copy : {t_naive*1e3:8.1f} ms  ratio {res['naive_over_clone']:.2f}")
    return res


if __name__ == "__main__":
    main()
