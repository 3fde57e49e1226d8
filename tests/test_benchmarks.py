"""Every paper-claim benchmark's ``--quick`` mode runs and writes a finite row (and, where the quick mode is strong
enough, the qualitative claim holds). Rows go to a temporary copy of ``claims_quick.json``; tracked results are untouched.

These run on real SmolLM2-135M weights (and tiny Llamas trained on the fly); all are marked slow. The claims'
qualitative checks are the verdict rules of ``benchmarks/verdicts.py`` (and ``claim_trajectory.cell_verdict`` /
``finding``), imported, not copied, so a threshold changed there changes the tests too.
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
import verdicts as V  # noqa: E402

pytestmark = pytest.mark.slow


def _finite_numbers(d: dict[str, Any]) -> list[str]:
    bad = []
    for k, v in d.items():
        if isinstance(v, bool) or v is None or isinstance(v, str):
            continue
        if not math.isfinite(float(v)):
            bad.append(k)
    return bad


CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {}


def check(name: str):
    def deco(fn):
        CHECKS[name] = fn
        return fn
    return deco


def _holds(checks: dict[str, bool], *names: str) -> None:
    """The named verdict rules (benchmarks/verdicts.py: the thresholds RESULTS.md uses) hold for this row."""
    missing = [n for n in names if n not in checks]
    assert not missing, f"unknown rules {missing}"
    failed = [n for n in names if not checks[n]]
    assert not failed, f"verdict rules failed: {failed} ({checks})"


@check("exact_recovery")
def _(row):
    _holds(V.exact_recovery(row["measured"]), "signed_exact", "data_free_exact", "permutation_only_at_ceiling")


@check("sign_ceiling")
def _(row):
    _holds(V.sign_ceiling(row["measured"]), "signed_exact_every_f", "permutation_only_below_f")


@check("trajectory")
def _(row):
    import claim_trajectory as ct
    m = row["measured"]
    assert m["tiny_compose_path_agrees_with_hop_composition"] == 1.0
    assert m["tiny_same_matcher_as_find_gauge"] == 1.0
    for setting, res in row["settings"].items():
        assert set(res["cells"]) == {f"{s}/{t}" for s in ct.GRID["sites"] for t in res["setup"]["tokens"]}
        for key, cell in res["cells"].items():      # every verdict is the rule applied to the per-seed numbers
            per = [r["cells"][key] for r in res["per_seed"].values()]
            assert cell["verdict"] == ct.cell_verdict([p["path"]["signed_accuracy"] for p in per],
                                                      [p["endpoint"]["signed_accuracy"] for p in per])
            for meth in ct.METHODS:
                assert 0.0 <= cell[meth]["min"] <= cell[meth]["mean"] <= cell[meth]["max"] <= 1.0
        assert res["finding"] == ct.finding(res["cells"])
        steps = sorted(res["by_step"], key=int)    # exploratory: the grid at every checkpoint, by the same rule
        assert [int(s) for s in steps] == list(range(res["setup"]["every"], res["setup"]["steps"] + 1,
                                                     res["setup"]["every"]))
        for step in steps:
            for key, cell in res["by_step"][step].items():
                per = [r["by_step"][step][key] for r in res["per_seed"].values()]
                assert cell["verdict"] == ct.cell_verdict([p["path"] for p in per], [p["endpoint"] for p in per])
        assert all(res["by_step"][steps[-1]][k][m]["mean"] == res["cells"][k][m]["mean"]
                   for k in res["cells"] for m in ct.METHODS)


@check("sae")
def _(row):
    _holds(V.sae(row["measured"]), "bd_exact", "sd_matched_fails", "sd_oracle_fails")
    _holds(V.sae(row["measured"], "ft_gauged"), "sd_matched_fails", "sd_oracle_fails")


@check("steering")
def _(row):
    m = row["measured"]
    _holds(V.steering(m), "bd_exact", "sentiment_sd_oracle_lost")
    assert V.refusal_sign_flip(m) in ("not_specific", "reversed", "lost", "kept")
    for k in ("sentiment", "refusal"):
        assert math.isfinite(m[f"{k}_z_original"]) and m[f"{k}_random_std"] > 0


@check("lora")
def _(row):
    _holds(V.lora(row["measured"]), "bd_kept", "sd_oracle_lost")   # S_d matched keeps the gain here (measured)
    assert "sd_matched_lost" in V.lora(row["measured"])


@check("adamw")
def _(row):
    _holds(V.adamw(row["measured"]), "bd_same_trajectory", "sd_different_trajectory")


@check("merge")
def _(row):
    _holds(V.merge(row["measured"]), "bd_beats_none", "bd_beats_sd_oracle")


@check("audit")
def _(row):
    _holds(V.audit(row["measured"]), "transported_exact", "canonical_exact", "raw_not_reproducible")


@check("procrustes")
def _(row):
    _holds(V.procrustes(row["measured"], row["paper"]), "ev_improves_with_R")


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
    for key in ("git_commit", "script_sha256", "packages"):
        assert row["provenance"][key], key
    assert row["provenance"]["script_sha256"] == cc.file_sha256(cc.script_path(claim))
    assert "seeds" in row
    CHECKS[claim](row)


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
    assert set(stream["results"]) == {"copy", "apply", "apply-numba"} and stream["bit_exact"]
    assert stream["results"]["apply"]["ratio_to_copy_median"] > 0 and stream["commit"]
    assert sorted(p.name for p in (BENCH / "results").glob("bench_*.json")) == tracked


def test_bench_scale_quick(tmp_path: Path) -> None:
    """bench_scale's whole path on tiny shapes: checkpoint written tensor by tensor, streamed gauged copy, find and
    verify from files in subprocesses (exact), matching alone; the files are deleted afterwards."""
    import bench_scale
    res = bench_scale.main(["--quick", "--workdir", str(tmp_path / "work"), "--output", str(tmp_path / "scale.json")])
    assert res["find_exact"] and res["verify_ok"] and res["matching"]["exact"]
    assert res["find_peak_rss_bytes"] > 0 and res["find_over_io_floor"] > 0 and res["commit"]
    assert json.loads((tmp_path / "scale.json").read_text())["script_sha256"] == res["script_sha256"]
    assert not (tmp_path / "work").exists()


def test_trajectory_gpu_smoke(tmp_path: Path) -> None:
    """The GPU grid script runs end to end on CPU in --smoke mode and states its findings by the claim's rules."""
    import claim_trajectory as ct
    import trajectory_gpu
    out = tmp_path / "gpu.json"
    res = trajectory_gpu.main(["--smoke", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["args"]["device"] == "cpu" and set(saved["widths"]) == {"16", "32"}
    for d, w in res["widths"].items():
        assert set(w["cells"]) == {f"{s}/{t}" for s in ct.GRID["sites"] for t in ct.GRID["tokens"]}
        assert w["finding"] == ct.finding(w["cells"]) == saved["widths"][d]["finding"]


def test_trajectory_gpu_is_the_claims_protocol(tmp_path: Path) -> None:
    """At the claim's width (d=128) and its quick tiny configuration, trajectory_gpu on CPU gives claim_trajectory's
    cells for seed 0: the two share the base, the training loop and the grid evaluation (hops matched in memory there,
    from the exported folders here)."""
    import claim_trajectory as ct
    import trajectory_gpu
    cfg = ct.config(True, "tiny")
    flags = [f"--{k}={cfg[k]}" for k in ("steps", "every", "pretrain", "warmup", "batch", "lr")]
    res = trajectory_gpu.main(["--device", "cpu", "--widths", "128", "--seeds", "0", *flags,
                               "--out", str(tmp_path / "gpu.json")])
    gpu = res["widths"]["128"]["per_seed"]["0"]["cells"]
    claim = ct.cached_eval("tiny", True, 0, ct.GRID["tokens"])["cells"]
    assert set(gpu) == set(claim)
    for key, cell in claim.items():
        for m in ct.METHODS:
            assert gpu[key][m]["signed_accuracy"] == pytest.approx(cell[m]["signed_accuracy"], abs=1e-9), (key, m)
        assert gpu[key]["endpoint_margins"]["min_margin"] == pytest.approx(cell["endpoint_margins"]["min_margin"],
                                                                           abs=1e-4), key


def test_trajectory_gpu_needs_cuda_or_smoke() -> None:
    import torch
    import trajectory_gpu
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="no CUDA device"):
        trajectory_gpu.main(["--widths", "16"])


def test_trajectory_rules() -> None:
    import claim_trajectory as ct
    assert ct.cell_verdict([1.0, 1.0], [0.8, 0.7]) == "path_better"
    assert ct.cell_verdict([0.7, 0.8], [1.0, 1.0]) == "path_worse"
    assert ct.cell_verdict([1.0, 0.99], [1.0, 1.0]) == "same"

    def cell(path: float, end: float) -> dict[str, Any]:
        return {"path": {"mean": path}, "via_base": {"mean": path}, "endpoint": {"mean": end},
                "verdict": ct.cell_verdict([path], [end])}
    big = max(ct.GRID["tokens"])
    cells = {f"{s}/{t}": cell(1.0, 1.0) for s in ct.GRID["sites"] for t in ct.GRID["tokens"]}
    cells[f"one/{big}"] = cell(1.0, 0.8)
    text = ct.finding(cells)
    assert "removes the need for path composition" in text and "reproduces the paper" in text
    cells[f"pooled/{big}"] = cell(1.0, 0.5)
    assert "even pooled matching" in ct.finding(cells)


def test_trajectory_notes_flag_settings_that_disagree() -> None:
    """RESULTS.md says when the settings disagree on single-site matching (and marks the why as a hypothesis), and
    says nothing of the kind when they agree."""
    import copy

    import claims_common as cc
    import run_all
    row = next((r for r in cc.read_claims(False) if r["claim"] == "trajectory"), None)
    if row is None or not {"smollm2", "tiny"} <= set(row.get("settings", {})):
        pytest.skip("no full trajectory row with both settings")
    for verdicts, flagged in ((("same", "path_better"), True), (("path_better", "path_better"), False)):
        r = copy.deepcopy(row)
        for name, v in zip(("smollm2", "tiny"), verdicts):
            r["settings"][name]["cells"][f"one/{max(r['settings'][name]['setup']['tokens'])}"]["verdict"] = v
        text = run_all.trajectory_notes(r)
        assert ("Across settings" in text) is flagged
        assert ("Hypothesis, not measured here" in text) is flagged


def test_verdict_rules_fail_when_they_should() -> None:
    assert V.refusal_sign_flip({"refusal_z_original": 1.0, "refusal_z_sd": -5.0}) == "not_specific"
    assert V.refusal_sign_flip({"refusal_z_original": -3.0, "refusal_z_sd": -5.0}) == "not_specific"
    assert V.refusal_sign_flip({"refusal_z_original": 4.0, "refusal_z_sd": -3.0, "refusal_z_sd_matched": 0.0}) \
        == "reversed"
    assert V.refusal_sign_flip({"refusal_z_original": 4.0, "refusal_z_sd": 0.5, "refusal_z_sd_matched": 3.0}) \
        == "lost"
    paper = {"ev_after_gap_to_ceiling": 0.025, "decoder_cos": 0.98}
    ch = V.procrustes({"ev_cross_before": -0.9, "ev_cross_after_site_R": 0.7, "ev_gap_after_site_R_to_ceiling": 0.3,
                       "decoder_mmcs_after_R": 0.26, "decoder_mmcs_seed0_vs_random_rotation": 0.26}, paper)
    assert ch["ev_improves_with_R"] and not ch["decoder_cos_as_paper"] and not ch["decoder_cos_above_random"]
    assert not V.agrees(V.lora({"retained_bd": 1.0, "retained_sd": 0.9, "retained_sd_matched": -0.1}))


def test_rows_record_provenance_and_stale_rows_are_marked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import claims_common as cc
    import run_all
    monkeypatch.setattr(cc, "RESULTS", tmp_path)
    monkeypatch.setattr(cc, "CLAIMS_QUICK", tmp_path / "claims_quick.json")
    monkeypatch.setattr(cc, "CLAIMS_FULL", tmp_path / "claims.json")
    row = {"claim": "adamw", "paper": {"text": "p"}, "measured": {"bd_final_rel_deviation": 1e-6,
                                                                  "sd_final_rel_deviation": 0.5},
           "model": "m", "command": "c"}
    with pytest.raises(KeyError, match="seeds"):
        cc.write_claim(row, quick=True)
    cc.write_claim({**row, "seeds": {"init": 0}}, quick=True)
    saved = cc.read_claims(True)[0]
    prov = saved["provenance"]
    assert len(prov["git_commit"]) == 40 and prov["script_sha256"] == cc.file_sha256(cc.script_path("adamw"))
    assert prov["packages"]["torch"] and saved["seeds"] == {"init": 0}
    assert run_all.fresh(saved) and "stale" not in run_all.provenance_note(saved)
    saved["provenance"]["script_sha256"] = "0" * 64
    assert not run_all.fresh(saved) and "stale" in run_all.provenance_note(saved)
