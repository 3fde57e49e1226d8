"""Orthogonal maps between residual streams that are not gauge-equivalent (e.g. different seeds).

Convention (row vectors, tokens as rows): ``x_B ≈ x_A @ R`` with ``R`` orthogonal ``[d, d]``, fitted by orthogonal
Procrustes on centred activations: ``M = A_c^T B_c``, ``U S V^T = svd(M)``, ``R = U V^T`` (float64). A signed
permutation gauge ``g`` (``x_B = Q x_A`` as column vectors) is the special case ``R = Q^T``.

Transport rules (derived from ``x_B = x_A R``, ``x_A = x_B R^T``):

- vectors ``[..., d]`` (steering / control vectors, activations): ``v_B = v_A R``.
- SAE encoder ``W_enc [d, m]``: ``x_B W'_enc = x_A W_enc`` for all x needs ``W'_enc = R^T W_enc``.
- SAE decoder ``W_dec [m, d]`` and ``b_dec [d]``: the reconstruction moves like a vector: ``W'_dec = W_dec R``,
  ``b'_dec = b_dec R``; ``b_enc`` and thresholds are unchanged.

An orthogonal map cannot be written into a model with RMSNorm gains of generic values: ``R^T diag(g) R`` stays
diagonal only when ``R`` is a signed permutation, so ``apply_gauge`` refuses it (:func:`refuse_apply`).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
from scipy.linalg import orthogonal_procrustes

from .assign import match_correlation
from .errors import GaugeError

__all__ = ["OrthogonalMap", "procrustes_from_cross", "refuse_apply"]

_REFUSAL = (
    "cannot apply an orthogonal map to a model's weights: RMSNorm multiplies each residual coordinate by its own gain g, "
    "and R^T diag(g) R is diagonal only when R is a signed permutation, so with generic gains a rotation changes the "
    "model's function (only signed permutations commute with a diagonal gain). Use the map to transport activation-"
    "level objects instead (orthogonal_map.transport(steering_vector or SAE)), use a signed-permutation Gauge "
    "(find_gauge(..., method='signed')), or fold every RMSNorm gain into the adjacent linears first (then the "
    "residual group is all of O(d))."
)


def refuse_apply(obj: Any) -> None:
    """Raise the ``GaugeError`` ``apply_gauge`` gives for anything that is not a ``Gauge``."""
    if isinstance(obj, OrthogonalMap) or (isinstance(obj, (torch.Tensor, np.ndarray)) and obj.ndim == 2
                                          and obj.shape[0] == obj.shape[1]):
        raise GaugeError(_REFUSAL)
    raise GaugeError(f"apply_gauge expects a hf_gauge.Gauge, got {type(obj).__name__}")


def procrustes_from_cross(M: torch.Tensor | np.ndarray) -> np.ndarray:
    """``R = argmin_{R orthogonal} ||A R - B||_F`` from ``M = A^T B`` alone (float64).

    ``scipy.linalg.orthogonal_procrustes(A, B)`` depends on ``A, B`` only through ``A^T B``; passing ``A = I``,
    ``B = M`` gives exactly the SVD solution ``R = U V^T`` of ``M = U S V^T``.
    """
    M = M.detach().cpu().double().numpy() if isinstance(M, torch.Tensor) else np.asarray(M, dtype=np.float64)
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise GaugeError(f"the cross-covariance must be square, got shape {M.shape}")
    if not np.all(np.isfinite(M)):
        raise GaugeError("the cross-covariance has NaN or inf entries")
    R, _ = orthogonal_procrustes(np.eye(M.shape[0]), M)
    return R


class OrthogonalMap:
    """``x_B ≈ x_A @ R`` between two residual charts (see the module docstring for every convention)."""

    def __init__(self, R: torch.Tensor | np.ndarray, *, source: Mapping[str, Any] | None = None,
                 target: Mapping[str, Any] | None = None, metrics: Mapping[str, Any] | None = None,
                 check: bool = True) -> None:
        R = torch.as_tensor(np.asarray(R) if not isinstance(R, torch.Tensor) else R).detach().cpu().double()
        if R.dim() != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
            raise GaugeError(f"R must be a square non-empty matrix, got shape {tuple(R.shape)}")
        if check:
            err = float((R.T @ R - torch.eye(R.shape[0], dtype=torch.float64)).abs().max())
            if err > 1e-6:
                raise GaugeError(f"R is not orthogonal (max |R^T R - I| = {err:.2e}); fit it with method='procrustes'")
        self.R = R
        self.source: dict[str, Any] = dict(source or {})
        self.target: dict[str, Any] = dict(target or {})
        self.metrics: dict[str, Any] = dict(metrics or {})
        self.method = "procrustes"

    @property
    def width(self) -> int:
        return self.R.shape[0]

    def __repr__(self) -> str:
        return f"OrthogonalMap(d={self.width}, ||R - I||_F={float(torch.linalg.norm(self.R - torch.eye(self.width, dtype=torch.float64))):.3f})"

    def inverse(self) -> "OrthogonalMap":
        return OrthogonalMap(self.R.T.clone(), source=self.target, target=self.source, metrics=self.metrics, check=False)

    def __matmul__(self, other: "OrthogonalMap") -> "OrthogonalMap":
        """``(self @ other)`` applies ``other`` first: ``x @ R_other @ R_self``."""
        if not isinstance(other, OrthogonalMap):
            return NotImplemented
        if other.width != self.width:
            raise GaugeError(f"cannot compose orthogonal maps of widths {other.width} and {self.width}")
        return OrthogonalMap(other.R @ self.R, source=other.source, target=self.target, check=False)

    def _refuse_apply(self) -> None:
        raise GaugeError(_REFUSAL)

    # ------------------------------------------------------------------ transport
    def _vec(self, v: torch.Tensor, what: str = "vector") -> torch.Tensor:
        if v.dim() == 0 or v.shape[-1] != self.width:
            raise GaugeError(f"width mismatch: {what} has shape {tuple(v.shape)} but the map's width is {self.width}; "
                             "the last axis must be the residual width")
        dt = v.dtype if v.is_floating_point() else torch.float64
        return (v.detach().to(torch.float64) @ self.R.to(v.device)).to(dt)

    def transport(self, obj: Any) -> Any:
        """Move ``obj`` from A's chart to B's: tensors/arrays ``[..., d]``, ``{layer: vector}``, SAE state dicts."""
        if isinstance(obj, torch.Tensor):
            return self._vec(obj)
        if isinstance(obj, np.ndarray):
            return self._vec(torch.from_numpy(np.ascontiguousarray(obj))).numpy().astype(obj.dtype if obj.dtype.kind == "f" else np.float64)
        if isinstance(obj, Mapping) and "W_enc" in obj and "W_dec" in obj:
            return self._sae(obj)
        if isinstance(obj, Mapping) and obj and all(isinstance(k, int) for k in obj):
            return {k: self.transport(v) for k, v in obj.items()}
        raise GaugeError(f"an OrthogonalMap transports tensors [..., d], {{layer: vector}} dicts and SAE state dicts "
                         f"(W_enc, W_dec, b_dec, b_enc); got {type(obj).__name__}")

    def _sae(self, sae: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(sae)
        W_enc, W_dec = torch.as_tensor(sae["W_enc"]), torch.as_tensor(sae["W_dec"])
        if W_enc.dim() != 2 or W_enc.shape[0] != self.width or W_dec.dim() != 2 or W_dec.shape[1] != self.width:
            raise GaugeError(f"SAE shapes W_enc {tuple(W_enc.shape)}, W_dec {tuple(W_dec.shape)} do not match width "
                             f"{self.width}: expected SAELens orientation W_enc [d, m], W_dec [m, d]")
        out["W_enc"] = (self.R.T @ W_enc.double()).to(W_enc.dtype)       # W'_enc = R^T W_enc
        out["W_dec"] = self._vec(W_dec, "W_dec")                           # W'_dec = W_dec R
        if "b_dec" in sae:
            out["b_dec"] = self._vec(torch.as_tensor(sae["b_dec"]), "b_dec")   # b'_dec = b_dec R
        return out

    # ------------------------------------------------------------------ diagnostics
    def nearest_signed_permutation(self):
        """The signed permutation closest to ``R`` (Hungarian on ``|R|``), as a ``Match`` (element, score, margin).

        ``R[i, j]`` pairs A's coordinate i with B's coordinate j, like a correlation matrix; the element maps A -> B.
        """
        return match_correlation(self.R, "signed")

    def diagnostics(self, n_haar: int = 3, seed: int = 0) -> dict[str, float]:
        """``||R - I||_F`` (vs ``sqrt(2d)`` for a random rotation), distance to the nearest signed permutation, and a
        two-sample KS test of R's eigenvalue angles against ``n_haar`` Haar-random orthogonal matrices."""
        from scipy.stats import ks_2samp, ortho_group, special_ortho_group

        d = self.width
        R = self.R.numpy()
        m = self.nearest_signed_permutation()
        Q = m.element.to_dense().numpy().T          # the signed permutation as an R-type matrix (R = Q^T)
        angles = np.angle(np.linalg.eigvals(R))
        det = float(np.linalg.det(R))
        rng = np.random.default_rng(seed)
        haar = special_ortho_group if det > 0 else ortho_group
        ref = np.concatenate([np.angle(np.linalg.eigvals(haar.rvs(d, random_state=rng))) for _ in range(n_haar)]) \
            if d > 1 else np.zeros(1)
        ks = ks_2samp(angles, ref)
        return {
            "d": d,
            "dist_identity": float(np.linalg.norm(R - np.eye(d))),
            "dist_identity_random": math.sqrt(2 * d),
            "dist_signed_permutation": float(np.linalg.norm(R - Q)),
            "signed_permutation_mean_abs": float(m.score.mean()),
            "ks_statistic": float(ks.statistic),
            "ks_pvalue": float(ks.pvalue),
            "det": det,
        }
