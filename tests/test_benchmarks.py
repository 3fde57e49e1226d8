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
    m = row["measured"]
    _holds(V.sae(m), "bd_exact", "sd_matched_fails", "sd_oracle_fails")
    assert set(V.sae(m, "ft_gauged")) == {"sd_matched_fails", "sd_oracle_fails"}   # quick: a 3-step fine-tune
    assert row["spread"]["n_seeds"] == 1 and m["variance_share_pos0"] > 0.5       # the attention sink (measured)
    for k in ("within_model", "gauged_bd", "gauged_sd_matched", "gauged_sd"):
        assert m[f"{k}_nmse_excl_pos0"] > m[f"{k}_nmse"]


@check("steering")
def _(row):
    m = row["measured"]
    _holds(V.steering(m), "bd_exact", "finetuned_bd_as_identity")
    assert set(V.steering(m)) == {"bd_exact", "sentiment_sd_oracle_lost", "sentiment_sd_matched_lost",
                                  "finetuned_bd_as_identity"}
    assert V.refusal_sign_flip(m) in ("not_specific", "reversed", "lost", "kept")
    assert len(row["details"]["sentiment"]["rows"]) == 3 and row["spread"]["n_seeds"] == 1   # the curve
    assert m["sentiment_sd_matched_max_abs_preserved"] >= abs(m["sentiment_preserved_sd_matched"])
    assert math.isfinite(m["refusal_control_z"]) and m["finetuned_gauge_signed_accuracy"] == 1.0
    for k in ("sentiment", "refusal"):
        assert math.isfinite(m[f"{k}_z_original"]) and m[f"{k}_random_std"] > 0


@check("lora")
def _(row):
    m = row["measured"]
    _holds(V.lora(m), "bd_kept", "finetuned_bd_as_identity")   # S_d matched keeps the gain here (measured)
    assert {"sd_matched_lost", "sd_oracle_lost"} <= set(V.lora(m))
    assert m["ce_base"] < m["ce_base_full_vocab"] and m["ce_lora"] < math.log(2)    # two-label CE: chance is ln 2
    assert set(row["paper"]) == {"text", "source"} and "third-party summary" in row["paper"]["source"]  # no numbers


@check("adamw")
def _(row):
    _holds(V.adamw(row["measured"]), "bd_same_trajectory", "sd_different_trajectory")


@check("merge")
def _(row):
    _holds(V.merge(row["measured"]), "bd_beats_none", "bd_beats_sd_oracle")


@check("audit")
def _(row):
    _holds(V.audit(row["measured"]), "transported_exact", "canonical_exact", "raw_not_reproducible")
    m = row["measured"]
    assert 0.0 <= m["canonical_stability_residual"] <= 1.0 and m["finetune_relative_weight_change"] > 0
    assert row["spread"]["n_seeds"] == 1 and row["figure"].endswith("audit_quick.png")


@check("procrustes")
def _(row):
    m = row["measured"]
    _holds(V.procrustes(m, row["paper"]), "ev_improves_with_R")
    assert m["control_peak_mass"] == 1.0 and m["control_dist_signed_permutation"] == 0.0   # the control is a gauge
    assert m["haar_peak_mass"] < 0.5 and "R_haar_like_not_signed_permutation" in V.procrustes(m, row["paper"])
    assert 0.0 < m["decoder_mmcs_same_model_sae_seeds"] <= 1.0


ORDER = ["exact_recovery", "sign_ceiling", "trajectory", "sae", "steering", "lora", "adamw", "merge", "audit",
         "procrustes"]


