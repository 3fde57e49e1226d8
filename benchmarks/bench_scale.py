"""Models that do not fit in memory: data-free find and verify straight from checkpoint files, at Llama-3-8B width.

Writes once (to --workdir, default a temporary folder under /tmp, deleted at the end) a random bf16 checkpoint with
Llama-3-8B's shapes (d=4096, d_ff=14336, vocab 128256, 32 query / 8 KV heads of 128) but 8 of its 32 layers, sharded
(embeddings + final norm; layers 0-3; layers 4-7) with an index json and config.json, written tensor by tensor with
safetensors (no model is built); then its gauged copy with the streaming apply. A 4-layer view of both (config with 4
layers and the first two shards, hard-linked) gives the per-layer cost: ``(t_8 - t_4) / 4``.

Measured in one run, each in a fresh subprocess (peak RSS = ``VmHWM``), rounds interleaved, after an untimed read of
both checkpoints (so that no round starts with files evicted from the page cache by whatever ran before):
- ``find``: ``find_gauge_from_files(A, B)`` (residual, data-free; the default row cap, and the former ``8 d``)
  against the I/O floor: reading every tensor the features need once, from both checkpoints, with positional reads
  (``os.preadv``) in the reader's 32 MB blocks, in a fresh process that imports what reading needs (torch, and
  transformers for the config), as the find worker does. Exact recovery of the hidden gauge is checked.
- ``verify``: ``verify_files(A, B, g)`` against reading both checkpoints once (the same reads).
Both find and verify map the files instead of copying them (``CheckpointFiles.mapped_blocks``); the floor copies.
- the matching step alone (``match_correlation``: Hungarian + margins) on a planted d=8192 similarity (70B width),
  first call and later calls in a fresh process, with the default scratch and with ``overwrite=True`` (as find uses it).
``--width 8192 --only-find``: Llama-3-70B's shapes (d=8192, d_ff=28672, vocab 128256, 64 query / 8 KV heads of 128),
2 layers (about 7.6 GB a checkpoint), find against its I/O floor only, on the 2-layer files and their 1-layer view:
the difference splits each into a fixed and a per-layer part, extrapolated to 80 layers (results/bench_scale_8192.json).
Usage: python benchmarks/bench_scale.py [--quick] [--width 4096|8192] [--only-find] [--workdir DIR [--keep] [--reuse]]
       [--rounds N] [--output FILE]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

FULL = dict(d=4096, ff=14336, vocab=128256, heads=32, kv=8, head_dim=128, layers=8, full_layers=32)
WIDE = dict(d=8192, ff=28672, vocab=128256, heads=64, kv=8, head_dim=128, layers=2, full_layers=80)   # Llama-3-70B
QUICK = dict(d=64, ff=96, vocab=512, heads=4, kv=2, head_dim=16, layers=2, full_layers=4)


# ----------------------------------------------------------------------------------------------------------------
# writing the checkpoint (no model is built)
# ----------------------------------------------------------------------------------------------------------------
def _tensors(s: dict, layers: range) -> dict[str, tuple[int, ...]]:
    d, ff, hd = s["d"], s["ff"], s["head_dim"]
    out = {}
    for i in layers:
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (s["heads"] * hd, d), p + "self_attn.k_proj.weight": (s["kv"] * hd, d),
                    p + "self_attn.v_proj.weight": (s["kv"] * hd, d), p + "self_attn.o_proj.weight": (d, s["heads"] * hd),
                    p + "mlp.gate_proj.weight": (ff, d), p + "mlp.up_proj.weight": (ff, d),
                    p + "mlp.down_proj.weight": (d, ff), p + "input_layernorm.weight": (d,),
                    p + "post_attention_layernorm.weight": (d,)})
    return out


def _random_bf16(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Weights ~ N(0, 0.02) (gains ~ N(1, 0.3): generic, the B_d regime), drawn in chunks of rows."""
    out = torch.empty(shape, dtype=torch.bfloat16)
    flat = out.view(shape[0], -1)
    step = max(1, (16 << 20) // max(1, flat.shape[1]))
    for r0 in range(0, flat.shape[0], step):
        x = torch.randn(flat[r0:r0 + step].shape, generator=gen)
        flat[r0:r0 + step] = (x * 0.3 + 1.0) if len(shape) == 1 else x * 0.02
    return out


def write_checkpoint(folder: Path, s: dict, seed: int = 0) -> int:
    """Random bf16 Llama checkpoint of shapes ``s``: three shards, index json, config.json. Returns bytes written."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    half = s["layers"] // 2
    shards = [{"model.embed_tokens.weight": (s["vocab"], s["d"]), "model.norm.weight": (s["d"],),
               "lm_head.weight": (s["vocab"], s["d"])},
              _tensors(s, range(half)), _tensors(s, range(half, s["layers"]))]
    weight_map, total = {}, 0
    for k, spec in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: _random_bf16(shape, gen) for n, shape in spec.items()}
        total += sum(t.numel() * 2 for t in tensors.values())
        save_file(tensors, folder / name, metadata={"format": "pt"})
        del tensors
        weight_map.update({n: name for n in spec})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}, indent=1))
    LlamaConfig(hidden_size=s["d"], intermediate_size=s["ff"], num_hidden_layers=s["layers"],
                num_attention_heads=s["heads"], num_key_value_heads=s["kv"], head_dim=s["head_dim"],
                vocab_size=s["vocab"], tie_word_embeddings=False, dtype="bfloat16").save_pretrained(folder)
    return total


def half_view(src: Path, dst: Path) -> None:
    """A checkpoint of the first half of the layers: config with half the depth, the first two shards hard-linked
    (regular files: hf_gauge refuses symbolic links that leave an input folder)."""
    index = json.loads((src / "model.safetensors.index.json").read_text())
    cfg = json.loads((src / "config.json").read_text())
    first = sorted(set(index["weight_map"].values()))[:2]
    dst.mkdir(parents=True)
    for name in first:
        os.link(src / name, dst / name)
    cfg["num_hidden_layers"] //= 2
    (dst / "config.json").write_text(json.dumps(cfg))
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v in first}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))


# ----------------------------------------------------------------------------------------------------------------
# workers (run in fresh subprocesses: peak RSS is the worker's)
# ----------------------------------------------------------------------------------------------------------------
def _read_once(folders: list[str], needed_only: bool) -> int:
    """The I/O floor: every (needed) tensor of each checkpoint read once, with the same block reads."""
    from hf_gauge.engine import axes_for
    from hf_gauge.filefeatures import CheckpointFiles

    n = 0
    for folder in folders:
        with CheckpointFiles(folder) as f:
            for name in f.names():
                axes = axes_for(f.spec, name)
                if needed_only and not (axes and any(a.space == "residual" for a in axes)):
                    continue
                for blk in f.row_blocks(name):
                    n += blk.numel() * blk.element_size()
    return n


def _peak_rss() -> int:
    """This process's peak RSS: ``VmHWM`` (``ru_maxrss`` would carry the parent's RSS at fork across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args: list[str]) -> dict:
    mode, a, b, gdir = args
    import hf_gauge

    t0 = time.perf_counter()
    out: dict = {}
    if mode == "floor_find":
        out["bytes"] = _read_once([a, b], needed_only=True)
    elif mode == "floor_all":
        out["bytes"] = _read_once([a, b], needed_only=False)
    elif mode in ("find", "find_rows_8d"):         # the default vocabulary row cap (2048), or the former 8 d
        kw = {"max_rows": 8 * int(json.loads((Path(a) / "config.json").read_text())["hidden_size"])} \
            if mode == "find_rows_8d" else {}
        g = hf_gauge.find_gauge(a, b, **kw)
        out["exact"] = bool(g.residual == hf_gauge.load_gauge(gdir).residual)
        out["min_margin"] = float(g.metrics["min_margin"])
    elif mode in ("match", "match_overwrite"):    # the matching step alone, first call in a fresh process
        out.update(bench_matching(int(a), 3, overwrite=mode == "match_overwrite"))
    elif mode == "verify":
        from hf_gauge.fileverify import verify_files
        rep = verify_files(a, b, hf_gauge.load_gauge(gdir))
        out["ok"], out["bytes"] = rep["ok"] and rep["weights_bit_exact"], rep["bytes"]
    else:
        raise SystemExit(f"unknown worker mode {mode}")
    out["seconds"] = time.perf_counter() - t0
    out["max_rss_bytes"] = _peak_rss()
    return out


