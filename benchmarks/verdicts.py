"""Verdict rules of the paper-claim benchmarks: each maps a claims row's ``measured`` numbers to named checks.

RESULTS.md states a verdict only through these functions (``run_all.notes``), and the quick-mode tests
(``tests/test_benchmarks.py``) assert the same named checks, so a threshold lives in exactly one place. Each function
returns ``{check name: bool}``; ``agrees(checks)`` is the conjunction. The trajectory claim's rules live next to its
pre-registered grid (``claim_trajectory.cell_verdict`` / ``finding``).
"""
from __future__ import annotations

from typing import Any

EXACT_TOL = 1e-3          # |B_d result - untouched result| counted as "exact transport" (relative, or absolute NMSE)
CEILING_TOL = 0.05        # |permutation-only accuracy - positive fraction| allowed by the S_d ceiling
LOST = 0.5                # an S_d / control effect with |preserved| below LOST counts as "mostly lost"
FAIL_FACTOR = 2.0         # an S_d SAE NMSE above FAIL_FACTOR x the within-model NMSE counts as "S_d fails"
RETAINED = 0.95           # a B_d LoRA transport keeping at least RETAINED of the CE gain counts as "kept"
Z_SPECIFIC = 2.0          # an effect |z| >= Z_SPECIFIC against same-norm random directions counts as specific
ADAMW_BD = 1e-3           # B_d resumed-run deviation at float-rounding level
ADAMW_SD = 0.1            # S_d resumed-run deviation counted as "a different trajectory"
RAW_CHANCE = 0.5          # raw-index Jaccard below this counts as "not reproducible without a gauge"
PROCRUSTES_COS_TOL = 0.05  # decoder cosine within this of the paper's counts as reproduced
RANDOM_REF_TOL = 0.02     # a decoder cosine within this of the random-rotation reference is "at chance"


def agrees(checks: dict[str, bool]) -> bool:
    return bool(checks) and all(checks.values())


def _g(m: dict[str, Any], k: str, default: float = float("nan")) -> float:
    v = m.get(k)
    return float(v) if v is not None else default


def exact_recovery(m: dict[str, Any]) -> dict[str, bool]:
    return {"signed_exact": _g(m, "signed_sign_accuracy") == 1.0,
            "data_free_exact": _g(m, "data_free_sign_accuracy") == 1.0,
            "permutation_only_at_ceiling": abs(_g(m, "permutation_only_index_accuracy")
                                               - _g(m, "hidden_positive_fraction")) <= CEILING_TOL}


def sign_ceiling(m: dict[str, Any]) -> dict[str, bool]:
    return {"signed_exact_every_f": _g(m, "signed_min_accuracy") == 1.0,
            "permutation_only_below_f": _g(m, "permutation_only_max_excess_over_f") <= CEILING_TOL}


def sae(m: dict[str, Any], prefix: str = "gauged") -> dict[str, bool]:
    """``prefix``: "gauged" (the base in a hidden gauge: exact transport expected) or "ft_gauged". S_d is judged
    without position 0 (the attention sink dominates the variance there) against the SAE's own within-model NMSE:
    "fails" when its NMSE is above FAIL_FACTOR x that ceiling."""
    ceiling = _g(m, "within_model_nmse_excl_pos0")
    out = {"sd_matched_fails": _g(m, f"{prefix}_sd_matched_nmse_excl_pos0", -1) > FAIL_FACTOR * ceiling,
           "sd_oracle_fails": _g(m, f"{prefix}_sd_nmse_excl_pos0", -1) > FAIL_FACTOR * ceiling}
    if prefix == "gauged":
        out["bd_exact"] = all(abs(_g(m, f"gauged_bd_nmse{x}") - _g(m, f"within_model_nmse{x}"))
                              <= EXACT_TOL * max(1.0, _g(m, f"within_model_nmse{x}")) for x in ("", "_excl_pos0"))
    return out


def sae_paper_magnitude(m: dict[str, Any], paper_sd: float) -> dict[str, bool]:
    """Whether each S_d baseline (without position 0) reaches the paper's S_d NMSE within a factor FAIL_FACTOR."""
    return {k: _g(m, f"gauged_{k}_nmse_excl_pos0", 0) >= paper_sd / FAIL_FACTOR for k in ("sd_matched", "sd")}


def steering(m: dict[str, Any]) -> dict[str, bool]:
    """Rules over the whole curve of step sizes (``*_max_abs_*``: the largest over the step sizes run): B_d exact at
    every step size; S_d "lost" only when |preserved| stays below LOST at every step size; on the fine-tuned
    checkpoint, B_d into the re-gauged export matches the identity-chart copy without transport."""
    return {"bd_exact": max(_g(m, "sentiment_bd_max_abs_error"), _g(m, "refusal_bd_max_abs_error")) <= EXACT_TOL,
            "sentiment_sd_oracle_lost": _g(m, "sentiment_sd_max_abs_preserved") < LOST,
            "sentiment_sd_matched_lost": _g(m, "sentiment_sd_matched_max_abs_preserved") < LOST,
            "finetuned_bd_as_identity": all(abs(_g(m, f"{k}_preserved_finetuned_bd")
                                                - _g(m, f"{k}_preserved_finetuned_identity")) <= EXACT_TOL
                                            for k in ("sentiment", "refusal"))}