@pytest.fixture
def results_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Quick rows and figures go to a temporary folder: running the tests never rewrites tracked files."""
    import claims_common as cc
    monkeypatch.setattr(cc, "RESULTS", tmp_path)
    monkeypatch.setattr(cc, "CLAIMS_QUICK", tmp_path / "claims_quick.json")
    monkeypatch.setattr(cc, "CLAIMS_FULL", tmp_path / "claims.json")
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
    fig = cc.REPO / row["figure"]     # every claim draws its figure, into the temporary folder
    assert fig.parent == results_dir and fig.stat().st_size > 0 and fig.name == f"{claim}_quick.png"
    spread = row["spread"]            # and records the range over seeds of its headline metrics
    assert spread["n_seeds"] >= 1 and len(spread) >= 2
    for key, v in spread.items():
        if isinstance(v, list):
            assert len(v) == 2 and v[0] <= v[1], key
    for key in ("git_commit", "script_sha256", "packages", "code_sha256"):
        assert row["provenance"][key], key
    assert not cc.stale_code(row)
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
    assert set(stream["results"]) == {"copy", "apply", "apply-numba", "apply-direct"} and stream["bit_exact"]
    assert stream["default_io"] == "buffered" and stream["results"]["apply-direct"]["io"] == "direct"
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
    assert set(prov["code_sha256"]) == {"benchmarks/claim_adamw.py", "benchmarks/claims_common.py", "hf_gauge/"}
    for key in prov["code_sha256"]:           # any module the row depends on, changed, makes it stale
        changed = json.loads(json.dumps(saved))
        changed["provenance"]["code_sha256"][key] = "0" * 64
        assert not run_all.fresh(changed) and cc.stale_code(changed) == [key]
        assert f"stale: changed since this row was written: {key}" in run_all.provenance_note(changed)
    old = json.loads(json.dumps(saved))       # a row from before the per-module hashes is stale
    del old["provenance"]["code_sha256"]
    assert not run_all.fresh(old) and "stale" in run_all.provenance_note(old)


def test_code_hashes_follow_the_imports_and_the_package_tree(tmp_path: Path) -> None:
    """A claim's row depends on its script, the benchmark modules it imports at any depth (also inside functions)
    and on every file of the hf_gauge tree."""
    import claims_common as cc
    names = [p.name for p in cc.local_imports(cc.script_path("audit"))]
    assert names[0] == "claim_audit.py" and {"claim_steering.py", "claims_common.py"} <= set(names)
    assert "claim_trajectory.py" in [p.name for p in cc.local_imports(cc.script_path("sae"))]   # a function's import
    assert "claim_trajectory.py" not in [p.name for p in cc.local_imports(cc.script_path("adamw"))]
    assert set(cc.code_hashes("procrustes")) >= {"benchmarks/claim_procrustes.py", "benchmarks/claim_sae.py",
                                                  "benchmarks/claims_common.py", "hf_gauge/"}
    tree = tmp_path / "pkg"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.py").write_text("x = 1\n")
    (tree / "sub" / "b.json").write_text("{}")
    h0 = cc.tree_sha256(tree)
    (tree / "__pycache__").mkdir()
    (tree / "__pycache__" / "a.cpython-312.pyc").write_bytes(b"junk")
    assert cc.tree_sha256(tree) == h0                                  # caches do not count
    (tree / "sub" / "b.json").write_text("{} ")
    h1 = cc.tree_sha256(tree)
    assert h1 != h0                                                    # an edit deep in the tree counts
    (tree / "sub" / "b.json").rename(tree / "sub" / "c.json")
    assert cc.tree_sha256(tree) not in (h0, h1)                        # so does a rename


def test_run_all_quick_rewrites_results_md_only_with_report(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    import run_all
    ran, reported = [], []
    monkeypatch.setattr(run_all.subprocess, "run",
                        lambda cmd, **kw: ran.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    monkeypatch.setattr(run_all, "report", lambda out=None: reported.append(out) or Path("RESULTS.md"))
    assert run_all.main(["--quick", "--only", "adamw"]) == 0
    assert len(ran) == 1 and ran[0][-1] == "--quick" and reported == []
    assert run_all.main(["--quick", "--only", "adamw", "--report"]) == 0
    assert len(ran) == 2 and len(reported) == 1
    assert run_all.main(["--only", "adamw"]) == 0 and len(reported) == 2      # a full run writes the report
    assert run_all.main(["--quick", "--report"]) == 0                           # every quick mode, then the report
    assert len(ran) == 3 + len(run_all.SCRIPTS) and len(reported) == 3
    assert run_all.main(["--report"]) == 0 and len(ran) == 3 + len(run_all.SCRIPTS) and len(reported) == 4


def test_finish_completes_writes_and_returns_the_row(results_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """The tail every claim script shares (claims_common.finish): model, rerun command, total runtime, the merge into
    the quick table, the printed numbers."""
    import time

    import claims_common as cc
    t0 = time.perf_counter() - 2.0
    res = cc.finish({"claim": "lora", "paper": {}, "measured": {"x": 1.5}, "seeds": {}, "runtime_s": {"train": 1.0}},
                    True, t0)
    assert res["model"] == cc.MODEL_NAME and res["runtime_s"]["train"] == 1.0 and res["runtime_s"]["total"] >= 2.0
    assert res["command"] == "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/claim_lora.py --quick"
    assert cc.read_claims(True)[0]["measured"] == {"x": 1.5} and '"x": 1.5' in capsys.readouterr().out
    assert cc.finish({"claim": "adamw", "paper": {}, "measured": {}, "seeds": {}}, False, t0,
                     model="tiny")["model"] == "tiny" and cc.read_claims(False)[0]["claim"] == "adamw"


# Every verdict rule RESULTS.md uses, on synthetic rows: a row where every rule holds, then for each rule a change
# just across its threshold that breaks that rule and no other.
PAPER_PROCRUSTES = {"ev_after_gap_to_ceiling": 0.025, "decoder_cos": 0.98}
RULE_CASES: dict[str, tuple[Callable[[dict[str, Any]], dict[str, bool]], dict[str, Any], dict[str, dict[str, Any]]]] = {
    "exact_recovery": (V.exact_recovery,
                       {"signed_sign_accuracy": 1.0, "data_free_sign_accuracy": 1.0,
                        "permutation_only_index_accuracy": 0.52, "hidden_positive_fraction": 0.5},
                       {"signed_exact": {"signed_sign_accuracy": 0.999},
                        "data_free_exact": {"data_free_sign_accuracy": 0.998},
                        "permutation_only_at_ceiling": {"permutation_only_index_accuracy": 0.5 + V.CEILING_TOL + 1e-3}}),
    "sign_ceiling": (V.sign_ceiling, {"signed_min_accuracy": 1.0, "permutation_only_max_excess_over_f": 0.0},
                     {"signed_exact_every_f": {"signed_min_accuracy": 0.99},
                      "permutation_only_below_f": {"permutation_only_max_excess_over_f": V.CEILING_TOL + 1e-3}}),
    "sae": (V.sae,
            {"within_model_nmse": 0.004, "gauged_bd_nmse": 0.004, "within_model_nmse_excl_pos0": 0.2,
             "gauged_bd_nmse_excl_pos0": 0.2, "gauged_sd_matched_nmse_excl_pos0": 0.41,
             "gauged_sd_nmse_excl_pos0": 0.41},
            {"sd_matched_fails": {"gauged_sd_matched_nmse_excl_pos0": 0.39},      # threshold: 2 x 0.2 = 0.4
             "sd_oracle_fails": {"gauged_sd_nmse_excl_pos0": 0.39},
             "bd_exact": {"gauged_bd_nmse_excl_pos0": 0.2 + 2 * V.EXACT_TOL}}),
    "sae_ft": (lambda m: V.sae(m, "ft_gauged"),
               {"within_model_nmse_excl_pos0": 0.2, "ft_gauged_sd_matched_nmse_excl_pos0": 0.5,
                "ft_gauged_sd_nmse_excl_pos0": 0.5},
               {"sd_matched_fails": {"ft_gauged_sd_matched_nmse_excl_pos0": 0.35},
                "sd_oracle_fails": {"ft_gauged_sd_nmse_excl_pos0": 0.35}}),
    "sae_paper_magnitude": (lambda m: V.sae_paper_magnitude(m, 1.08),
                            {"gauged_sd_matched_nmse_excl_pos0": 0.55, "gauged_sd_nmse_excl_pos0": 0.55},
                            {"sd_matched": {"gauged_sd_matched_nmse_excl_pos0": 0.53},
                             "sd": {"gauged_sd_nmse_excl_pos0": 0.53}}),
    "steering": (V.steering,
                 {"sentiment_bd_max_abs_error": 0.0, "refusal_bd_max_abs_error": 1e-5,
                  "sentiment_sd_max_abs_preserved": 0.49, "sentiment_sd_matched_max_abs_preserved": 0.3,
                  "sentiment_preserved_finetuned_bd": 0.8, "sentiment_preserved_finetuned_identity": 0.8,
                  "refusal_preserved_finetuned_bd": 0.5, "refusal_preserved_finetuned_identity": 0.5},
                 {"bd_exact": {"refusal_bd_max_abs_error": 2 * V.EXACT_TOL},
                  "sentiment_sd_oracle_lost": {"sentiment_sd_max_abs_preserved": 0.51},   # one step size is enough
                  "sentiment_sd_matched_lost": {"sentiment_sd_matched_max_abs_preserved": 0.51},
                  "finetuned_bd_as_identity": {"refusal_preserved_finetuned_bd": 0.5 + 2 * V.EXACT_TOL}}),
    "lora": (V.lora,
             {"retained_bd": 0.96, "retained_sd": 0.49, "retained_sd_matched": -0.2, "retained_finetuned_bd": 0.7,
              "retained_finetuned_identity": 0.7},
             {"bd_kept": {"retained_bd": 0.94}, "sd_oracle_lost": {"retained_sd": 0.51},
              "sd_matched_lost": {"retained_sd_matched": 0.6},
              "finetuned_bd_as_identity": {"retained_finetuned_bd": 0.7 - 2 * V.EXACT_TOL}}),
    "adamw": (V.adamw, {"bd_final_rel_deviation": 1e-4, "sd_final_rel_deviation": 0.2},
              {"bd_same_trajectory": {"bd_final_rel_deviation": 2e-3},
               "sd_different_trajectory": {"sd_final_rel_deviation": 0.05}}),
    "merge": (V.merge, {"bd_loss_mean": 3.0, "sd_found_loss_mean": 3.1, "sd_same_perm_loss_mean": 3.1,
                        "none_loss_mean": 3.1},
              {"bd_beats_sd_matched": {"sd_found_loss_mean": 2.9}, "bd_beats_sd_oracle": {"sd_same_perm_loss_mean": 3.0},
               "bd_beats_none": {"none_loss_mean": 2.99}}),
    "audit": (V.audit, {"sentiment_transported_agreement_min": 1.0, "sentiment_canonical_agreement_min": 1.0,
                        "top_abs_activation_canonical_agreement_min": 1.0, "sentiment_raw_agreement": 0.1},
              {"transported_exact": {"sentiment_transported_agreement_min": 0.9},
               "canonical_exact": {"top_abs_activation_canonical_agreement_min": 0.95},
               "raw_not_reproducible": {"sentiment_raw_agreement": V.RAW_CHANCE}}),
    "procrustes": (lambda m: V.procrustes(m, PAPER_PROCRUSTES),
                   {"ev_cross_before": -0.1, "ev_cross_after_site_R": 0.9, "ev_gap_after_site_R_to_ceiling": 0.02,
                    "decoder_mmcs_raw": 0.94, "decoder_mmcs_after_R": 0.95, "decoder_mmcs_seed0_vs_random_rotation": 0.26,
                    "site_peak_mass": 0.2, "haar_peak_mass": 0.07, "control_peak_mass": 1.0},
                   {"ev_negative_before": {"ev_cross_before": 0.01},
                    "ev_improves_with_R": {"ev_cross_after_site_R": -0.2},
                    "ev_within_paper_gap": {"ev_gap_after_site_R_to_ceiling": 0.03},
                    "decoder_cos_raw_as_paper": {"decoder_mmcs_raw": 0.92},
                    "decoder_cos_raw_above_random": {"decoder_mmcs_seed0_vs_random_rotation": 0.925},
                    "decoder_cos_after_R_above_random": {"decoder_mmcs_after_R": 0.27},
                    "R_haar_like_not_signed_permutation": {"site_peak_mass": 0.6}}),
}


def _rule_names(case: str) -> list[tuple[str, str]]:
    return [(case, rule) for rule in RULE_CASES[case][2]]


@pytest.mark.parametrize("case,rule", [cr for c in RULE_CASES for cr in _rule_names(c)])
def test_verdict_rule_on_both_sides_of_its_threshold(case: str, rule: str) -> None:
    fn, ok, breaks = RULE_CASES[case]
    assert set(fn(ok)) == set(breaks), "every rule the function returns has a case here"
    assert all(fn(ok).values()), fn(ok)
    bad = fn({**ok, **breaks[rule]})
    assert not bad[rule]
    assert all(v for k, v in bad.items() if k != rule), bad
    assert not V.agrees(bad) and V.agrees(fn(ok))


def test_verdict_rules_refuse_missing_numbers() -> None:
    """A row without a rule's numbers never agrees (NaN comparisons are False), so an old row cannot pass a new rule."""
    for case, (fn, ok, _) in RULE_CASES.items():
        if case == "sae_paper_magnitude":
            continue       # missing S_d NMSE counts as 0: "stays below" the paper's (not an agreement either way)
        assert not V.agrees(fn({})), case