def run_worker(mode: str, a: Path, b: Path, gdir: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    r = subprocess.run([sys.executable, __file__, "--worker", mode, str(a), str(b), str(gdir)], env=env,
                       capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"worker {mode} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------
# the matching step alone
# ----------------------------------------------------------------------------------------------------------------
def bench_matching(d: int, reps: int, overwrite: bool = False) -> dict:
    """``match_correlation`` on ``C = noise + a planted signed permutation`` (the matched |C| in [0.5, 1]).

    ``overwrite``: as ``find_gauge`` calls it, on a C it no longer needs (``overwrite=True``: C's memory is the
    cost); each call gets its own copy of C, made before the clock starts (the pipeline's C is fresh too)."""
    from hf_gauge.group import SignedPermutation
    from hf_gauge.match import match_correlation

    g = SignedPermutation.random(d, 0)
    rng = np.random.default_rng(0)
    C = rng.standard_normal((d, d)) * 0.05
    C[g.perm.numpy(), np.arange(d)] = g.sign.numpy() * rng.uniform(0.5, 1.0, d)
    times, exact = [], True
    for _ in range(reps):
        x = C.copy() if overwrite else C
        t0 = time.perf_counter()
        m = match_correlation(x, overwrite=overwrite)
        times.append(time.perf_counter() - t0)
        exact &= m.element == g
        del x
    return {"d": d, "seconds_all": times, "seconds_first": times[0], "seconds_median": statistics.median(times),
            "exact": bool(exact)}


def _provenance() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"commit": commit, "script_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16],
            "load_average": os.getloadavg()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (the test suite's smoke run)")
    ap.add_argument("--workdir", help="where the checkpoints are written (default: a new folder under /tmp)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds of each measurement (default 2)")
    ap.add_argument("--match-d", type=int, default=None, help="width of the matching benchmark (default 8192)")
    ap.add_argument("--output", help="result file (default results/bench_scale[_8192|_quick].json)")
    ap.add_argument("--width", type=int, choices=(4096, 8192), default=4096,
                    help="4096: Llama-3-8B's shapes, 8 layers; 8192: Llama-3-70B's shapes (d_ff 28672, 64 query / 8 KV "
                         "heads), 2 layers, ~7.6 GB a checkpoint")
    ap.add_argument("--only-find", action="store_true", help="measure find and its I/O floor only (full and "
                                                               "half depth; no verify, no 8 d row cap)")
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    ap.add_argument("--reuse", action="store_true", help="use the checkpoints a --keep run left in --workdir")
    args = ap.parse_args(argv)
    s = QUICK if args.quick else WIDE if args.width == 8192 else FULL
    rounds = args.rounds or (1 if args.quick else 2)
    match_d = args.match_d or (256 if args.quick else 8192)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="hf_gauge_bench_scale."))
    res: dict = {"shapes": s, "rounds": rounds, **_provenance()}
    try:
        import hf_gauge
        from hf_gauge import Gauge, SignedPermutation

        A, B, G = work / "A", work / "B", work / "G"
        if not (args.reuse and all((work / x).is_dir() for x in ("A", "B", "G", "A_half", "B_half"))):
            t0 = time.perf_counter()
            write_checkpoint(A, s)
            res["write_s"] = time.perf_counter() - t0
            g = Gauge(spaces={"residual": SignedPermutation.random(s["d"], 1)},
                      source={"model_type": "llama", "hidden_size": s["d"]})
            g.save_pretrained(G)
            t0 = time.perf_counter()
            hf_gauge.apply_gauge_to_checkpoint(A, g, B, progress=False, durable=False)
            res["stream_apply_s"] = time.perf_counter() - t0
            half_view(A, work / "A_half"), half_view(B, work / "B_half")
        res["checkpoint_bytes"] = sum(f.stat().st_size for f in A.glob("*.safetensors"))
        times: dict[str, list[dict]] = {k: [] for k in ("floor_find", "find", "find_rows_8d", "floor_find_half",
                                                         "find_half", "floor_all", "verify")}
        res["warm_up_s"] = run_worker("floor_all", A, B, G)["seconds"]   # untimed: the rounds start with the files cached
        plan = (("floor_find", "floor_find", A, B), ("find", "find", A, B),
                ("find_rows_8d", "find_rows_8d", A, B),
                ("floor_find_half", "floor_find", work / "A_half", work / "B_half"),
                ("find_half", "find", work / "A_half", work / "B_half"),
                ("floor_all", "floor_all", A, B), ("verify", "verify", A, B))
        if args.only_find:
            plan = plan[:2] + plan[3:5]
            times = {k: v for k, v in times.items() if k in ("floor_find", "find", "floor_find_half", "find_half")}
        for _ in range(rounds):                              # interleaved: drift in the machine's speed hits all
            for key, mode, a, b in plan:
                times[key].append(run_worker(mode, a, b, G))
        if args.only_find:
            res.update({"runs": times, "median_s": {k: statistics.median(r["seconds"] for r in v)
                                                    for k, v in times.items()},
                        "find_exact": all(r["exact"] for r in times["find"]),
                        "find_over_io_floor": statistics.median(f["seconds"] / fl["seconds"] for f, fl in
                                                                zip(times["find"], times["floor_find"])),
                        "find_over_io_floor_all": [f["seconds"] / fl["seconds"] for f, fl in
                                                   zip(times["find"], times["floor_find"])],
                        "goal_find_over_io_floor": 1.3,
                        "find_peak_rss_bytes": max(r["max_rss_bytes"] for r in times["find"]),
                        "goal_find_peak_rss_bytes": 3 << 30,
                        "floor_peak_rss_bytes": max(r["max_rss_bytes"] for r in times["floor_find"]),
                        "load_average_after": os.getloadavg()})
            res.update(_depth(res["median_s"], s))
            return _finish(args, res)
        med = {k: statistics.median(r["seconds"] for r in v) for k, v in times.items()}
        find_ratio = statistics.median(f["seconds"] / fl["seconds"] for f, fl in zip(times["find"], times["floor_find"]))
        verify_ratio = statistics.median(v["seconds"] / fl["seconds"] for v, fl in zip(times["verify"], times["floor_all"]))
        per_layer = (med["find"] - med["find_half"]) / (s["layers"] - s["layers"] // 2)
        fixed = med["find"] - per_layer * s["layers"]
        res.update({
            "runs": times, "median_s": med,
            "find_exact": all(r["exact"] for r in times["find"] + times["find_half"] + times["find_rows_8d"]),
            "find_over_io_floor": find_ratio, "goal_find_over_io_floor": 1.5,
            "find_rows_8d_over_io_floor": statistics.median(
                f["seconds"] / fl["seconds"] for f, fl in zip(times["find_rows_8d"], times["floor_find"])),
            "find_peak_rss_bytes": max(r["max_rss_bytes"] for r in times["find"]), "goal_find_peak_rss_bytes": 3 << 30,
            "floor_peak_rss_bytes": max(r["max_rss_bytes"] for r in times["floor_find"]),
            "find_per_layer_s": per_layer, "find_fixed_s": fixed,
            "find_full_depth_extrapolated_s": fixed + per_layer * s["full_layers"],
            "verify_ok": all(r["ok"] for r in times["verify"]),
            "verify_over_read_both": verify_ratio, "goal_verify_over_read_both": 1.3,
            "matching": run_worker("match", Path(str(match_d)), Path("-"), Path("-")),
            "matching_overwrite": run_worker("match_overwrite", Path(str(match_d)), Path("-"), Path("-")),
            "goal_matching_s": 3.0,
            "load_average_after": os.getloadavg(),
        })
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return _finish(args, res)


def _depth(med: dict[str, float], s: dict) -> dict:
    """Find and its floor split into a fixed part and a per-layer part (from the full and the half-depth view of the
    same files), extrapolated to the model's full depth: the ratio a real checkpoint of this width would see."""
    layers, half = s["layers"], s["layers"] // 2
    out = {}
    for key in ("find", "floor_find"):
        per_layer = (med[key] - med[key + "_half"]) / (layers - half)
        out[key + "_per_layer_s"] = per_layer
        out[key + "_fixed_s"] = med[key] - per_layer * layers
        out[key + "_full_depth_extrapolated_s"] = out[key + "_fixed_s"] + per_layer * s["full_layers"]
    out["find_over_io_floor_full_depth_extrapolated"] = (out["find_full_depth_extrapolated_s"]
                                                         / out["floor_find_full_depth_extrapolated_s"])
    return out


def _finish(args: argparse.Namespace, res: dict) -> dict:
    """Write the result file (default ``results/bench_scale[_8192|_quick].json``) and print it."""
    if args.output:
        Path(args.output).write_text(json.dumps(res, indent=2))
    else:
        write_result("bench_scale" + ("_quick" if args.quick else "_8192" if args.width == 8192 else ""), res)
    print(json.dumps({k: v for k, v in res.items() if k not in ("runs",)}, indent=1, default=str))
    return res


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        print(json.dumps(worker(sys.argv[2:])))
    else:
        main()
