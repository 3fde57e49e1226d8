"""Matching: from a correlation matrix between two charts to a signed permutation.

``C[i, j] = corr(A_i, B_j)`` for coordinate i of chart A and j of chart B. A gauge maps A -> B with
``x_B[j] = sign[j] * x_A[perm[j]]``, so B's coordinate j is matched to A's ``perm[j]``.

- ``method="signed"`` (B_d, sign-marginalized): Hungarian on ``-|C|``, then ``sign[j] = sign(C[perm[j], j])``.
- ``method="permutation"`` (the S_d baseline): Hungarian on ``-C``, all signs +1. With decorrelated coordinates its
  accuracy is capped at the fraction of positive signs in the true gauge.
- ``method="procrustes"`` (``find_gauge`` only): an orthogonal map ``x_B ≈ x_A R`` (``hf_gauge.orthogonal``).

``find_gauge`` builds ``C`` from paired activation statistics (``hf_gauge.stats``, ``data=...``) or, with
``data=None``, from the weights alone (``hf_gauge.features``).
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable, Sequence

import torch

from .assign import METHODS, Match, match_correlation
from .errors import GaugeError
from .features import match_residual_from_weights
from .gauge import Gauge
from .group import SignedPermutation
from .inner import match_inner
from .models import describe
from .orthogonal import OrthogonalMap, procrustes_from_cross
from .specs import ArchSpec
from .stats import collect_pair_stats, iter_batches
from .view import ModelView

__all__ = ["Match", "match_correlation", "METHODS", "find_gauge", "find_full_gauge", "check_pair", "select_families"]

# ----------------------------------------------------------------------------------------------------------------
# find_gauge: model A -> model B
# ----------------------------------------------------------------------------------------------------------------
FIND_METHODS = METHODS + ("procrustes",)


def check_pair(model_a: Any, model_b: Any) -> tuple[ModelView, ModelView]:
    """Resolve both models and refuse pairs that cannot share a residual chart (``GaugeError``)."""
    va, vb = ModelView.of(model_a), ModelView.of(model_b)
    ca, cb = va.config, vb.config
    if ca.model_type != cb.model_type or va.spec.name != vb.spec.name:
        raise GaugeError(f"different architectures: model A is {ca.model_type!r} but model B is {cb.model_type!r}; a "
                         "gauge relates two checkpoints of one architecture")
    if ca.hidden != cb.hidden:
        raise GaugeError(f"different widths: model A has hidden_size={ca.hidden} but model B has "
                         f"{cb.hidden}; a residual gauge needs equal widths")
    if ca.n_layers != cb.n_layers:
        raise GaugeError(f"different depths: model A has {ca.n_layers} layers but model B has "
                         f"{cb.n_layers}; gauges relate checkpoints of one architecture")
    return va, vb


def _check_group(element: SignedPermutation, ma: ModelView, method: str) -> None:
    """LayerNorm residuals admit S_d x {±1} only: a mixed-sign match cannot be a gauge of this model."""
    rule = ma.spec.space("residual").signs
    if rule == "global" and method == "signed":
        neg = int((element.sign < 0).sum())
        if 0 < neg < element.size:
            raise GaugeError(
                f"mixed signs on a LayerNorm model ({ma.config.model_type}): the sign-marginalized match flips {neg} of "
                f"{element.size} coordinates, but LayerNorm's mean-centring admits only permutations and one global "
                "sign flip (S_d x {±1}); the two checkpoints are not related by an admissible gauge. Use "
                "method='permutation' for the S_d correspondence, or method='procrustes' for an activation-level map."
            )
    elif rule == "none" and not element.is_permutation:
        raise GaugeError(f"the residual of {ma.config.model_type} admits permutations only; use method='permutation'")


def find_gauge(model_a: Any, model_b: Any, data: Any = None, method: str = "signed", tokenizer: Any = None,
               batch_size: int = 8, progress: bool | None = None, low_confidence: float = 0.05,
               spaces: str | Sequence[str] = ("residual",), **kw: Any):
    """The gauge from ``model_a``'s residual chart to ``model_b``'s: ``x_B = g(x_A)``.

    Args:
        data: ``None`` (default): data-free, from the weights (``hf_gauge.features``); otherwise token ids
            ``[n, T]``/``[T]``, a list of strings (with ``tokenizer``) or an iterable of batch dicts
            (``hf_gauge.stats``).
        method: ``"signed"`` (B_d, Hungarian on ``-|C|``), ``"permutation"`` (S_d baseline, Hungarian on ``-C``) or
            ``"procrustes"`` (returns an ``OrthogonalMap`` with ``x_B ≈ x_A R``; needs ``data``).
        low_confidence: margins below this count as low-confidence coordinates in ``gauge.metrics``.
        spaces: which gauge spaces to fit: ``("residual",)`` (default), ``"all"`` or any of ``"residual"``,
            ``"mlp"``, ``"attn"``. MLP-unit and head spaces are matched by ``hf_gauge.inner.match_inner`` after the
            residual (from the same ``data``, or data-free from weights aligned by the residual gauge).
        **kw: passed to ``collect_pair_stats`` (``max_length``, ``layers``, ``include_embed``,
            ``include_final_norm``, ``stats_device``, ``shard``) or, data-free, ``max_rows`` of the features.

    Returns a ``Gauge`` with ``residual`` set, ``confidence["residual"]`` (per B coordinate: matched score minus the
    best competitor in its row and column) and ``metrics`` (mean matched |C|, min margin, low-confidence count,
    n_tokens, min_tokens, method, data_free). Fewer than ``min_tokens(d) = d`` tokens warn; a site that saw fewer
    than 3 tokens carries no correlation (two points always correlate ±1), so 1-2 tokens give margins 0 and every
    coordinate low-confidence rather than a confident-looking match. LayerNorm models with ``method="signed"`` are checked against S_d x {±1}: a
    mixed-sign result raises ``GaugeError``.
    """
    if method not in FIND_METHODS:
        raise GaugeError(f"unknown method {method!r}; use one of {FIND_METHODS}")
    ma, mb = check_pair(model_a, model_b)
    wanted = select_families(ma.spec, spaces)
    if wanted != ("residual",) and method == "procrustes":
        raise GaugeError("method='procrustes' fits the residual stream only; pass spaces=('residual',)")
    data_free = data is None
    if len(wanted) > 1 and not data_free:   # two passes over the data: materialise the token batches once
        it, _ = iter_batches(data, tokenizer=tokenizer, batch_size=batch_size, max_length=kw.get("max_length"))
        data = [{"input_ids": i, "attention_mask": a} for i, a in it]
    stats_kw = {k: kw.pop(k) for k in ("max_length", "layers", "include_embed", "include_final_norm", "stats_device",
                                       "shard") if k in kw}
    max_rows = kw.pop("max_rows", None)
    if kw:
        raise GaugeError(f"unexpected keyword argument(s) {sorted(kw)} for find_gauge")
    metrics: dict[str, Any] = {"method": method, "data_free": data_free}
    if data_free:
        if method == "procrustes":
            raise GaugeError("method='procrustes' fits an orthogonal map from activations: pass data=token ids or texts")
        if stats_kw:
            raise GaugeError(f"{sorted(stats_kw)} only apply when matching from data; pass data=...")
        m, counts = match_residual_from_weights(ma, mb, method=method, max_rows=max_rows)
        metrics.update(counts)
    else:
        if max_rows is not None:
            raise GaugeError("max_rows only applies to data-free matching (data=None)")
        stats = collect_pair_stats(ma, mb, data, tokenizer=tokenizer, batch_size=batch_size, progress=progress,
                                   **stats_kw)
        if stats.n_tokens == 0:
            raise GaugeError("data is empty: no non-padding token was seen; pass at least one token")
        metrics.update(n_tokens=stats.n_tokens, n_sites=len(stats.sites), min_tokens=min_tokens(stats.d))
        if stats.n_tokens < min_tokens(stats.d):
            warnings.warn(f"find_gauge saw {stats.n_tokens} token(s) for a residual width of {stats.d}: below "
                          f"{min_tokens(stats.d)} tokens the sample correlation of the d coordinates is rank-deficient "
                          "and the match can be chance (check gauge.metrics['n_low_confidence'] and the margins); "
                          "pass more data", stacklevel=2)
        if method == "procrustes":
            R = procrustes_from_cross(stats.cross_covariance())
            return OrthogonalMap(R, source=describe(ma), target=describe(mb), metrics=metrics, check=False)
        m = match_correlation(stats.correlation(), method, overwrite=True)     # a fresh C: its memory is the cost
    _check_group(m.element, ma, method)
    metrics.update(m.summary(low_confidence))
    metrics["low_confidence_threshold"] = low_confidence
    label = ("data-free" if data_free else "activations") + f"/{method}"
    extra: dict[str, SignedPermutation] = {}
    confidence: dict[str, Any] = {"residual": torch.from_numpy(m.margin)}
    inner_spaces = tuple(sp for sp in wanted if sp != "residual")
    if inner_spaces:
        inner = match_inner(ma, mb, residual=m.element, data=data, spaces=inner_spaces, method=method)
        extra, label = dict(inner), label + "+inner"
        confidence.update(inner.confidence)
    return Gauge(spaces={"residual": m.element, **extra}, source=describe(ma), target=describe(mb), method=label,
                 metrics=metrics, confidence=confidence)


def min_tokens(d: int) -> int:
    """The documented minimum number of tokens for a data-based match of width ``d``: ``d``. With ``n`` tokens the
    centred activations span at most ``n - 1`` dimensions, so below ``d`` tokens the sample correlation matrix is
    rank-deficient and a correspondence can arise by chance (with 2 tokens every correlation is ±1)."""
    return int(d)


def select_families(spec: ArchSpec, spaces: str | Sequence[str]) -> tuple[str, ...]:
    """Normalise ``spaces=`` to a tuple of the spec's space families (``spec.families``) that starts with
    ``"residual"``; ``"all"`` selects every family. Anything else raises ``GaugeError`` listing the valid families."""
    fams = spec.families                                                  # ("residual", "mlp", "attn", ...)
    got = fams if spaces == "all" else ((spaces,) if isinstance(spaces, str) else tuple(spaces))
    bad = [sp for sp in got if sp not in fams]
    if bad or "residual" not in got:
        raise GaugeError(f"spaces={spaces!r}: choose 'all' or a subset of {fams} (the space families of "
                         f"{spec.name}) that includes 'residual' (the inner spaces are matched relative to it)")
    return ("residual",) + tuple(sp for sp in fams if sp in got and sp != "residual")


def find_full_gauge(model_a: Any, model_b: Any, data: Any = None, *, method: str = "signed",
                    layers: Iterable[int] | None = None) -> Gauge:
    """The full gauge A -> B: residual (``find_gauge``) plus every inner space (``inner.match_inner``; from
    activations when ``data`` is given). Same as ``find_gauge(..., spaces="all")`` but with ``layers`` to restrict
    the inner spaces."""
    va, vb = ModelView.of(model_a), ModelView.of(model_b)
    residual = find_gauge(va.module, vb.module, data=data, method=method).residual
    inner = match_inner(va, vb, residual=residual, data=data, method=method, layers=layers)
    g = inner.to_gauge(residual, method=f"full(find_gauge+{inner.source})")
    g.source, g.target = describe(va), describe(vb)
    return g
