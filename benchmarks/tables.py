"""The measured tables of ``docs/performance.md``, generated from ``benchmarks/results/bench_*.json``.

    python benchmarks/tables.py           # rewrite every table between its markers in docs/performance.md
    python benchmarks/tables.py --check   # exit 1 if a committed table differs from what its result files give

A table named NAME lives between ``<!-- table:NAME:start -->`` and ``<!-- table:NAME:end -->``; the text around the
markers is written by hand and left alone. Ratios are time over the baseline measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PAGE = HERE.parent / "docs" / "performance.md"


def _load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / name).read_text())


def _src(name: str, d: dict[str, Any]) -> str:
    """Where a row comes from: the result file, the commit it was measured at and the date, where recorded."""
    commit = str(d.get("commit") or "")[:7]
    return f"`{name}`" + "".join(f" {x}" for x in (commit, d.get("date")) if x)


def _met(value: float, goal: float) -> str:
    return "met" if value <= goal else "**not met**"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def apply_table() -> list[str]:
    rows = []
    for name in ("bench_apply_bfloat16.json", "bench_apply_float32.json", "bench_apply_bfloat16_8b_width.json"):
        d = _load(name)
        r = d["apply_over_clone"]
        rows.append([d["model"], d["dtype"], f"{d['reps']}", f"{d['apply_s'] * 1e3:.1f} ms", f"{d['clone_s'] * 1e3:.1f} ms",
                     f"**{r:.2f}×**", f"{d['apply_torch_over_clone']:.2f}×", f"≤ {d['goal_apply_over_clone']}×",
                     _met(r, d["goal_apply_over_clone"]), _src(name, d)])
    return _table(["model", "dtype", "rounds", "apply (kernels)", "clone", "apply / clone", "torch gathers / clone",
                   "goal", "", "result"], rows)


def fit_table() -> list[str]:
    name = "bench_fit.json"
    d = _load(name)
    fw, df = d["fit_with_data"], d["data_free"]
    rows = [
        [f"`gauge_to(data=x)`, {d['tokens']} tokens, vs forward passes of both models", f"{fw['seconds']:.1f} s",
         f"**{fw['ratio']:.2f}×** ({fw['ratio_vs_bodies']:.2f}× vs the decoder bodies alone)", f"≤ {fw['goal']}×",
         _met(fw["ratio"], fw["goal"]) + (", exact" if fw["exact"] else ", **not exact**")],
        ["data-free `gauge_to` vs one forward pass", f"{df['seconds']:.2f} s", f"**{df['ratio']:.3f}×**",
         f"≤ {df['goal']}×", _met(df["ratio"], df["goal"]) + (", exact" if df["exact"] else ", **not exact**")],
    ]
    for h in d["hungarian"]:
        rows.append([f"Hungarian + margins on a noisy correlation matrix, d={h['d']}", f"{h['seconds']:.2f} s", "",
                     "", f"matched {h['accuracy']:.0%}"])
    return [f"{d['model']}; {_src(name, d)}; {d['machine']['cpu_count']} CPUs, torch {d['machine']['torch']}.", ""] + \
        _table(["measure", "time", "ratio", "goal", ""], rows)


def stream_table() -> list[str]:
    rows = []
    for name in ("bench_stream_fp32.json", "bench_stream_bf16.json", "bench_stream_fp32_large.json",
                 "bench_stream_bf16_7.6gb.json", "bench_stream_wide20.json"):
        d = _load(name)
        res = d["results"]
        apply = res["apply"]
        io = d.get("default_io", "buffered")
        other = next((v for k, v in res.items() if k.startswith("apply-") and v["kernels"] != apply["kernels"]), None)
        other_io = next((v for k, v in res.items() if k.startswith("apply-") and v.get("io", io) != io), None)
        per_round = apply["ratio_to_copy_per_round"]
        load = [x[0] if isinstance(x, list) else x for x in d.get("load_average_before_rounds") or []]   # 1 min
        rows.append([f"{d['checkpoint']} ({d['checkpoint_mb'] / 1e3:.1f} GB)", str(d["rounds"]),
                     f"{res['copy']['seconds_median']:.2f} s", f"{apply['seconds_median']:.2f} s ({io} I/O)",
                     f"**{apply['ratio_to_copy_median']:.2f}×** ({min(per_round):.2f}-{max(per_round):.2f})",
                     f"{other['ratio_to_copy_median']:.2f}× ({other['kernels']})" if other else "not run",
                     f"{other_io['ratio_to_copy_median']:.2f}× ({other_io['io']})" if other_io else "not run",
                     f"≤ {d['goal_ratio']}×",
                     _met(apply["ratio_to_copy_median"], d["goal_ratio"]) + (", bit-exact" if d["bit_exact"] else ""),
                     f"{apply['added_rss_mb']:.0f} MB (budget {d['rss_budget_added_mb']:.0f} MB: "
                     f"{_met(apply['added_rss_mb'], d['rss_budget_added_mb'])})",
                     f"{min(load):.1f}-{max(load):.1f}" if load else "", _src(name, d)])
    return _table(["checkpoint", "rounds", "copy (fresh process)", "`hf-gauge apply` (fresh process)",
                   "apply / copy, median (rounds)", "other kernels / copy", "other I/O / copy", "goal", "",
                   "added RSS", "load average", "result"], rows)


def _find_rows(d: dict[str, Any], label: str, median: str) -> list[list[str]]:
    """The rows every find-from-files table opens with: find against its I/O floor, and the peak RSS."""
    runs, gib = d["runs"], 2 ** 30
    find = [f"{a['seconds'] / b['seconds']:.2f}×" for a, b in zip(runs["find"], runs["floor_find"])]
    return [
        [label, ", ".join(find), median, f"≤ {d['goal_find_over_io_floor']}×",
         _met(d["find_over_io_floor"], d["goal_find_over_io_floor"]) + (", exact" if d["find_exact"] else "")],
        ["its peak RSS (reading alone)", "", f"{d['find_peak_rss_bytes'] / gib:.2f} GiB "
         f"({d['floor_peak_rss_bytes'] / gib:.2f} GiB)", f"≤ {d['goal_find_peak_rss_bytes'] / gib:.0f} GiB",
         _met(d["find_peak_rss_bytes"], d["goal_find_peak_rss_bytes"])]]


def _scale_head(name: str, d: dict[str, Any], model: str) -> list[str]:
    s = d["shapes"]
    return [f"Random bf16 checkpoint with {model}'s shapes (d={s['d']}, d_ff={s['ff']}, vocab {s['vocab']}, "
            f"GQA {s['heads']}/{s['kv']}), {s['layers']} of {s['full_layers']} layers "
            f"({d['checkpoint_bytes'] / 1e9:.1f} GB each); {d['rounds']} interleaved rounds; {_src(name, d)}.", ""]


def scale_table() -> list[str]:
    name = "bench_scale.json"
    d = _load(name)
    s, runs = d["shapes"], d["runs"]
    ver = [f"{a['seconds'] / b['seconds']:.2f}×" for a, b in zip(runs["verify"], runs["floor_all"])]
    m, mo = d["matching"], d["matching_overwrite"]
    rows = _find_rows(d, "data-free `find_gauge` from files / reading the tensors it needs",
                      f"**{d['find_over_io_floor']:.2f}×**") + [
        ["the same with the former `8 d` vocabulary rows", "", f"{d['find_rows_8d_over_io_floor']:.2f}×", "", ""],
        [f"find extrapolated to {s['full_layers']} layers", "",
         f"{d['find_full_depth_extrapolated_s']:.1f} s ({d['find_fixed_s']:.2f} s fixed + "
         f"{d['find_per_layer_s']:.3f} s per layer)", "", ""],
        ["`verify_files` / reading both checkpoints once", ", ".join(ver), f"**{d['verify_over_read_both']:.2f}×**",
         f"≤ {d['goal_verify_over_read_both']}×",
         _met(d["verify_over_read_both"], d["goal_verify_over_read_both"]) + (", bit-exact" if d["verify_ok"] else "")],
        [f"`match_correlation` at d={mo['d']}, first call in a fresh process, `overwrite=True` (as find calls it)",
         "", f"{mo['seconds_first']:.2f} s", f"≤ {d['goal_matching_s']} s", _met(mo["seconds_first"], d["goal_matching_s"])],
        ["the same with the default (C kept)", ", ".join(f"{x:.2f} s" for x in m["seconds_all"]),
         f"{m['seconds_first']:.2f} s first", "", ""],
    ]
    return _scale_head(name, d, "Llama-3-8B") + _table(["measure", "rounds", "median", "goal", ""], rows)


def scale_8192_table() -> list[str]:
    name = "bench_scale_8192.json"
    d = _load(name)
    s, med = d["shapes"], d["median_s"]
    rows = _find_rows(d, f"data-free `find_gauge` from files / reading the tensors it needs, {s['layers']} layers",
                      f"{med['find']:.2f} s / {med['floor_find']:.2f} s = **{d['find_over_io_floor']:.2f}×**") + [
        ["find: fixed part + per layer (from the 1-layer view)", "",
         f"{d['find_fixed_s']:.2f} s + {d['find_per_layer_s']:.3f} s", "", ""],
        ["floor: fixed part + per layer", "", f"{d['floor_find_fixed_s']:.2f} s + {d['floor_find_per_layer_s']:.3f} s",
         "", ""],
        [f"extrapolated to {s['full_layers']} layers", "",
         f"{d['find_full_depth_extrapolated_s']:.1f} s / {d['floor_find_full_depth_extrapolated_s']:.1f} s = "
         f"{d['find_over_io_floor_full_depth_extrapolated']:.2f}×", "", ""],
    ]
    return _scale_head(name, d, "Llama-3-70B") + _table(["measure", "rounds", "median", "goal", ""], rows)


def row_cap_noise_table() -> list[str]:
    name = "bench_row_cap_noise.json"
    d = _load(name)
    cells: dict[tuple[float, int], list[dict[str, Any]]] = {}
    for r in d["noise_rows"]:
        cells.setdefault((r["noise"], r["max_rows"]), []).append(r)
    rows = [[f"{noise:.0%}", str(cap), f"{rs[0]['chance_cosine']:.2f}", str(len(rs)),
             f"{min(r['signed_accuracy'] for r in rs):.3f}", f"{min(r['min_margin'] for r in rs):.3f}",
             f"{sum(r['mean_margin'] for r in rs) / len(rs):.3f}"] for (noise, cap), rs in sorted(cells.items())]
    return [f"Real SmolLM2-135M (d={d['noise_rows'][0]['d']}) against its noisy gauged copy; {_src(name, d)}.", ""] + \
        _table(["noise", "vocabulary rows", "chance cosine", "seeds", "index + sign (worst seed)",
                "min margin (worst seed)", "mean margin"], rows)


def row_cap_table() -> list[str]:
    name = "bench_row_cap.json"
    d = _load(name)
    rows = [[str(r["seed"]), f"{r['rows']} ({r['max_rows']})", f"{r['index_accuracy']:.3f}",
             f"{r['signed_accuracy']:.3f}", f"{r['min_margin']:.3f}", f"{r['mean_margin']:.3f}"] for r in d["rows"]]
    return [f"{_src(name, d)}; fine-tuning step {d['rows'][0]['step']} of the trajectory claim's runs.", ""] + \
        _table(["seed", "vocabulary rows", "index accuracy", "index + sign", "min margin", "mean margin"], rows)


TABLES: dict[str, Callable[[], list[str]]] = {"apply": apply_table, "fit": fit_table, "stream": stream_table,
                                              "scale": scale_table, "scale_8192": scale_8192_table,
                                              "row_cap": row_cap_table, "row_cap_noise": row_cap_noise_table}


def render(text: str) -> str:
    """``text`` with every table between its markers regenerated; each table of ``TABLES`` must be marked once."""
    for name, make in TABLES.items():
        start, end = f"<!-- table:{name}:start -->", f"<!-- table:{name}:end -->"
        pat = re.compile(re.escape(start) + r"\n.*?" + re.escape(end), re.S)
        if len(pat.findall(text)) != 1:
            raise SystemExit(f"{PAGE}: expected one {start} ... {end} block")
        text = pat.sub(lambda _m: "\n".join([start, *make(), end]), text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when a table is stale")
    args = ap.parse_args(argv)
    old = PAGE.read_text()
    new = render(old)
    if args.check:
        if new != old:
            print(f"{PAGE} is stale: run python benchmarks/tables.py", file=sys.stderr)
            return 1
        return 0
    if new != old:
        from hf_gauge.atomic import atomic_write_bytes
        atomic_write_bytes(PAGE, new.encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