def test_refusal_rules() -> None:
    assert V.refusal_metric_detects({"refusal_control_z": V.Z_SPECIFIC})
    assert not V.refusal_metric_detects({"refusal_control_z": V.Z_SPECIFIC - 0.1})
    assert not V.refusal_metric_detects({})
    z = {"refusal_z_original": V.Z_SPECIFIC}
    assert V.refusal_sign_flip({**z, "refusal_z_sd": -V.Z_SPECIFIC, "refusal_z_sd_matched": 5.0}) == "reversed"
    assert V.refusal_sign_flip({**z, "refusal_z_sd": 1.9, "refusal_z_sd_matched": 5.0}) == "lost"
    assert V.refusal_sign_flip({**z, "refusal_z_sd": 2.0, "refusal_z_sd_matched": 2.0}) == "kept"
    assert V.refusal_sign_flip({"refusal_z_original": 1.99, "refusal_z_sd": -9.0}) == "not_specific"
    assert V.refusal_sign_flip({"refusal_z_original": -3.0, "refusal_z_sd": -5.0}) == "not_specific"
    assert V.specific_preserved({"sentiment_z_bd": 3.0, "sentiment_z_original": 6.0}, "sentiment", "bd") == 0.5


def test_report_prefers_a_fresh_quick_row_over_a_stale_full_row(results_dir: Path) -> None:
    import claims_common as cc
    import run_all
    row = {"claim": "adamw", "paper": {"text": "p"}, "seeds": {"init": 0}, "model": "m", "command": "c",
           "measured": {"bd_final_rel_deviation": 1e-6, "sd_final_rel_deviation": 0.5}}
    cc.write_claim({**row, "ours_bd": "FULL"}, quick=False)
    cc.write_claim({**row, "ours_bd": "QUICK"}, quick=True)
    text = run_all.report(results_dir / "R.md").read_text()
    assert "| FULL |" in text and "| QUICK |" not in text and "full-run rows are stale" not in text
    rows = json.loads(cc.CLAIMS_FULL.read_text())
    rows[0]["provenance"]["code_sha256"]["hf_gauge/"] = "0" * 64        # the package changed since the full run
    cc.CLAIMS_FULL.write_text(json.dumps(rows))
    text = run_all.report(results_dir / "R.md").read_text()
    assert "| QUICK |" in text and "quick** (the full row is stale)" in text
    assert "**1 of 1 full-run rows are stale** (adamw)" in text and "changed since this row was written: hf_gauge/" in text


