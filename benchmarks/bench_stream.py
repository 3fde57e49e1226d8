"""Benchmark: ``hf-gauge apply`` of a sharded checkpoint against a plain copy of its shards, both fresh processes.

The pair, as users meet it (issue 28):
- ``apply``: ``python -m hf_gauge apply SRC --gauge G -o OUT --no-progress`` in a fresh process (default kernels,
  durable output: every shard fsynced before the folder is published), full gauge (``spaces="all"``);
- ``apply-numba`` / ``apply-torch``: the same with ``HF_GAUGE_KERNELS=numba`` / ``torch`` (by default the one the
  default does not pick for this checkpoint: numba loads for jobs moving 2^30 elements or more);
- ``apply-direct`` / ``apply-buffered``: the same with ``--io direct`` / ``--io buffered`` (by default the one
  ``--io auto`` does not pick here: direct I/O when the checkpoint and its output exceed the available memory);
- ``copy``: a fresh process that imports torch, transformers and safetensors and copies every shard through
  ``safetensors.torch.load_file`` and ``save_file``.
Each is timed from the parent (process start to exit: imports included), with its CPU time (user + system: less
sensitive than wall time to other jobs on a shared machine); peak RSS is the child's ``ru_maxrss``
(``os.wait4``; the parent imports neither torch nor hf_gauge), and ``added`` subtracts the peak of a fresh process
that only imports what that apply imports (numba included where it loads the kernels).
Rounds interleave the modes (the machine is shared: drift hits every mode alike); medians, min and max are reported,
with the load average before each round. In the first round, every apply mode's output is checked bit-exact with
``verify_files``.

Cases: ``bf16`` (default): random Llama, 8 layers at d=2560, d_ff 6912, vocab 50,000, untied, 1.8 GB in 400 MB shards.
``fp32``: SmolLM2-135M-Instruct fp32 (offline weights, 540 MB) in 100 MB shards. ``fp32_large``: the ``bf16``
case's shapes in fp32 (3.6 GB in 800 MB shards). ``wide20``: 19.6 GB of random
bf16 Llama at Llama-3-70B width, 9 layers, written tensor by tensor (the top of the issue's 0.5-20 GB range; needs
about 40 GB of free disk in ``--workdir``). ``quick``: a 40 MB fp32 Llama in 10 MB shards (the test suite's smoke
run). ``--src`` measures an existing checkpoint (the 7.6 GB result: bench_scale's 2-layer d=8192 files).

    python benchmarks/bench_stream.py [--case bf16|fp32|fp32_large|wide20|quick | --src CHECKPOINT] [--rounds N] [--output FILE]

Goals: apply <= 1.2x the copy (median), bit-exact; added peak RSS <= largest tensor + 200 MB.
Results: benchmarks/results/bench_stream_<case>.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

COPY = """
import os, sys
from pathlib import Path
import torch, transformers
from safetensors.torch import load_file, save_file
src, out = Path(sys.argv[1]), Path(sys.argv[2])
os.makedirs(out)
for shard in sorted(src.glob("*.safetensors")):
    save_file(load_file(shard), out / shard.name, metadata={"format": "pt"})
