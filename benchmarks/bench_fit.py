"""Benchmark: fitting gauges on real SmolLM2-135M, and Hungarian matching at LLM widths.

Measures, in one run (so ratios compare like with like):
- ``gauge_to(B, data=x)`` vs the bare forward passes of both models on ``x`` (goal <= 1.2x); also against the
  forward passes of the decoder bodies alone (``model.model``, no lm_head), which is all the fit runs;
- data-free ``gauge_to(B)`` vs one forward pass of A on ``x`` (goal <= 1.0x);
- ``match_correlation`` (Hungarian + margins) on realistic noisy correlation matrices at d = 4096 and 8192.

Run: ``python benchmarks/bench_fit.py [--quick]``; writes ``benchmarks/results/bench_fit.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hf_gauge  # noqa: E402
from hf_gauge.match import match_correlation  # noqa: E402
from hf_gauge.weights import load_smollm2  # noqa: E402


def _text_ids(tok, n: int, T: int) -> torch.Tensor:
    from pydoc_data.topics import topics
    text = " ".join(topics[k] for k in sorted(topics))
    ids = tok(text, return_tensors="pt").input_ids[0]
    if ids.numel() < n * T:
        raise SystemExit(f"not enough text for {n}x{T} tokens")
    return ids[: n * T].reshape(n, T)


@torch.no_grad()
def _forward(model, x: torch.Tensor, batch_size: int) -> None:
    for i in range(0, x.shape[0], batch_size):
        model(input_ids=x[i:i + batch_size], use_cache=False)


def _body(model):
    """The decoder without its lm_head (``LlamaForCausalLM.model``)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def _best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _noisy_correlation(d: int, n_tokens: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A correlation-like matrix: true signed partners with |C| in [0.3, 0.95], estimation noise 1/sqrt(n_tokens),
    and a low-rank shared component (coordinates that co-vary), as pooled residual statistics look."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(d)
    sign = rng.choice([-1.0, 1.0], size=d)
    C = rng.standard_normal((d, d)) / np.sqrt(n_tokens)
    U = rng.standard_normal((d, 8)) / np.sqrt(8)
    C += 0.1 * (U @ rng.standard_normal((8, d)) / np.sqrt(8))
    C[perm, np.arange(d)] = sign * rng.uniform(0.3, 0.95, size=d)
    return np.clip(C, -1, 1), perm, sign


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens and repetitions")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_fit.json"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--widths", default="4096,8192")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions, best kept")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n, T, bs = (8, 128, 8) if args.quick else (32, 256, 8)
    reps = args.reps

    A, tok = load_smollm2()
    B = copy.deepcopy(A)
    hidden = hf_gauge.random_gauge(B, seed=0)
    B.apply_gauge(hidden)
    x = _text_ids(tok, n, T)
    _forward(A, x[:1, :16], 1)                                   # warm-up
    _forward(B, x[:1, :16], 1)

    fits, fwd2, body2, fwd1, frees = [], [], [], [], []
    g = g_free = None
    for _ in range(reps):                                        # interleaved: shared-machine noise hits both
        fwd2.append(_best(lambda: (_forward(A, x, bs), _forward(B, x, bs)), 1))
        body2.append(_best(lambda: (_forward(_body(A), x, bs), _forward(_body(B), x, bs)), 1))
        t = time.perf_counter()
        g = A.gauge_to(B, data=x, batch_size=bs, progress=False)
        fits.append(time.perf_counter() - t)
        fwd1.append(_best(lambda: _forward(A, x, bs), 1))
        t = time.perf_counter()
        g_free = A.gauge_to(B)
        frees.append(time.perf_counter() - t)
    res: dict = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu_count": os.cpu_count(), "platform": platform.platform(), "quick": args.quick},
        "model": "SmolLM2-135M-Instruct fp32 (d=576, 30 layers)",
        "tokens": int(x.numel()), "shape": list(x.shape), "batch_size": bs,
        "fit_with_data": {
            "seconds": min(fits), "forward_both_seconds": min(fwd2), "ratio": min(fits) / min(fwd2), "goal": 1.2,
            "forward_both_bodies_seconds": min(body2), "ratio_vs_bodies": min(fits) / min(body2),
            "exact": bool(g == hidden), "n_sites": g.metrics["n_sites"], "min_margin": g.metrics["min_margin"],
        },
        "data_free": {
            "seconds": min(frees), "forward_one_seconds": min(fwd1), "ratio": min(frees) / min(fwd1), "goal": 1.0,
            "exact": bool(g_free == hidden), "min_margin": g_free.metrics["min_margin"],
        },
        "hungarian": [],
    }
    print(json.dumps({k: res[k] for k in ("fit_with_data", "data_free")}, indent=1), flush=True)
    for d in [int(w) for w in args.widths.split(",") if w]:
        C, perm, sign = _noisy_correlation(d, n_tokens=2000, seed=d)
        t = time.perf_counter()
        m = match_correlation(C, "signed")
        dt = time.perf_counter() - t
        acc = float(np.mean((m.element.perm.numpy() == perm) & (m.element.sign.numpy() == sign)))
        row = {"d": d, "seconds": dt, "accuracy": acc, "min_margin": float(m.margin.min())}
        res["hungarian"].append(row)
        print(json.dumps(row), flush=True)
        del C
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
