"""The generic engine: read an ArchSpec, resolve each tensor's moves under a Gauge, and move tensors exactly.

Every move is an index operation (gather along an axis, then multiply by ±1), so it is bit-exact in every
float dtype and never builds a d×d matrix. One engine serves live models (in place), safetensors shards on
disk, PEFT adapters (a LoRA factor inherits the axis of the module it wraps) and optimizer state.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import torch

from .errors import GaugeError
from .gauge import Gauge
from .group import SignedPermutation
from .specs import ArchSpec
from .specs.base import Axis

__all__ = ["Move", "resolve_name", "axes_for", "moves_for", "move_tensor", "check_gauge", "classify"]

# ----------------------------------------------------------------------------------------------------------------
# Names: live PEFT / wrapper parameter names -> (base parameter name, role)
# ----------------------------------------------------------------------------------------------------------------
_PEFT_PREFIX = re.compile(r"^(base_model\.model\.)")
_ROLES: tuple[tuple[re.Pattern, str, str], ...] = (
    (re.compile(r"^(.*)\.lora_A(?:\.[^.]+)?\.weight$"), "lora_A", r"\1.weight"),
    (re.compile(r"^(.*)\.lora_B(?:\.[^.]+)?\.weight$"), "lora_B", r"\1.weight"),
    (re.compile(r"^(.*)\.lora_B(?:\.[^.]+)?\.bias$"), "lora_B_bias", r"\1.weight"),
    (re.compile(r"^(.*)\.lora_embedding_A(?:\.[^.]+)?$"), "lora_emb_A", r"\1.weight"),
    (re.compile(r"^(.*)\.lora_embedding_B(?:\.[^.]+)?$"), "lora_emb_B", r"\1.weight"),
    (re.compile(r"^(.*)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$"), "magnitude", r"\1.weight"),
    # PEFT trainable_token_indices: ``trainable_tokens_delta [n_tokens, d]`` holds rows of the wrapped embedding
    # (or lm_head), so it moves exactly like that weight (residual columns signed-permuted).
    (re.compile(r"^(.*)\.token_adapter\.trainable_tokens_delta(?:\.[^.]+)?$"), "weight", r"\1.weight"),
)
_WRAPPERS = (re.compile(r"\.base_layer\."), re.compile(r"\.modules_to_save\.[^.]+\."),
             re.compile(r"\.modules_to_save\."), re.compile(r"\.original_module\."))


def resolve_name(name: str) -> tuple[str, str]:
    """``'...q_proj.lora_A.default.weight'`` -> ``('...q_proj.weight', 'lora_A')``; plain names get role ``'weight'``."""
    name = _PEFT_PREFIX.sub("", name)
    for rx in _WRAPPERS:
        name = rx.sub(".", name)
    for rx, role, repl in _ROLES:
        if rx.match(name):
            return rx.sub(repl, name), role
    return name, "weight"


def axes_for(spec: ArchSpec, name: str) -> tuple[Axis, ...] | None:
    """Axes of any tensor name (plain, PEFT-wrapped, LoRA factor, DoRA magnitude); None if the spec lacks it."""
    base, role = resolve_name(name)
    axes = spec.match(base)
    if axes is None and role == "weight" and base.endswith(".bias"):
        return None
    if axes is None or role == "weight":
        return axes
    if role == "lora_A":          # [r, in]: inherits the wrapped module's input axis
        return tuple(a for a in axes if a.axis == 1)
    if role in ("lora_B", "lora_B_bias"):   # [out, r] / [out]: inherits the output axis
        return tuple(a for a in axes if a.axis == 0)
    if role == "lora_emb_A":      # [r, vocab]: the vocab axis never moves
        return ()
    if role == "lora_emb_B":      # [d, r]: the embedding's residual column axis becomes rows
        return tuple(Axis(0, a.space, a.signed, a.block, a.kv) for a in axes if a.axis == 1)
    if role == "magnitude":       # DoRA norms: permuted with what they normalise, never signed
        # nn.Linear [out, in]: one norm per output row (axis 0). nn.Embedding [vocab, d]: PEFT normalises
        # per residual column, so the [d] magnitude follows the embedding's axis 1.
        src = 1 if base == spec.sites.embed + ".weight" else 0
        return tuple(Axis(0, a.space, False, a.block, a.kv) for a in axes if a.axis == src)
    raise AssertionError(role)


# ----------------------------------------------------------------------------------------------------------------
# Resolved moves
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Move:
    """Gather ``axis`` by ``index`` (int64), then multiply by ``sign`` (int8, or None for +1 everywhere)."""

    axis: int
    index: torch.Tensor
    sign: torch.Tensor | None


class _Expander:
    """Turns (Axis, SignedPermutation) into index/sign vectors, with block and KV-group expansion (cached)."""

    def __init__(self, spec: ArchSpec, config, gauge: Gauge) -> None:
        self.spec, self.config, self.gauge = spec, config, gauge
        self.dims = spec.dims(config)
        self._cache: dict[tuple, Move | None] = {}

    def __call__(self, a: Axis) -> Move | None:
        key = (a.axis, a.space, a.signed, a.block, a.kv)
        if key in self._cache:
            return self._cache[key]
        el = self.gauge.spaces.get(a.space)
        mv = None
        if el is not None and not el.is_identity:
            perm, sign = el.perm, el.sign if (a.signed and not el.is_permutation) else None
            if a.kv:
                perm = kv_group_perm(el, self.config)
                sign = None
            if a.block:
                b = self.dims[a.block]
                perm = (perm[:, None] * b + torch.arange(b)).reshape(-1)
                sign = sign.repeat_interleave(b) if sign is not None else None
            mv = Move(a.axis, perm, sign)
        self._cache[key] = mv
        return mv


def kv_group_perm(el: SignedPermutation, config) -> torch.Tensor:
    """The KV-head permutation implied by a query-head permutation that moves whole KV groups."""
    n_heads = el.size
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    g = n_heads // n_kv
    groups = el.perm.view(n_kv, g) // g
    if not torch.all(groups == groups[:, :1]):
        raise GaugeError(
            f"the attention-head permutation mixes KV groups: query heads sharing a KV head ({g} per group) must "
            "move together to one group. Permute heads only within a group, and groups as wholes."
        )
    return groups[:, 0].contiguous()


def moves_for(spec: ArchSpec, config, gauge: Gauge, names: Iterable[str], *, strict: bool = True,
              expander: _Expander | None = None) -> dict[str, tuple[Move, ...]]:
    """Resolved moves of each name (empty tuple: untouched). Unknown names raise when ``strict``."""
    ex = expander or _Expander(spec, config, gauge)
    out: dict[str, tuple[Move, ...]] = {}
    for n in names:
        axes = axes_for(spec, n)
        if axes is None:
            if strict:
                raise GaugeError(
                    f"parameter {n!r} is not covered by the {spec.name!r} architecture spec; refusing to guess how "
                    "it moves. Add a Rule for it in hf_gauge/specs/."
                )
            out[n] = ()
            continue
        out[n] = tuple(m for m in (ex(a) for a in axes) if m is not None)
    return out


def classify(spec: ArchSpec, names: Iterable[str]) -> dict[str, tuple[Axis, ...] | None]:
    """Spec axes for each name (None: unclassified)."""
    return {n: axes_for(spec, n) for n in names}


# ----------------------------------------------------------------------------------------------------------------
# The kernel
# ----------------------------------------------------------------------------------------------------------------
_BLOCK_BYTES = 1 << 20   # rows are gathered and signed in cache-sized blocks: one pass over memory


def _on(t: torch.Tensor | None, like: torch.Tensor, dtype=None) -> torch.Tensor | None:
    if t is None:
        return None
    return t.to(device=like.device, dtype=dtype or t.dtype, non_blocking=True)


def move_tensor(src: torch.Tensor, moves: tuple[Move, ...], out: torch.Tensor | None = None) -> torch.Tensor:
    """Return ``src`` with every move applied (a new tensor, or ``out``); ``src`` is left unchanged.

    2-D tensors are processed in row blocks of about 1 MiB: gather the block's rows (``index_select``) or
    columns (``gather`` with a broadcast index), and apply signs while the block is still in cache, so the
    work is one read and one write of the tensor.
    """
    if not moves:
        return src.clone() if out is None else out.copy_(src)
    for m in moves:
        if m.axis >= src.dim() or src.shape[m.axis] != m.index.numel():
            raise GaugeError(
                f"width mismatch: tensor of shape {tuple(src.shape)} has {src.shape[m.axis] if m.axis < src.dim() else 'no'}"
                f" entries on axis {m.axis}, but the gauge space there has {m.index.numel()}"
            )
    signed_ok = src.is_floating_point() or src.is_complex() or src.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)
    if any(m.sign is not None for m in moves) and not signed_ok:
        raise GaugeError(f"cannot apply signs to a tensor of dtype {src.dtype}")
    if out is None:
        out = torch.empty_like(src, memory_format=torch.contiguous_format)
    if src.dim() == 2 and all(m.axis in (0, 1) for m in moves):
        rows = next((m for m in moves if m.axis == 0), None)
        cols = next((m for m in moves if m.axis == 1), None)
        n, w = src.shape
        step = max(1, _BLOCK_BYTES // max(1, w * src.element_size()))
        ridx = _on(rows.index, src) if rows else None
        rsgn = _on(rows.sign, src, src.dtype)[:, None] if rows and rows.sign is not None else None
        cidx = _on(cols.index, src).expand(min(step, n), w) if cols else None
        csgn = _on(cols.sign, src, src.dtype) if cols and cols.sign is not None else None
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            blk = out[r0:r1]
            if ridx is not None and cidx is not None:
                torch.gather(src.index_select(0, ridx[r0:r1]), 1, cidx[: r1 - r0], out=blk)
            elif ridx is not None:
                torch.index_select(src, 0, ridx[r0:r1], out=blk)
            else:
                torch.gather(src[r0:r1], 1, cidx[: r1 - r0], out=blk)
            if rsgn is not None:
                blk.mul_(rsgn[r0:r1])
            if csgn is not None:
                blk.mul_(csgn)
        return out
    # general N-d path (1-D gains and biases, rare higher-rank tensors); index_select always returns a new tensor
    y = src
    for m in moves:
        y = y.index_select(m.axis, _on(m.index, src))
        if m.sign is not None:
            shape = [1] * y.dim()
            shape[m.axis] = -1
            y.mul_(_on(m.sign, src, src.dtype).view(shape))
    return out.copy_(y)


# ----------------------------------------------------------------------------------------------------------------
# Checking a gauge against an architecture
# ----------------------------------------------------------------------------------------------------------------
def space_sizes(spec: ArchSpec, config) -> dict[str, int]:
    """Every concrete space of a model and its size."""
    n_layers = config.num_hidden_layers
    out: dict[str, int] = {}
    for tmpl, sp in spec.spaces.items():
        if sp.per_layer:
            for i in range(n_layers):
                out[tmpl.replace("{i}", str(i))] = sp.size(config)
        else:
            out[tmpl] = sp.size(config)
    return out


def check_gauge(spec: ArchSpec, config, gauge: Gauge) -> None:
    """Refuse (``GaugeError``) a gauge the model cannot absorb: unknown space, wrong width, inadmissible signs."""
    sizes = space_sizes(spec, config)
    for name, el in gauge.spaces.items():
        if name not in sizes:
            have = "residual, mlp.0..mlp.{n}, attn.0..attn.{n}".format(n=config.num_hidden_layers - 1)
            raise GaugeError(f"the gauge has a space {name!r} that this {config.model_type} model lacks (it has {have})")
        if el.size != sizes[name]:
            raise GaugeError(
                f"width mismatch in space {name!r}: the gauge acts on {el.size} coordinates but this "
                f"{config.model_type} model has {sizes[name]}; was the gauge fitted for another model?"
            )
        rule = spec.spaces[spec.space_template(name)[0]].signs
        if rule == "none" and not el.is_permutation:
            raise GaugeError(f"space {name!r} of {config.model_type} admits permutations only, but the gauge has "
                             f"{int((el.sign < 0).sum())} negative signs")
        if rule == "global" and not (bool(torch.all(el.sign == 1)) or bool(torch.all(el.sign == -1))):
            raise GaugeError(
                f"mixed signs on a LayerNorm model ({config.model_type}): LayerNorm's mean-centring admits only "
                f"permutations and one global sign flip (S_d x {{±1}}), but the gauge on {name!r} has "
                f"{int((el.sign < 0).sum())} of {el.size} negative signs. Use a permutation gauge, or flip all signs."
            )
        if name.startswith("attn."):
            kv_group_perm(el, config)