"""
IMPORTS = "import hf_gauge.cli, hf_gauge.checkpoint, tqdm.auto"       # what an apply imports (+ numba: kernels)
KERNEL_IMPORT_ELEMENTS = 1 << 30    # hf_gauge.engine's: a default apply moving this many elements loads numba

CASES = {
    "bf16": dict(d=2560, ff=6912, layers=8, heads=20, vocab=50000, dtype="bfloat16", shard="400MB",
                 name="random Llama bf16, 8 layers at d=2560 (d_ff 6912, vocab 50,000), 400 MB shards"),
    "fp32": dict(smollm2=True, dtype="float32", shard="100MB", name="SmolLM2-135M-Instruct fp32, 100 MB shards"),
    "wide20": dict(wide_layers=9, dtype="bfloat16", shard="3 shards (4.2 / 6.8 / 8.6 GB)",
                   name="random Llama bf16 at Llama-3-70B width (d=8192, d_ff 28672, vocab 128,256), 9 layers, 19.6 GB, "
                        "written tensor by tensor (bench_scale.write_checkpoint)"),
    "fp32_large": dict(d=2560, ff=6912, layers=8, heads=20, vocab=50000, dtype="float32", shard="800MB",
                       name="random Llama fp32, 8 layers at d=2560 (d_ff 6912, vocab 50,000), 800 MB shards"),
    "quick": dict(d=256, ff=704, layers=4, heads=4, vocab=8000, dtype="float32", shard="10MB",
                  name="random Llama fp32, 4 layers at d=256, 10 MB shards (smoke run)"),
}


def build(case: dict, root: Path) -> tuple[Path, Path]:
    """The source checkpoint and a full gauge of it (``spaces="all"``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import hf_gauge

    dtype = getattr(torch, case["dtype"])
    torch.manual_seed(0)
    if case.get("wide_layers"):                  # too large to build as a model here: written tensor by tensor
        from bench_scale import WIDE, write_checkpoint
        write_checkpoint(root / "src", dict(WIDE, layers=case["wide_layers"]))
        gauge_for(root / "src", root / "gauge")
        return root / "src", root / "gauge"
    if case.get("smollm2"):
        from hf_gauge.weights import smollm2_path
        model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=dtype)
    else:
        cfg = AutoConfig.for_model("llama", hidden_size=case["d"], intermediate_size=case["ff"],
                                   num_hidden_layers=case["layers"], num_attention_heads=case["heads"],
                                   num_key_value_heads=case["heads"], vocab_size=case["vocab"],
                                   tie_word_embeddings=False)
        before = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = AutoModelForCausalLM.from_config(cfg)
        finally:
            torch.set_default_dtype(before)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.3)           # generic gains: the B_d regime
    model.save_pretrained(root / "src", max_shard_size=case["shard"])
    hf_gauge.random_gauge(model, seed=0, spaces="all").save_pretrained(root / "gauge")
    return root / "src", root / "gauge"


def gauge_for(src: Path, out: Path) -> None:
    """A full random gauge (``spaces="all"``) of an existing checkpoint, drawn from its config on the meta device
    (no weights loaded); the final-norm gain is read from the shards so that the gauge's fingerprint matches."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    import hf_gauge

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
    view = hf_gauge.get_spec(model.config.model_type).sites.final_norm
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            if view + ".weight" in f.keys():
                model.get_submodule(view).weight = torch.nn.Parameter(f.get_tensor(view + ".weight"))
    hf_gauge.random_gauge(model, seed=0, spaces="all").save_pretrained(out)


def describe(src: Path) -> str:
    """An existing checkpoint in words, from its config.json (no local path: the result files are published)."""
    cfg = json.loads((src / "config.json").read_text())
    return (f"{cfg.get('model_type')} {cfg.get('dtype') or cfg.get('torch_dtype')}, {cfg.get('num_hidden_layers')} "
            f"layers at d={cfg.get('hidden_size')} (d_ff {cfg.get('intermediate_size')}, vocab {cfg.get('vocab_size')})")


def tensor_entries(path: Path) -> list[dict]:
    """The tensor entries (dtype, shape, data_offsets) of a safetensors file's JSON header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return [v for k, v in header.items() if k != "__metadata__"]


def verify(src: str, out: str, gauge: str) -> bool:
    """``verify_files``: the output is the source moved by the gauge, bit for bit."""
    from hf_gauge import load_gauge
    from hf_gauge.fileverify import verify_files

    rep = verify_files(src, out, load_gauge(gauge))
    return bool(rep["ok"] and rep["weights_bit_exact"])


