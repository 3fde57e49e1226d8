"""Signed permutations: the group B_d that acts on an RMSNorm residual stream.

Convention (docs/gauge-math.md): ``SignedPermutation(perm, sign)`` acts on a vector as
``y[j] = sign[j] * x[perm[j]]`` (matrix ``Q[j, perm[j]] = sign[j]``). Composition ``(b @ a)(x) = b(a(x))``
gives ``perm = a.perm[b.perm]`` and ``sign = b.sign * a.sign[b.perm]``.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .errors import GaugeError

__all__ = ["SignedPermutation", "as_bits", "moves_as_bits", "sign_operand", "flip_"]


def _as_long(x: Any, what: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.dim() != 1:
        raise GaugeError(f"{what} must be one-dimensional, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        if t.is_floating_point() and bool(torch.all(t == t.round())):
            t = t.round()
        else:
            raise GaugeError(f"{what} must hold integers, got dtype {t.dtype}")
    return t.detach().to(device="cpu", dtype=torch.int64).contiguous()


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def moves_as_bits(t: torch.Tensor) -> bool:
    """True for float tensors, which gauge moves handle as integer bits (see ``as_bits``)."""
    return t.is_floating_point() and t.element_size() in _BITS


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """A float tensor's memory as integers of the same width (other tensors as they are).

    Gauge moves act on floats through this view: gathers copy bits, and a sign flip is an XOR of the sign bit,
    which is exactly IEEE negation for every value (zeros, infinities and NaNs included). Integer gathers and XORs
    also run at memory speed in every dtype, where bf16/fp16 arithmetic does not.
    """
    return t.view(_BITS[t.element_size()]) if moves_as_bits(t) else t


def sign_operand(sign: torch.Tensor, like: torch.Tensor, float_bits: bool) -> torch.Tensor:
    """What applies ``sign`` (±1) to ``like``: an XOR mask of sign bits when ``like`` is a float tensor's integer
    view (``float_bits``), otherwise ±1 in ``like``'s dtype to multiply by."""
    s = sign.to(like.device)
    if float_bits:
        return torch.where(s < 0, torch.iinfo(like.dtype).min, 0).to(like.dtype)
    return s.to(like.dtype)


def flip_(t: torch.Tensor, operand: torch.Tensor, float_bits: bool) -> torch.Tensor:
    """Apply a ``sign_operand`` to ``t`` in place."""
    return t.bitwise_xor_(operand) if float_bits else t.mul_(operand)


