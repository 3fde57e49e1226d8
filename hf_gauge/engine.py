"""The generic engine: read an ArchSpec, resolve each tensor's moves under a Gauge, and move tensors exactly.

Every move is an index operation (gather along an axis, then multiply by ±1), so it is bit-exact in every
float dtype and never builds a d×d matrix. One engine serves live models (in place), safetensors shards on
disk, PEFT adapters (a LoRA factor inherits the axis of the module it wraps) and optimizer state.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

import torch

from .errors import GaugeError
from .gauge import Gauge
from .group import SignedPermutation, as_bits, flip_, moves_as_bits, sign_operand
from .specs import ArchSpec
from .specs.base import Axis

__all__ = ["Move", "resolve_name", "axes_for", "moves_for", "move_tensor", "move_tensor_", "move_rows", "Scratch",
           "check_moves", "check_gauge", "classify"]

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
    memo = spec._axes_memo
    if name not in memo:
        memo[name] = _axes_for(spec, name)
    return memo[name]


def _axes_for(spec: ArchSpec, name: str) -> tuple[Axis, ...] | None:
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
    _memo: dict = field(default_factory=dict, compare=False, repr=False)

    def index_on(self, device: torch.device) -> torch.Tensor:
        """``index`` on ``device`` (cached: a move is applied to many tensors)."""
        key = ("index", str(device))
        if key not in self._memo:
            self._memo[key] = self.index.to(device)
        return self._memo[key]

    def signer(self, like: torch.Tensor, float_bits: bool) -> torch.Tensor | None:
        """What applies ``sign`` to ``like``, cached: an XOR mask of sign bits when ``like`` is a float tensor's
        integer view (``float_bits``, see ``as_bits``), otherwise ±1 to multiply by."""
        if self.sign is None:
            return None
        key = ("sign", like.dtype, str(like.device), float_bits)
        if key not in self._memo:
            self._memo[key] = sign_operand(self.sign, like, float_bits)
        return self._memo[key]


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
_BLOCK_BYTES = 4 << 20   # CPU: rows are gathered and signed in blocks that stay in cache (4 MiB measured best)


def check_moves(src: torch.Tensor, moves: tuple[Move, ...]) -> None:
    """Refuse (``GaugeError``) moves that do not fit ``src``: wrong width on an axis, signs on an unsigned dtype."""
    for m in moves:
        if m.axis >= src.dim() or src.shape[m.axis] != m.index.numel():
            raise GaugeError(
                f"width mismatch: tensor of shape {tuple(src.shape)} has {src.shape[m.axis] if m.axis < src.dim() else 'no'}"
                f" entries on axis {m.axis}, but the gauge space there has {m.index.numel()}"
            )
    signed_ok = src.is_floating_point() or src.is_complex() or src.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)
    if any(m.sign is not None for m in moves) and not signed_ok:
        raise GaugeError(f"cannot apply signs to a tensor of dtype {src.dtype}")


class _RowKernel:
    """Rows ``r0:r1`` of a moved 2-D tensor: gather rows (``index_select``) and/or columns (``gather`` with a
    broadcast index), then flip signs while the block is still in cache. Floats move as integer bits."""

    def __init__(self, src: torch.Tensor, moves: tuple[Move, ...], scratch: Scratch | None = None) -> None:
        self.float_bits = moves_as_bits(src)
        self.src = as_bits(src)
        n, w = src.shape
        rows = next((m for m in moves if m.axis == 0), None)
        cols = next((m for m in moves if m.axis == 1), None)
        # CUDA, and tensors up to two blocks: one call per tensor; CPU: blocks stay in cache between the gather and
        # the sign flip (fewer, larger calls also spend less on thread fork/join)
        row_bytes = max(1, w * src.element_size())
        self.step = n if src.device.type != "cpu" or n * row_bytes <= 2 * _BLOCK_BYTES else max(1, _BLOCK_BYTES // row_bytes)
        dev = src.device
        self.ridx = rows.index_on(dev) if rows else None
        self.rsgn = rows.signer(self.src, self.float_bits) if rows else None
        self.rsgn = self.rsgn[:, None] if self.rsgn is not None else None
        self.cidx = cols.index_on(dev).expand(min(self.step, n), w) if cols else None
        self.csgn = cols.signer(self.src, self.float_bits) if cols else None
        # rows and columns: the block's rows are gathered into a reused buffer first (no allocation per block)
        self.tmp = (None if rows is None or cols is None else
                    (scratch or Scratch()).like(self.src, (min(self.step, n), w), key="rows"))

    def block(self, r0: int, r1: int, out: torch.Tensor, signs: bool = True) -> None:
        """``out`` (``[r1 - r0, w]``, the source's dtype) := rows ``r0:r1`` of the moved tensor; ``r1 - r0 <= step``.
        With ``signs=False`` only the gathers are done (``finish`` applies the signs while copying)."""
        src, blk = self.src, as_bits(out)
        if self.ridx is not None and self.cidx is not None:
            part = torch.index_select(src, 0, self.ridx[r0:r1], out=self.tmp[: r1 - r0])
            torch.gather(part, 1, self.cidx[: r1 - r0], out=blk)
        elif self.ridx is not None:
            torch.index_select(src, 0, self.ridx[r0:r1], out=blk)
        else:
            torch.gather(src[r0:r1], 1, self.cidx[: r1 - r0], out=blk)
        if signs:
            if self.rsgn is not None:
                flip_(blk, self.rsgn[r0:r1], self.float_bits)
            if self.csgn is not None:
                flip_(blk, self.csgn, self.float_bits)

    def finish(self, r0: int, gathered: torch.Tensor, dst: torch.Tensor) -> None:
        """``dst`` := ``gathered`` (rows ``r0:`` gathered by ``block(signs=False)``) with the signs applied: the copy
        and the sign flip in one pass."""
        src, d = as_bits(gathered), as_bits(dst)
        r1 = r0 + src.shape[0]
        first = self.rsgn[r0:r1] if self.rsgn is not None else self.csgn
        if first is None:
            d.copy_(src)
            return
        (torch.bitwise_xor if self.float_bits else torch.mul)(src, first, out=d)
        if self.rsgn is not None and self.csgn is not None:
            flip_(d, self.csgn, self.float_bits)

    def rows(self, r0: int, r1: int, out: torch.Tensor, signs: bool = True) -> torch.Tensor:
        for b0 in range(r0, r1, self.step):
            b1 = min(r1, b0 + self.step)
            self.block(b0, b1, out[b0 - r0:b1 - r0], signs)
        return out


def _is_rows_cols(src: torch.Tensor, moves: tuple[Move, ...]) -> bool:
    return src.dim() == 2 and all(m.axis in (0, 1) for m in moves)


def move_rows(src: torch.Tensor, moves: tuple[Move, ...], r0: int, r1: int, out: torch.Tensor,
              scratch: Scratch | None = None) -> torch.Tensor:
    """Rows ``r0:r1`` of ``move_tensor(src, moves)`` into ``out`` (a 2-D ``src`` whose moves act on axes 0/1)."""
    check_moves(src, moves)
    return _RowKernel(src, moves, scratch).rows(r0, r1, out)


def move_tensor(src: torch.Tensor, moves: tuple[Move, ...], out: torch.Tensor | None = None,
                scratch: Scratch | None = None) -> torch.Tensor:
    """Return ``src`` with every move applied (a new tensor, or ``out``); ``src`` is left unchanged.

    2-D tensors are processed in cache-sized row blocks (see ``_RowKernel``): one read and one write of the
    tensor. Every move is a gather plus, where signs apply, a sign-bit flip: bit-exact in every dtype.
    """
    if out is None:
        out = torch.empty_like(src, memory_format=torch.contiguous_format)
    if not moves:
        return out.copy_(src)
    check_moves(src, moves)
    if _is_rows_cols(src, moves):
        return _RowKernel(src, moves, scratch).rows(0, src.shape[0], out)
    # general N-d path (1-D gains and biases, rare higher-rank tensors); index_select always returns a new tensor
    float_bits = moves_as_bits(src)
    y = as_bits(src)
    for m in moves:
        y = y.index_select(m.axis, m.index_on(src.device))
        s = m.signer(y, float_bits)
        if s is not None:
            shape = [1] * y.dim()
            shape[m.axis] = -1
            flip_(y, s.view(shape), float_bits)
    as_bits(out).copy_(y)
    return out


class Scratch:
    """Reusable byte buffers keyed by (device, name), grown on demand. Fresh memory is page-faulted on first
    touch, which costs about as much as a copy, so buffers kept for a whole model or checkpoint are faulted once."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, object], torch.Tensor] = {}

    def bytes(self, n: int, key: object = 0, device: torch.device | str = "cpu") -> torch.Tensor:
        """A uint8 buffer of ``n`` bytes (its contents are whatever was left there)."""
        k = (str(device), key)
        b = self._bufs.get(k)
        if b is None or b.numel() < n:
            self._bufs.pop(k, None)                     # free before growing
            b = self._bufs[k] = torch.empty(max(n, 1), dtype=torch.uint8, device=device)
        return b[:n]

    def like(self, t: torch.Tensor, shape: tuple[int, ...] | None = None, key: object = 0) -> torch.Tensor:
        """A buffer of ``t``'s dtype and device, of ``shape`` (default ``t.shape``)."""
        shape = tuple(t.shape if shape is None else shape)
        n = int(torch.Size(shape).numel())
        return self.bytes(n * t.element_size(), key, t.device).view(t.dtype).view(shape)


def move_tensor_(t: torch.Tensor, moves: tuple[Move, ...], scratch: Scratch | None = None) -> torch.Tensor:
    """Apply ``moves`` to ``t`` in place (its storage is kept) and return it.

    Column-only moves (readers, embeddings) never read across rows, so each cache-sized row block is gathered into
    a small scratch block and copied straight back, signs applied during that copy: one read and one write of the
    tensor, no allocation. A move of rows reads anywhere in the tensor, so it is gathered into a tensor-sized scratch
    buffer, then copied back with its signs.
    """
    if not moves:
        return t
    check_moves(t, moves)
    scratch = scratch if scratch is not None else Scratch()
    if not _is_rows_cols(t, moves):
        as_bits(t).copy_(as_bits(move_tensor(t, moves, out=scratch.like(t, key="whole"))))
        return t
    k, n = _RowKernel(t, moves, scratch), t.shape[0]
    if all(m.axis == 1 for m in moves):
        buf = scratch.like(t, (min(k.step, n), t.shape[1]), key="block")
        for r0 in range(0, n, k.step):
            r1 = min(n, r0 + k.step)
            k.block(r0, r1, buf[: r1 - r0], signs=False)
            k.finish(r0, buf[: r1 - r0], t[r0:r1])
        return t
    k.finish(0, k.rows(0, n, scratch.like(t, key="whole"), signs=False), t)
    return t


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