def run(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time and peak RSS of one fresh process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[:4]} failed:\n{err[-2000:]}")
    return {"seconds": dt, "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024.0}


KERNELS = ("numba", "torch")
IOS = ("buffered", "direct")


def mode_parts(mode: str) -> tuple[str | None, str | None]:
    """``(kernels, io)`` a mode forces (``apply-numba``, ``apply-direct``, ``apply-torch-buffered``; ``None``: the
    default's)."""
    parts = mode.split("-")[1:]
    bad = [p for p in parts if p not in KERNELS + IOS]
    if mode.split("-")[0] != "apply" or bad:
        raise SystemExit(f"unknown mode {mode!r}: apply[-{'|'.join(KERNELS)}][-{'|'.join(IOS)}] or copy")
    return next((p for p in parts if p in KERNELS), None), next((p for p in parts if p in IOS), None)


def mode_cmd(mode: str, src: Path, gauge: Path, out: Path) -> tuple[list[str], dict]:
    if mode == "copy":
        return [sys.executable, "-c", COPY, str(src), str(out)], {}
    kernels, io = mode_parts(mode)
    return [sys.executable, "-m", "hf_gauge", "apply", str(src), "--gauge", str(gauge), "-o", str(out),
            "--no-progress"] + (["--io", io] if io else []), {"HF_GAUGE_KERNELS": kernels} if kernels else {}


def default_io(total_bytes: int) -> tuple[str, int | None]:
    """What ``--io auto`` takes for a checkpoint of ``total_bytes`` on this machine now, and the available memory
    it judged by (``directio``'s rule, in a child: the parent imports neither torch nor hf_gauge)."""
    code = ("from hf_gauge.directio import available_memory, direct_wanted; "
            f"a = available_memory(); print(direct_wanted({total_bytes}, a), a)")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                       text=True, check=True)
    wanted, avail = r.stdout.split()[-2:]
    return ("direct" if wanted == "True" else "buffered"), None if avail == "None" else int(avail)


