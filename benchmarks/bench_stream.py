"""Benchmark: streaming gauge apply on a sharded checkpoint vs a plain safetensors read+write of the same shards.

Each measurement runs in a fresh subprocess; rounds interleave the modes. ``stream`` is one apply in a fresh
process (what the CLI pays), ``stream-warm`` the second apply in one process (first-touch page faults and allocator
warm-up paid by an untimed first run), ``stream-durable`` fsyncs every shard before the final rename. The memory the operation adds is the peak of the current RSS
(sampled every 2 ms from /proc/self/statm) minus the RSS just before it; ``ru_maxrss`` is reported too, but it is a
high-water mark that includes import-time spikes (torch + transformers peak around 430 MB here).

    python benchmarks/bench_stream.py --quick     # synthetic ~200 MB Llama checkpoint, 40 MB shards
    python benchmarks/bench_stream.py             # real SmolLM2-135M (fp32, ~540 MB) in 100 MB shards

Goals: time <= 1.3x the plain copy; added peak RSS <= largest tensor + 200 MB.
Results: benchmarks/results/bench_stream.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _rss_mb() -> float:
    """Peak resident set size of this process so far (high-water mark, includes imports)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux: KiB


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _Sampler:
    """Samples the current RSS every 2 ms in a thread: the peak the operation itself adds above the baseline."""

    def __init__(self) -> None:
        import threading
        self.peak = self.base = _current_rss_mb()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _current_rss_mb())

    def __enter__(self) -> "_Sampler":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _current_rss_mb())


def worker(mode: str, src: str, out: str, gauge: str) -> None:
    import torch  # noqa: F401
    from safetensors.torch import load_file, save_file

    import hf_gauge
    from hf_gauge.checkpoint import apply_gauge_to_checkpoint

    from transformers import AutoConfig
    AutoConfig.from_pretrained(src)   # warm the config machinery (lazy imports) before measuring
    g = hf_gauge.load_gauge(gauge) if mode != "plain" else None
    if mode == "stream-warm":    # a first apply in this process, untimed: what remains is the steady-state cost
        apply_gauge_to_checkpoint(src, g, out + ".warmup", progress=False, durable=False)
        shutil.rmtree(out + ".warmup")
    base = _rss_mb()
    with _Sampler() as s:
        t0 = time.perf_counter()
        if mode == "plain":
            os.makedirs(out)
            for shard in sorted(Path(src).glob("*.safetensors")):
                save_file(load_file(shard), Path(out) / shard.name, metadata={"format": "pt"})
        else:
            apply_gauge_to_checkpoint(src, g, out, progress=False, durable=(mode == "stream-durable"))
        dt = time.perf_counter() - t0
    print(json.dumps({"seconds": dt, "peak_rss_mb": _rss_mb(), "baseline_rss_mb": base,
                      "sampled_added_rss_mb": s.peak - s.base}))


def run_worker(mode: str, src: Path, out: Path, gauge: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    r = subprocess.run([sys.executable, __file__, "--worker", mode, str(src), str(out), str(gauge)],
                       capture_output=True, text=True, env=env, check=False)
    if r.returncode != 0:
        raise SystemExit(f"worker {mode} failed:\n{r.stderr[-2000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return res


def build_checkpoint(quick: bool, root: Path) -> tuple[Path, str, str]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import hf_gauge

    src = root / "src"
    if quick:
        torch.manual_seed(0)
        cfg = AutoConfig.for_model("llama", hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, vocab_size=32000,
                                   tie_word_embeddings=False)
        model = AutoModelForCausalLM.from_config(cfg)
        shard, name = "40MB", "synthetic-llama-d512-L4 fp32"
    else:
        from hf_gauge.weights import smollm2_path
        model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
        shard, name = "100MB", "SmolLM2-135M-Instruct fp32"
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.3)
    model.save_pretrained(src, max_shard_size=shard)
    g = hf_gauge.random_gauge(model, seed=0, spaces=("residual", "mlp", "attn"))
    g.save_pretrained(root / "gauge")
    return src, name, shard


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small synthetic checkpoint (seconds)")
    ap.add_argument("--repeats", type=int, default=None, help="rounds of every mode, best time kept (default 5, quick 3)")
    ap.add_argument("--output", default=str(HERE / "results" / "bench_stream.json"))
    ap.add_argument("--worker", nargs=4, metavar=("MODE", "SRC", "OUT", "GAUGE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    from safetensors import safe_open

    repeats = args.repeats or (3 if args.quick else 5)
    with tempfile.TemporaryDirectory(prefix="bench_stream-") as tmp:
        root = Path(tmp)
        src, name, shard = build_checkpoint(args.quick, root)
        shards = sorted(src.glob("*.safetensors"))
        total = sum(p.stat().st_size for p in shards)
        largest_tensor = 0
        largest_shard_tensors = 0
        for p in shards:
            with safe_open(p, "pt") as f:
                sizes = [f.get_slice(k).get_shape() for k in f.keys()]
            nbytes = [4 * (1 if not s else __import__("math").prod(s)) for s in sizes]
            largest_tensor = max(largest_tensor, max(nbytes))
            largest_shard_tensors = max(largest_shard_tensors, sum(nbytes))
        results: dict[str, dict] = {}
        modes = ("plain", "stream", "stream-warm", "stream-durable")
        # rounds interleave the modes, so page-cache and filesystem state (writeback of the last output, ext4
        # discards of deleted files) weigh on every mode alike rather than on whichever ran in a noisy stretch
        all_runs: dict[str, list[dict]] = {m: [] for m in modes}
        for _ in range(repeats):
            for mode in modes:
                all_runs[mode].append(run_worker(mode, src, root / f"out-{mode}", root / "gauge"))
        for mode, runs in all_runs.items():
            best = min(runs, key=lambda r: r["seconds"])
            results[mode] = {"seconds_best": best["seconds"], "seconds_all": [r["seconds"] for r in runs],
                             "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                             "added_rss_mb": max(r["sampled_added_rss_mb"] for r in runs),
                             "maxrss_above_import_highwater_mb": max(r["peak_rss_mb"] - r["baseline_rss_mb"]
                                                                     for r in runs),
                             "throughput_mb_s": total / 1e6 / best["seconds"]}
        plain, stream = results["plain"], results["stream"]
        report = {
            "checkpoint": name, "quick": args.quick, "n_shards": len(shards), "max_shard_size": shard,
            "checkpoint_mb": total / 1e6, "largest_tensor_mb": largest_tensor / 1e6,
            "largest_shard_tensors_mb": largest_shard_tensors / 1e6,
            "results": results,
            "time_ratio_stream_vs_plain": stream["seconds_best"] / plain["seconds_best"],
            "time_ratio_stream_vs_plain_median": (statistics.median(stream["seconds_all"])
                                                  / statistics.median(plain["seconds_all"])),
            "time_ratio_warm_vs_plain": results["stream-warm"]["seconds_best"] / plain["seconds_best"],
            "time_ratio_durable_vs_plain": results["stream-durable"]["seconds_best"] / plain["seconds_best"],
            "goal_time_ratio": 1.3,
            "rss_budget_mb": largest_tensor / 1e6 + 200,
            "meets_time_goal": stream["seconds_best"] <= 1.3 * plain["seconds_best"],
            "meets_rss_goal": stream["added_rss_mb"] <= largest_tensor / 1e6 + 200,
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                        "load_avg": os.getloadavg()},
        }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
