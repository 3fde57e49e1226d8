"""Check a gauge end to end: model A moved through it against model B (weights tensor by tensor, and logits)."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from .errors import GaugeError
from .gauge import Gauge
from .activations import iter_batches, logits
from .engine import check_gauge, move_tensor, moves_for
from .models import fingerprint, offloaded_value
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


class _MovedMap(Mapping):
    """An accelerate hook's ``weights_map`` serving its module's tensors moved through ``plan`` (copies, made as the
    hook loads them); everything else, keys included, is the wrapped map's."""

    def __init__(self, inner: Mapping, prefix: str, plan: dict[str, tuple]) -> None:
        self.inner, self.prefix, self.plan = inner, prefix, plan

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self.inner[key]
        moves = self.plan.get(self.prefix + key)
        return move_tensor(t, moves) if moves else t

    def __iter__(self) -> Iterator[str]:
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)


@contextmanager
def _moved_offload(model: torch.nn.Module, plan: dict[str, tuple]) -> Iterator[None]:
    """Inside, accelerate's hooks load ``model``'s offloaded tensors moved through ``plan``; the hooks' maps (and the
    tied-pointer entries the moved copies add) are restored on exit. The offload itself is never written."""
    saved = []
    for name, mod in model.named_modules():
        hook = getattr(mod, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            wm = getattr(h, "weights_map", None)
            if wm is not None:
                tied = getattr(h, "tied_params_map", None)
                saved.append((h, wm, tied, set(tied) if isinstance(tied, dict) else None))
                h.weights_map = _MovedMap(wm, f"{name}." if name else "", plan)
    try:
        yield
    finally:
        for h, wm, tied, keys in saved:
            h.weights_map = wm
            if keys is not None:
                for k in [k for k in tied if k not in keys]:
                    tied.pop(k, None)


def _moved_logits(a: torch.nn.Module, plan: dict[str, tuple], batches: list) -> list[torch.Tensor]:
    """Logits of ``a`` moved through ``plan`` without moving ``a``: its in-memory parameters replaced by moved copies
    for the call (``functional_call``), its offloaded ones moved as accelerate's hooks load them."""
    params = {n: move_tensor(p.detach(), plan[n]) for n, p in a.named_parameters()      # tied tensors once: the
              if p.device.type != "meta" and plan.get(n)}                                 # call ties the others
    with _moved_offload(a, plan):
        return [logits(a, ids, mask, params=params).cpu()[mask.bool()] for ids, mask in batches]


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

    A is never moved, so an accelerate-offloaded A (weights on the meta device) verifies too: the weights are
    compared tensor by tensor (each of A's tensors moved as a copy, read from the offload where offloaded), and
    moved A runs with moved copies of its in-memory parameters (``functional_call``) while accelerate's hooks load
    its offloaded tensors moved.
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
    la, lb, lm = _logits(a, batches), _logits(b, batches), _moved_logits(a, plan, batches)
    return {
        "max_abs_logit_diff": _max_diff(lm, lb),
        "max_abs_logit_diff_a_b": _max_diff(la, lb),
        "symmetry_logit_diff": _max_diff(lm, la),
        "max_abs_logit": max(float(x.abs().max()) for x in lb),
        "weights_bit_exact": moved_diff.differ == 0,
        "n_tensors_differ": moved_diff.differ,
        "max_abs_weight_diff": moved_diff.max_w,
        "relative_weight_diff": moved_diff.relative,
        "relative_weight_diff_without_gauge": raw_diff.relative,
        "fingerprint_match": fingerprint(a, gauge) == fingerprint(b),
        "tokens": sum(int(mask.sum()) for _, mask in batches),
    }