def provenance() -> dict:
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=30).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "hf_gauge"],
                                    capture_output=True, text=True, timeout=30).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", None
    lib = hashlib.sha256()
    for p in sorted((ROOT / "hf_gauge").rglob("*.py")):
        lib.update(p.relative_to(ROOT).as_posix().encode() + b"\0" + p.read_bytes())
    return {"commit": commit, "library_dirty": dirty, "library_sha256": lib.hexdigest()[:16],
            "script_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]}


def summary(runs: list[dict]) -> dict:
    s = [r["seconds"] for r in runs]
    cpu = [r["cpu_seconds"] for r in runs]
    return {"seconds_median": statistics.median(s), "seconds_min": min(s), "seconds_max": max(s), "seconds_all": s,
            "cpu_seconds_median": statistics.median(cpu), "cpu_seconds_all": cpu,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=sorted(CASES), default="bf16")
    ap.add_argument("--quick", action="store_true", help="same as --case quick")
    ap.add_argument("--rounds", "--repeats", type=int, default=None, help="interleaved rounds (default 3, quick 1)")
    ap.add_argument("--modes", default=None, help="comma-separated modes measured each round (default: copy, apply "
                                                  "and apply with the other kernels than the default's)")
    ap.add_argument("--output", default=None, help="result file (default results/bench_stream_<case>.json)")
    ap.add_argument("--src", default=None, help="an existing checkpoint folder instead of --case (a full random "
                                                "gauge is drawn from its config)")
    ap.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temporary folder)")
    args = ap.parse_args(argv)
    name = "quick" if args.quick else args.case
    case = CASES[name]
    if args.src:
        name, case = Path(args.src).name, {"name": describe(Path(args.src)), "shard": "as stored"}
    rounds = args.rounds or (1 if name == "quick" else 3)
    report: dict = {"case": name, "checkpoint": case["name"], **provenance()}
    with tempfile.TemporaryDirectory(prefix="bench_stream-", dir=args.workdir) as tmp:
        root = Path(tmp)
        # the parent imports neither torch nor hf_gauge: a child's ru_maxrss would start at the parent's RSS
        if args.src:
            src, gauge = Path(args.src), root / "gauge"
            run([sys.executable, __file__, "--gauge-for", str(src), str(gauge)])
        else:
            run([sys.executable, __file__, "--build", name, str(root)])
            src, gauge = root / "src", root / "gauge"
        shards = sorted(src.glob("*.safetensors"))
        entries = [e for p in shards for e in tensor_entries(p)]
        largest = max(e["data_offsets"][1] - e["data_offsets"][0] for e in entries)
        elements = sum(math.prod(e["shape"]) for e in entries)
        bare = {"torch": run([sys.executable, "-c", IMPORTS])["peak_rss_mb"],
                "numba": run([sys.executable, "-c", IMPORTS + ", hf_gauge.kernels"])["peak_rss_mb"]}
        default_kernels = "numba" if elements >= KERNEL_IMPORT_ELEMENTS else "torch"
        other = "torch" if default_kernels == "numba" else "numba"
        total = sum(p.stat().st_size for p in shards)
        io, mem_available = default_io(total)
        other_io = "buffered" if io == "direct" else "direct"
        modes = [m for m in (args.modes or f"copy,apply,apply-{other},apply-{other_io}").split(",") if m]
        for m in modes:
            if m != "copy":
                mode_parts(m)
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        exact: dict[str, bool] = {}
        loads = []
        for _ in range(rounds):
            loads.append(os.getloadavg())
            for mode in modes:
                out = root / f"out-{mode}"
                shutil.rmtree(out, ignore_errors=True)
                cmd, env = mode_cmd(mode, src, gauge, out)
                runs[mode].append(run(cmd, env))
                if mode.startswith("apply") and mode not in exact:     # every apply mode's output, once
                    r = subprocess.run([sys.executable, __file__, "--verify", str(src), str(out), str(gauge)],
                                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
                    exact[mode] = r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "True"
                    report["bit_exact"] = all(exact.values())
                shutil.rmtree(out, ignore_errors=True)
        res = {m: summary(r) for m, r in runs.items()}
        if "copy" in res:
            for m in res:
                if m != "copy":
                    res[m]["ratio_to_copy_median"] = res[m]["seconds_median"] / res["copy"]["seconds_median"]
                    res[m]["cpu_ratio_to_copy_median"] = (res[m]["cpu_seconds_median"]
                                                          / res["copy"]["cpu_seconds_median"])
                    res[m]["ratio_to_copy_per_round"] = [a["seconds"] / c["seconds"]
                                                         for a, c in zip(runs[m], runs["copy"])]
                    kernels, mio = mode_parts(m)
                    res[m]["io"] = mio or io                 # direct I/O loads the kernels at any size (in place)
                    res[m]["kernels"] = kernels or ("numba" if res[m]["io"] == "direct" else default_kernels)
                    res[m]["added_rss_mb"] = res[m]["peak_rss_mb"] - bare[res[m]["kernels"]]
        report.update({
            "n_shards": len(shards), "max_shard_size": case["shard"],
            "dtypes": sorted({e["dtype"] for e in entries}),
            "checkpoint_mb": sum(p.stat().st_size for p in shards) / 1e6, "largest_tensor_mb": largest / 1e6,
            "rounds": rounds, "results": res, "imports_only_peak_rss_mb": bare, "elements": elements,
            "default_io": io, "bit_exact_by_mode": exact, "mem_available_mb_at_start": mem_available / 1e6 if mem_available else None,
            "goal_ratio": 1.2, "rss_budget_added_mb": largest / 1e6 + 200,
            "load_average_before_rounds": loads, "load_average_after": os.getloadavg(),
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                        "note": "shared machine: other jobs run beside the benchmark; compare within one run"},
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        })
    out = Path(args.output) if args.output else HERE / "results" / f"bench_stream_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp_out, out)
    print(json.dumps({k: v for k, v in report.items() if k != "results"} |
                     {m: {k: v for k, v in r.items() if not k.endswith("_all")} for m, r in report["results"].items()},
                     indent=1))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--build"]:
        build(CASES[sys.argv[2]], Path(sys.argv[3]))
    elif sys.argv[1:2] == ["--gauge-for"]:
        gauge_for(Path(sys.argv[2]), Path(sys.argv[3]))
    elif sys.argv[1:2] == ["--verify"]:
        print(verify(*sys.argv[2:5]))
    else:
        sys.exit(main())
