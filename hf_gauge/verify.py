"""Check a gauge end to end: move a copy of model A through it and compare with model B (logits and weights)."""
from __future__ import annotations

import copy
import warnings
from typing import Any

import torch

from .errors import GaugeError
from .gauge import Gauge
from .activations import iter_batches, logits
from .models import apply_gauge, fingerprint
from .view import ModelView

__all__ = ["verify", "default_batch"]


def default_batch(vocab_size: int, batch: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    """A fixed small batch of token ids (reproducible: the same for every call with the same arguments)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=gen)


def _batches(data: Any, vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(input_ids, attention_mask)`` batches of ``data`` through the shared normaliser (ids checked against the
    vocabulary before any model runs); ``None`` gives ``default_batch``."""
    if data is None:
        ids = default_batch(vocab)
        return [(ids, torch.ones_like(ids))]
    it, _ = iter_batches(data, shard=False, vocab_size=vocab)
    batches = [(ids, mask) for ids, mask in it if mask.any()]
    if not batches:
        raise GaugeError("data has no non-padding token ids: pass at least one token")
    return batches


def _logits(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Float32 logits at the non-padding positions of each batch, ``[n_tokens, vocab]`` on the CPU."""
    return [logits(model, ids, mask).cpu()[mask.bool()] for ids, mask in batches]


def _max_diff(x: list[torch.Tensor], y: list[torch.Tensor]) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(x, y))


def _weight_diff(x: dict, y: dict) -> tuple[int, float, float]:
    """(tensors that differ, max |difference|, ||x - y||_F / ||y||_F over floating tensors)."""
    differ, max_w, num, den = 0, 0.0, 0.0, 0.0
    for k in sorted(set(x) | set(y)):
        a, b = x.get(k), y.get(k)
        if a is None or b is None or a.shape != b.shape or a.dtype != b.dtype:
            differ += 1
            max_w = float("inf")
            continue
        if a.is_floating_point():
            d = (a.double() - b.double())
            num += float(d.square().sum())
            den += float(b.double().square().sum())
        if not torch.equal(a, b):
            differ += 1
            max_w = max(max_w, float(d.abs().max())) if a.is_floating_point() else float("inf")
    return differ, max_w, (num ** 0.5) / (den ** 0.5) if den > 0 else (0.0 if num == 0 else float("inf"))


@torch.no_grad()
def verify(model_a: Any, model_b: Any, gauge: Gauge, data: Any = None) -> dict[str, Any]:
    """Compare model B with a copy of model A moved through ``gauge`` (A and B are not modified).

    Logits are gauge-invariant, so the logit numbers check that the gauge is a symmetry (moved A computes what A
    computes) and how far B is from A functionally; the weight numbers check the gauge itself (a right gauge makes
    moved A equal B bit for bit for a gauged copy, and closer to B than A is for a fine-tune).

    Returns ``max_abs_logit_diff`` (moved A vs B on ``data``: anything ``activations.iter_batches`` takes
    without a tokenizer (token ids, a tokenizer output, batch dicts; padding excluded), or by default a fixed batch
    of random ids), ``max_abs_logit_diff_a_b`` (A vs B), ``symmetry_logit_diff`` (moved A vs A),
    ``max_abs_logit`` (B's largest |logit|), ``weights_bit_exact``, ``n_tensors_differ``, ``max_abs_weight_diff``,
    ``relative_weight_diff`` (||moved A - B|| / ||B||), ``relative_weight_diff_without_gauge`` (||A - B|| / ||B||),
    ``fingerprint_match`` and ``tokens``.
    """
    if not isinstance(gauge, Gauge):
        raise GaugeError(f"verify expects a hf_gauge.Gauge, got {type(gauge).__name__}")
    va, vb = ModelView.of(model_a), ModelView.of(model_b)
    a, b, ca, cb = va.module, vb.module, va.config, vb.config
    if ca.model_type != cb.model_type or ca.hidden != cb.hidden:
        raise GaugeError(f"models differ in architecture: {ca.model_type}/{ca.hidden} vs "
                         f"{cb.model_type}/{cb.hidden}; a gauge relates two models of one shape")
    vocab = min(ca.vocab_size, cb.vocab_size)
    batches = _batches(data, vocab)
    moved = copy.deepcopy(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # a fingerprint warning is expected when A is a fine-tune
        apply_gauge(moved, gauge)
    la, lb, lm = _logits(a, batches), _logits(b, batches), _logits(moved, batches)
    sb = b.state_dict()
    differ, max_w, rel = _weight_diff(moved.state_dict(), sb)
    _, _, rel0 = _weight_diff(a.state_dict(), sb)
    result = {
        "max_abs_logit_diff": _max_diff(lm, lb),
        "max_abs_logit_diff_a_b": _max_diff(la, lb),
        "symmetry_logit_diff": _max_diff(lm, la),
        "max_abs_logit": max(float(x.abs().max()) for x in lb),
        "weights_bit_exact": differ == 0,
        "n_tensors_differ": differ,
        "max_abs_weight_diff": max_w,
        "relative_weight_diff": rel,
        "relative_weight_diff_without_gauge": rel0,
        "fingerprint_match": fingerprint(moved) == fingerprint(b),
        "tokens": sum(int(mask.sum()) for _, mask in batches),
    }
    del moved
    return result