def test_over_seeds_means_and_spreads() -> None:
    import claims_common as cc
    mean, spread = cc.over_seeds([{"a": 1.0, "b": 2, "s": "x", "f": True}, {"a": 3.0, "b": 4, "f": False}], ["a"])
    assert mean == {"a": 2.0, "b": 3.0} and spread == {"n_seeds": 2, "a": [1.0, 3.0]}   # strings, bools left out
    assert cc.over_seeds([{"a": 0.5}], ["a"])[1] == {"n_seeds": 1, "a": [0.5, 0.5]}
    with pytest.raises(KeyError, match="headline"):
        cc.over_seeds([{"a": 1.0}, {"b": 1.0}], ["a"])
    with pytest.raises(ValueError):
        cc.over_seeds([], [])
    assert cc.bar({"a": [1.0, 3.0]}, {"a": 2.0}, "a", "A") == ("A", 2.0, 1.0, 3.0)
    assert cc.bar({}, {"a": 2.0}, "a", "A", scale=100) == ("A", 200.0, 200.0, 200.0)


def test_notes_state_what_the_issue_asks_for() -> None:
    """RESULTS.md's text for the new measurements: procrustes says when our raw decoder cosine is at the random-
    rotation reference (contradicting the paper's raw 98%); audit puts the canonical chart's drift in the verdict;
    sae says what the oracle's low NMSE is due to; lora names the source of the dropped numbers."""
    import run_all
    pro = {"ev_cross_before": -0.6, "ev_cross_after_site_R": 0.6, "ev_gap_after_site_R_to_ceiling": 0.35,
           "decoder_mmcs_raw": 0.259, "decoder_mmcs_after_R": 0.4, "decoder_mmcs_seed0_vs_random_rotation": 0.259,
           "decoder_mmcs_same_model_sae_seeds": 0.7, "site_peak_mass": 0.1, "control_peak_mass": 1.0,
           "haar_peak_mass": 0.07}
    text = run_all.notes({"claim": "procrustes", "paper": PAPER_PROCRUSTES, "measured": pro,
                          "spread": {"n_seeds": 3, "decoder_mmcs_raw": [0.25, 0.27]}})
    assert "equals the random-rotation reference 0.259: this contradicts the paper's raw 98.0%" in text
    assert "[0.250-0.270 over 3 seeds]" in text and "same-model SAE-seed ceiling here 0.700" in text
    assert "contradicts" not in run_all.notes({"claim": "procrustes", "paper": PAPER_PROCRUSTES,
                                               "measured": {**pro, "decoder_mmcs_raw": 0.6}})
    aud = {"sentiment_transported_agreement_min": 1.0, "sentiment_canonical_agreement_min": 1.0,
           "top_abs_activation_canonical_agreement_min": 1.0, "sentiment_raw_agreement": 0.02,
           "canonical_stability_residual": 0.33, "finetune_relative_weight_change": 0.003}
    text = run_all.notes({"claim": "audit", "paper": {}, "measured": aud})
    assert "after a 0.3% relative weight change it keeps 33.0%" in text and "Agrees with the paper" in text
    sae = {"within_model_nmse": 0.004, "within_model_nmse_excl_pos0": 0.9, "gauged_bd_nmse": 0.004,
           "gauged_bd_nmse_excl_pos0": 0.9, "gauged_sd_nmse": 0.117, "gauged_sd_nmse_excl_pos0": 3.6,
           "gauged_sd_matched_nmse": 1.18, "gauged_sd_matched_nmse_excl_pos0": 2.5, "variance_share_pos0": 0.98}
    text = run_all.notes({"claim": "sae", "paper": {"bd_nmse": 0.004, "sd_nmse": 1.08}, "measured": sae})
    assert "so its low all-token NMSE is due to position 0" in text and "98.0% of the test" in text
    text = run_all.notes({"claim": "sae", "paper": {"sd_nmse": 1.08},
                          "measured": {**sae, "gauged_sd_nmse_excl_pos0": 0.2}})
    assert "position 0 does not explain its NMSE" in text
    assert "predates" in run_all.notes({"claim": "sae", "paper": {}, "measured": {"gauged_bd_nmse": 0.004}})


