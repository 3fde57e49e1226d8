"""Every paper-claim benchmark's ``--quick`` mode runs and writes a finite row (and, where the quick mode is strong
enough, the qualitative claim holds). Rows go to a temporary copy of ``claims_quick.json``; tracked results are untouched.

These run on real SmolLM2-135M weights (and tiny Llamas trained on the fly), about 3-6 minutes in total on 2 cores.
"""
from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

pytestmark = pytest.mark.slow


def _finite_numbers(d: dict[str, Any]) -> list[str]:
    bad = []
    for k, v in d.items():
        if isinstance(v, bool) or v is None or isinstance(v, str):
            continue
        if not math.isfinite(float(v)):
            bad.append(k)
    return bad


def _approx(a: float, b: float, tol: float) -> bool:
    return abs(a - b) <= tol


CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {}


def check(name: str):
    def deco(fn):
        CHECKS[name] = fn
        return fn
    return deco


@check("exact_recovery")
def _(m):
    assert m["signed_sign_accuracy"] == 1.0 and m["data_free_sign_accuracy"] == 1.0
    assert _approx(m["permutation_only_index_accuracy"], m["hidden_positive_fraction"], 0.05)


@check("sign_ceiling")
def _(m):
    assert m["signed_min_accuracy"] == 1.0
    assert m["permutation_only_max_excess_over_f"] <= 0.05


@check("trajectory")
def _(m):
    assert m["tiny_compose_path_agrees_with_hop_composition"] == 1.0
    assert m["tiny_same_matcher_as_find_gauge"] == 1.0
    for k, v in m.items():
        if k.endswith(("_path_mean", "_via_base_mean", "_endpoint_mean")):
            assert 0.0 <= v <= 1.0, k


@check("sae")
def _(m):
    assert _approx(m["gauged_bd_nmse"], m["within_model_nmse"], 1e-4)
    assert m["gauged_sd_nmse"] > 2 * m["gauged_bd_nmse"]
    assert m["ft_gauged_sd_nmse"] > m["ft_gauged_bd_nmse"]


@check("steering")
def _(m):
    assert _approx(m["sentiment_preserved_bd"], 1.0, 1e-3)
    assert m["sentiment_preserved_sd"] < 0.9


@check("lora")
def _(m):
    assert m["retained_bd"] > 0.99
    assert m["retained_sd"] < 0.5


@check("adamw")
def _(m):
    assert m["bd_final_rel_deviation"] < 1e-3
    assert m["sd_final_rel_deviation"] > 100 * m["bd_final_rel_deviation"]


@check("merge")
def _(m):
    assert m["bd_loss_mean"] < m["none_loss_mean"]


@check("audit")
def _(m):
    assert m["sentiment_transported_agreement_min"] == 1.0
    assert m["sentiment_canonical_agreement_min"] == 1.0
    assert m["top_abs_activation_canonical_agreement_min"] == 1.0
    assert m["sentiment_raw_agreement"] < 0.5


@check("procrustes")
def _(m):
    assert m["ev_cross_after_site_R"] > m["ev_cross_before"]


ORDER = ["exact_recovery", "sign_ceiling", "trajectory", "sae", "steering", "lora", "adamw", "merge", "audit",
         "procrustes"]


@pytest.fixture
def results_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Quick rows and figures go to a temporary folder: running the tests never rewrites tracked files."""
    import claims_common as cc
    monkeypatch.setattr(cc, "RESULTS", tmp_path)
    monkeypatch.setattr(cc, "CLAIMS_QUICK", tmp_path / "claims_quick.json")
    return tmp_path


@pytest.mark.parametrize("claim", ORDER)
def test_claim_quick(claim: str, results_dir: Path) -> None:
    import claims_common as cc
    mod = importlib.import_module(f"claim_{claim}")
    repo_full = BENCH / "results" / "claims.json"
    before_full = repo_full.read_text() if repo_full.exists() else None
    res = mod.main(["--quick"])
    rows = {r["claim"]: r for r in json.loads(cc.CLAIMS_QUICK.read_text())}
    assert claim in rows, f"{claim} wrote no row to {cc.CLAIMS_QUICK}"
    row = rows[claim]
    assert row["quick"] is True and row["measured"] == res["measured"]
    for key in ("claim", "paper", "measured", "model", "command", "date"):
        assert key in row
    assert "--quick" in row["command"]
    assert not _finite_numbers(row["measured"]), f"non-finite numbers: {_finite_numbers(row['measured'])}"
    # quick runs never touch the full results
    after_full = repo_full.read_text() if repo_full.exists() else None
    assert before_full == after_full
    assert cc.CLAIMS_QUICK.parent == results_dir
    if row.get("figure"):   # the figure a quick row names was written, into the temporary folder
        fig = cc.REPO / row["figure"]
        assert fig.parent == results_dir and fig.stat().st_size > 0
    CHECKS[claim](row["measured"])


def test_report_renders(tmp_path: Path) -> None:
    import run_all
    out = run_all.report(tmp_path / "RESULTS.md")
    text = out.read_text()
    assert "| claim | paper |" in text


def test_speed_benchmarks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The speed benchmarks stay alive: each runs one short round, writes its result file (into a temporary
    folder) and reports correct work. Their timings are the benchmarks' business, not asserted here."""
    import _common
    import bench_apply
    import bench_fit
    import bench_stream
    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    tracked = sorted(p.name for p in (BENCH / "results").glob("bench_*.json"))
    res = bench_apply.main(["--quick", "--reps", "1"])
    assert (tmp_path / "bench_apply_float32_quick.json").is_file() and res["apply_s"] > 0 and res["clone_s"] > 0
    fit = bench_fit.main(["--quick", "--reps", "1", "--widths", "256", "--out", str(tmp_path / "fit.json")])
    assert fit["fit_with_data"]["exact"] and fit["data_free"]["exact"]
    assert fit["hungarian"][0]["d"] == 256 and fit["hungarian"][0]["accuracy"] == 1.0
    assert bench_stream.main(["--quick", "--repeats", "1", "--output", str(tmp_path / "stream.json")]) == 0
    stream = json.loads((tmp_path / "stream.json").read_text())
    assert set(stream["results"]) == {"plain", "stream", "stream-warm", "stream-durable"}
    assert sorted(p.name for p in (BENCH / "results").glob("bench_*.json")) == tracked
