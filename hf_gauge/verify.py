"""Check a gauge end to end: model A moved through it against model B (weights tensor by tensor, and logits)."""
from __future__ import annotations

import copy
import warnings
from typing import Any

import torch

from .errors import GaugeError
from .gauge import Gauge
from .activations import iter_batches, logits
from .engine import check_gauge, move_tensor, moves_for
from .models import apply_gauge, fingerprint, offloaded_value
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


class _WeightDiff:
    """Streamed (tensors that differ, max |difference|, ||x - y||_F / ||y||_F over floating tensors), one pair of
    tensors at a time (nothing model-sized is held)."""

    def __init__(self) -> None:
        self.differ, self.max_w, self.num, self.den = 0, 0.0, 0.0, 0.0

    def add(self, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        if a is None or b is None or a.shape != b.shape or a.dtype != b.dtype:
            self.differ += 1
            self.max_w = float("inf")
            return
        a, b = a.cpu(), b.cpu()
        if a.is_floating_point():
            d = a.double() - b.double()
            self.num += float(d.square().sum())
            self.den += float(b.double().square().sum())
        if not torch.equal(a, b):
            self.differ += 1
            self.max_w = max(self.max_w, float(d.abs().max())) if a.is_floating_point() else float("inf")

    @property
    def relative(self) -> float:
        return (self.num ** 0.5) / (self.den ** 0.5) if self.den > 0 else (0.0 if self.num == 0 else float("inf"))


def _value(model: torch.nn.Module, name: str, t: torch.Tensor) -> torch.Tensor:
    """``model``'s tensor ``name`` (``t`` from its state dict), read where accelerate keeps it when offloaded."""
    if t.device.type != "meta":
        return t.detach()
    mod, _, local = name.rpartition(".")
    return offloaded_value(model.get_submodule(mod) if mod else model, local)


def _is_offloaded(model: torch.nn.Module) -> bool:
    return any(t.device.type == "meta" for t in model.state_dict().values())


@torch.no_grad()
def verify(model_a: Any, model_b: Any, gauge: Gauge, data: Any = None) -> dict[str, Any]:
    """Compare model B with model A moved through ``gauge`` (A and B are not modified).

    Logits are gauge-invariant, so the logit numbers check that the gauge is a symmetry (moved A computes what A
    computes) and how far B is from A functionally; the weight numbers check the gauge itself (a right gauge makes
    moved A equal B bit for bit for a gauged copy, and closer to B than A is for a fine-tune).

    Returns ``max_abs_logit_diff`` (moved A vs B on ``data``: anything ``activations.iter_batches`` takes
    without a tokenizer (token ids, a tokenizer output, batch dicts; padding excluded), or by default a fixed batch
    of random ids), ``max_abs_logit_diff_a_b`` (A vs B), ``symmetry_logit_diff`` (moved A vs A),
    ``max_abs_logit`` (B's largest |logit|), ``weights_bit_exact``, ``n_tensors_differ``, ``max_abs_weight_diff``,
    ``relative_weight_diff`` (||moved A - B|| / ||B||), ``relative_weight_diff_without_gauge`` (||A - B|| / ||B||),
    ``fingerprint_match`` and ``tokens``.

    The weights are compared tensor by tensor (each of A's tensors moved as a copy, read from accelerate's offload
    where A is offloaded), so neither model is modified or copied whole for them. The two logit numbers of moved A
    need a moved copy of A; for an offloaded A (weights on the meta device) that copy is not built and they are
    ``None``: the weight numbers then decide.
    """
    if not isinstance(gauge, Gauge):
        raise GaugeError(f"verify expects a hf_gauge.Gauge, got {type(gauge).__name__}")
    va, vb = ModelView.of(model_a), ModelView.of(model_b)
    a, b, ca, cb = va.module, vb.module, va.config, vb.config
    if ca.model_type != cb.model_type or ca.hidden != cb.hidden:
        raise GaugeError(f"models differ in architecture: {ca.model_type}/{ca.hidden} vs "
                         f"{cb.model_type}/{cb.hidden}; a gauge relates two models of one shape")
    check_gauge(va.spec, ca, gauge)
    vocab = min(ca.vocab_size, cb.vocab_size)
    batches = _batches(data, vocab)
    sa, sb = a.state_dict(), b.state_dict()
    plan = moves_for(va.spec, ca, gauge, [n for n, _ in a.named_parameters(remove_duplicate=False)])
    moved_diff, raw_diff = _WeightDiff(), _WeightDiff()
    for k in sorted(set(sa) | set(sb)):            # A's tensors moved one at a time: the model itself is not touched
        ta = _value(a, k, sa[k]) if k in sa else None
        tb = _value(b, k, sb[k]) if k in sb else None
        raw_diff.add(ta, tb)
        moved_diff.add(move_tensor(ta, plan[k]) if ta is not None and plan.get(k) else ta, tb)
    la, lb = _logits(a, batches), _logits(b, batches)
    lm = None
    if not _is_offloaded(a):                       # a moved copy runs only when A's weights are all in memory
        moved = copy.deepcopy(a)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")        # a fingerprint warning is expected when A is a fine-tune
            apply_gauge(moved, gauge)
        lm = _logits(moved, batches)
        del moved
    return {
        "max_abs_logit_diff": _max_diff(lm, lb) if lm is not None else None,
        "max_abs_logit_diff_a_b": _max_diff(la, lb),
        "symmetry_logit_diff": _max_diff(lm, la) if lm is not None else None,
        "max_abs_logit": max(float(x.abs().max()) for x in lb),
        "weights_bit_exact": moved_diff.differ == 0,
        "n_tensors_differ": moved_diff.differ,
        "max_abs_weight_diff": moved_diff.max_w,
        "relative_weight_diff": moved_diff.relative,
        "relative_weight_diff_without_gauge": raw_diff.relative,
        "fingerprint_match": fingerprint(a, gauge) == fingerprint(b),
        "tokens": sum(int(mask.sum()) for _, mask in batches),
    }