def test_whiskers_never_negative() -> None:
    """The mean over three equal seeds can exceed their max by a rounding step (the full sign-ceiling run crashed in
    matplotlib on it); min-max bars clamp that to zero and keep real spreads."""
    import claims_common as cc

    vals = [0.10069444444444445] * 3
    mean = sum(vals) / 3
    assert mean > max(vals)                                   # the rounding the full run met
    err = cc.whiskers([mean, 0.5], [min(vals), 0.25], [max(vals), 0.75])
    assert err == [[mean - min(vals), 0.25], [0.0, 0.25]]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    ax.errorbar([0, 1], [mean, 0.5], yerr=err)                # accepted
    plt.close(fig)


def test_first_step_needing_path() -> None:
    """RESULTS.md says where single-site matching starts to need the path: the first checkpoint whose one-site cell
    is path_better, per token budget, and 'never' when none is."""
    import run_all

    def cell(v: str) -> dict[str, Any]:
        return {"path": {"mean": 1.0}, "endpoint": {"mean": 0.9}, "verdict": v}
    res = {"setup": {"tokens": [64, 2048], "steps": 300, "every": 100},
           "by_step": {"100": {"one/64": cell("same"), "one/2048": cell("same")},
                       "200": {"one/64": cell("path_better"), "one/2048": cell("same")},
                       "300": {"one/64": cell("path_better"), "one/2048": cell("same")}}}
    assert run_all.first_step_needing_path(res) == {64: 200, 2048: None}
    res["by_step"]["300"]["one/2048"] = cell("path_better")
    assert run_all.first_step_needing_path(res) == {64: 200, 2048: 300}


def test_trajectory_grid_cache_is_reused_only_by_the_same_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cached grid evaluation is keyed by the code the staleness rule checks: a change of the library (or of a
    benchmark module) evaluates again, the same code reads the cache."""
    import claim_trajectory as ct
    import claims_common as cc
    calls: list[int] = []
    monkeypatch.setattr(ct, "ckpt_root", lambda quick, setting, seed: tmp_path)
    monkeypatch.setattr(ct, "evaluate_seed", lambda setting, quick, seed, tokens: calls.append(seed) or {"n": len(calls)})
    code = {"benchmarks/claim_trajectory.py": "a", "hf_gauge/": "lib-1"}
    monkeypatch.setattr(cc, "code_hashes", lambda claim: dict(code))
    assert ct.cached_eval("tiny", True, 0, [64]) == {"n": 1}
    assert ct.cached_eval("tiny", True, 0, [64]) == {"n": 1} and calls == [0]
    code["hf_gauge/"] = "lib-2"
    assert ct.cached_eval("tiny", True, 0, [64]) == {"n": 2} and calls == [0, 0]