def refusal_metric_detects(m: dict[str, Any]) -> bool:
    """The positive control: a direction that must move the refusal metric does so specifically (z >= Z_SPECIFIC)."""
    return _g(m, "refusal_control_z", 0.0) >= Z_SPECIFIC


def specific_preserved(m: dict[str, Any], name: str, lab: str) -> float:
    """The part of an effect a random direction of the same norm does not produce, as a fraction of the original's:
    ``(e_lab - mean_random) / (e_original - mean_random) = z_lab / z_original``."""
    return _g(m, f"{name}_z_{lab}") / _g(m, f"{name}_z_original")


def refusal_sign_flip(m: dict[str, Any]) -> str:
    """The judgement of the paper's "S_d reverses the refusal effect": only when the refusal direction's effect is
    specific (z >= Z_SPECIFIC above same-norm random directions, in the refusal direction), and a reversal only when
    an S_d effect is specifically below the random directions' (z <= -Z_SPECIFIC)."""
    if _g(m, "refusal_z_original", 0.0) < Z_SPECIFIC:
        return "not_specific"
    z_sd = [_g(m, f"refusal_z_{k}", 0.0) for k in ("sd", "sd_matched")]
    if any(z <= -Z_SPECIFIC for z in z_sd):
        return "reversed"
    if any(abs(z) < Z_SPECIFIC for z in z_sd):
        return "lost"
    return "kept"


def lora(m: dict[str, Any]) -> dict[str, bool]:
    """CE gains over the two label tokens. On the fine-tuned checkpoint, B_d into the re-gauged export must match the
    adapter applied to the identity-chart copy without transport."""
    return {"bd_kept": _g(m, "retained_bd") >= RETAINED,
            "sd_oracle_lost": _g(m, "retained_sd") < LOST,
            "sd_matched_lost": _g(m, "retained_sd_matched") < LOST,
            "finetuned_bd_as_identity": abs(_g(m, "retained_finetuned_bd") - _g(m, "retained_finetuned_identity"))
            <= EXACT_TOL}


def adamw(m: dict[str, Any]) -> dict[str, bool]:
    return {"bd_same_trajectory": _g(m, "bd_final_rel_deviation") < ADAMW_BD,
            "sd_different_trajectory": _g(m, "sd_final_rel_deviation") > ADAMW_SD}


def merge(m: dict[str, Any]) -> dict[str, bool]:
    bd = _g(m, "bd_loss_mean")
    return {"bd_beats_sd_matched": bd < _g(m, "sd_found_loss_mean"),
            "bd_beats_sd_oracle": bd < _g(m, "sd_same_perm_loss_mean"),
            "bd_beats_none": bd < _g(m, "none_loss_mean")}


def audit(m: dict[str, Any]) -> dict[str, bool]:
    return {"transported_exact": _g(m, "sentiment_transported_agreement_min") == 1.0,
            "canonical_exact": _g(m, "sentiment_canonical_agreement_min") == 1.0
            and _g(m, "top_abs_activation_canonical_agreement_min") == 1.0,
            "raw_not_reproducible": _g(m, "sentiment_raw_agreement") < RAW_CHANCE}


def procrustes(m: dict[str, Any], paper: dict[str, Any]) -> dict[str, bool]:
    """The paper's EV, raw decoder-cosine and "R is a generic rotation" claims. R's shape is judged by the peak mass
    per row (``claim_procrustes.peak_mass``): R counts as Haar-like when it is closer to a Haar rotation's than to a
    signed permutation's (1). ``||R - I||_F / sqrt(2d)`` and the KS p-value are reported but are not rules: a random
    signed permutation passes both too."""
    peak = _g(m, "site_peak_mass")
    return {"ev_negative_before": _g(m, "ev_cross_before") < 0,
            "ev_improves_with_R": _g(m, "ev_cross_after_site_R") > _g(m, "ev_cross_before"),
            "ev_within_paper_gap": _g(m, "ev_gap_after_site_R_to_ceiling") <= float(paper["ev_after_gap_to_ceiling"]),
            "decoder_cos_raw_as_paper": _g(m, "decoder_mmcs_raw") >= float(paper["decoder_cos"]) - PROCRUSTES_COS_TOL,
            "decoder_cos_raw_above_random": _g(m, "decoder_mmcs_raw")
            > _g(m, "decoder_mmcs_seed0_vs_random_rotation") + RANDOM_REF_TOL,
            "decoder_cos_after_R_above_random": _g(m, "decoder_mmcs_after_R")
            > _g(m, "decoder_mmcs_seed0_vs_random_rotation") + RANDOM_REF_TOL,
            "R_haar_like_not_signed_permutation": abs(peak - _g(m, "haar_peak_mass"))
            < abs(peak - _g(m, "control_peak_mass"))}