class SignedPermutation:
    """An element of B_d: ``y[j] = sign[j] * x[perm[j]]`` along one axis.

    ``perm`` is an int64 permutation of ``range(d)``; ``sign`` holds exactly +1/-1 (stored as int8).
    Instances are immutable; every method returns a new object.
    """

    __slots__ = ("_perm", "_sign", "_cache")

    def __init__(self, perm: Sequence[int] | torch.Tensor | np.ndarray,
                 sign: Sequence[int] | torch.Tensor | np.ndarray | None = None) -> None:
        p = _as_long(perm, "perm")
        d = p.numel()
        if d == 0:
            raise GaugeError("a signed permutation needs at least one coordinate (perm is empty)")
        out = torch.nonzero((p < 0) | (p >= d)).flatten()
        if out.numel():
            k = int(out[0])
            raise GaugeError(f"perm is not a permutation of range({d}): perm[{k}] = {int(p[k])} is out of range "
                             f"[0, {d}) ({out.numel()} entries are outside)")
        counts = torch.bincount(p, minlength=d)
        if counts.max().item() != 1:
            dup = torch.nonzero(counts > 1).flatten()[:5].tolist()
            raise GaugeError(f"perm is not a permutation of range({d}): values must be distinct; duplicated indices "
                             f"include {dup}")
        if sign is None:
            s = torch.ones(d, dtype=torch.int64)
        else:
            s = _as_long(sign, "sign")
        if s.numel() != d:
            raise GaugeError(f"sign has {s.numel()} entries but perm has {d}; they must have the same length")
        bad = torch.nonzero((s != 1) & (s != -1)).flatten()
        if bad.numel():
            raise GaugeError(f"sign entries must be exactly +1 or -1; sign[{int(bad[0])}] = {int(s[bad[0]])}")
        self._perm = p
        self._sign = s.to(torch.int8)
        self._cache: dict = {}

    # ----------------------------------------------------------------- basic data
    @property
    def perm(self) -> torch.Tensor:
        """int64 tensor: output coordinate j reads input coordinate ``perm[j]``."""
        return self._perm

    @property
    def sign(self) -> torch.Tensor:
        """int8 tensor of +1/-1: output coordinate j is multiplied by ``sign[j]``."""
        return self._sign

    @property
    def size(self) -> int:
        return self._perm.numel()

    def __len__(self) -> int:
        return self.size

    @property
    def is_permutation(self) -> bool:
        """True when every sign is +1 (an element of S_d)."""
        return bool(torch.all(self._sign == 1))

    @property
    def is_identity(self) -> bool:
        return self.is_permutation and bool(torch.equal(self._perm, torch.arange(self.size)))

    @property
    def positive_fraction(self) -> float:
        return float((self._sign == 1).double().mean())

    # ----------------------------------------------------------------- constructors
    @classmethod
    def identity(cls, d: int) -> "SignedPermutation":
        return cls(torch.arange(d))

    @classmethod
    def random(cls, d: int, generator: torch.Generator | int | None = None, signed: bool = True,
               positive_fraction: float | None = None) -> "SignedPermutation":
        """A uniformly random element of B_d (or S_d with ``signed=False``).

        ``positive_fraction`` fixes the fraction of +1 signs exactly (rounded), placed at random.
        """
        if isinstance(generator, int):
            generator = torch.Generator().manual_seed(generator)
        perm = torch.randperm(d, generator=generator)
        if not signed:
            return cls(perm)
        if positive_fraction is None:
            sign = torch.randint(0, 2, (d,), generator=generator) * 2 - 1
        else:
            if not 0.0 <= positive_fraction <= 1.0:
                raise GaugeError(f"positive_fraction must lie in [0, 1], got {positive_fraction}")
            n_pos = int(round(positive_fraction * d))
            sign = -torch.ones(d, dtype=torch.int64)
            sign[torch.randperm(d, generator=generator)[:n_pos]] = 1
        return cls(perm, sign)

    # ----------------------------------------------------------------- group law
    def inverse(self) -> "SignedPermutation":
        inv_perm = torch.empty_like(self._perm)
        inv_perm[self._perm] = torch.arange(self.size)
        inv_sign = torch.empty_like(self._sign)
        inv_sign[self._perm] = self._sign
        return SignedPermutation(inv_perm, inv_sign)

    def __matmul__(self, other: "SignedPermutation") -> "SignedPermutation":
        """``(self @ other)(x) == self(other(x))``."""
        if not isinstance(other, SignedPermutation):
            return NotImplemented
        if other.size != self.size:
            raise GaugeError(f"cannot compose signed permutations of sizes {self.size} and {other.size}")
        return SignedPermutation(other._perm[self._perm], self._sign * other._sign[self._perm])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SignedPermutation):
            return NotImplemented
        return torch.equal(self._perm, other._perm) and torch.equal(self._sign, other._sign)

    __hash__ = None  # mutable-free but tensor-valued: compare with ==, do not hash

    def __repr__(self) -> str:
        head = ", ".join(f"{'-' if s < 0 else '+'}{p}" for p, s in zip(self._perm[:6].tolist(), self._sign[:6].tolist()))
        more = ", ..." if self.size > 6 else ""
        return f"SignedPermutation(d={self.size}, [{head}{more}], positive_fraction={self.positive_fraction:.3f})"

    # ----------------------------------------------------------------- action
    def index(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``perm`` on ``device`` (cached)."""
        key = ("perm", str(device))
        if key not in self._cache:
            self._cache[key] = self._perm.to(device) if device is not None else self._perm
        return self._cache[key]

    def signs(self, like: torch.Tensor, float_bits: bool) -> torch.Tensor | None:
        """The ``sign_operand`` for ``like`` (cached), or None when all signs are +1."""
        if self.is_permutation:
            return None
        key = ("sign", like.dtype, str(like.device), float_bits)
        if key not in self._cache:
            self._cache[key] = sign_operand(self._sign, like, float_bits)
        return self._cache[key]

    def apply(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Return ``y`` with ``y[..., j, ...] = sign[j] * x[..., perm[j], ...]`` along ``dim``; ``x`` is not modified."""
        if not isinstance(x, torch.Tensor):
            raise GaugeError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[dim] != self.size:
            raise GaugeError(
                f"width mismatch: the gauge acts on {self.size} coordinates but the tensor has shape "
                f"{tuple(x.shape)} (dim {dim}); transport objects whose axis {dim} is the model's width"
            )
        float_bits = moves_as_bits(x)
        y = as_bits(x).index_select(dim, self.index(x.device))
        s = self.signs(y, float_bits)
        if s is not None:
            shape = [1] * x.dim()
            shape[dim] = self.size
            flip_(y, s.view(shape), float_bits)
        return y.view(x.dtype)

    __call__ = apply

    def map_indices(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Where input coordinates land: coordinate ``i`` of the source chart is ``inverse().perm[i]`` in the target."""
        idx = _as_long(indices, "indices")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.size):
            raise GaugeError(f"indices must lie in [0, {self.size}); got min {int(idx.min())}, max {int(idx.max())}")
        return self.inverse()._perm[idx]

    def to_dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The d×d matrix Q (for inspection and tests only; the library never builds it)."""
        q = torch.zeros(self.size, self.size, dtype=dtype)
        q[torch.arange(self.size), self._perm] = self._sign.to(dtype)
        return q
