"""The activation pipeline: token batches in, hooked forward passes, float64 moment sums out.

Every activation statistic of hf_gauge runs through here: pair statistics of the residual stream (``stats``),
inner-space matching (``inner``), the audit's claims (``audit``) and ``verify``. Batches are ``(input_ids,
attention_mask)``; position ids follow the padding mask (left padding is exact); padding tokens never enter a sum;
a forward pass stops early once the last hooked site has fired (``Stop``); sums are added up over ``accelerate``
processes (``reduce_sums``).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from .errors import GaugeError

MIN_SITE_TOKENS = 3      # fewer tokens at a site: its correlations carry no information (2 points correlate ±1)

__all__ = ["MIN_SITE_TOKENS", "iter_batches", "token_batches", "Stop", "capture_inputs", "forward", "logits", "input_device", "default_stats_device",
           "PairStats", "reduce_sums"]


def reduce_sums(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Running sums added up over the ``accelerate`` processes (``accelerate.utils.reduce``); unchanged in a single
    process. Every process must call this with the same keys and shapes."""
    from accelerate import PartialState
    from accelerate.utils import reduce

    state = PartialState()
    if state.num_processes <= 1:
        return sums
    dev = state.device if state.device.type != "cpu" else torch.device("cpu")
    return reduce({k: v.to(dev) for k, v in sums.items()}, reduction="sum")


# ----------------------------------------------------------------------------------------------------------------
# Data: tensors, strings, DataLoader batches -> (input_ids, attention_mask)
# ----------------------------------------------------------------------------------------------------------------
def _check_ids(ids: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        ids = torch.as_tensor(np.asarray(ids))
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise GaugeError(f"{what} must be integer token ids (a LongTensor), got dtype {ids.dtype}")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise GaugeError(f"{what} must be token ids of shape [n, T] or [T], got {tuple(ids.shape)}")
    return ids.long()


def _pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max((len(s) for s in seqs), default=0)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[r, : len(s)] = 1
    return ids, mask


def iter_batches(data: Any, *, tokenizer: Any = None, batch_size: int = 8, max_length: int | None = None,
                 shard: bool | None = None,
                 vocab_size: int | None = None) -> tuple[Iterator[tuple[torch.Tensor, torch.Tensor]], int | None]:
    """Normalize ``data`` into ``(input_ids [b, T], attention_mask [b, T])`` batches; returns (iterator, n_batches).

    Accepts a LongTensor ``[n, T]`` / ``[T]``, a list of strings (with ``tokenizer``; right-padded), or an iterable of
    batches (mappings with ``input_ids`` and optional ``attention_mask``, as a DataLoader yields, or id tensors).
    Under several ``accelerate`` processes, tensors and string lists are split by rows between processes
    (``shard=None`` or True); an iterable is taken to be this process's shard already (as
    ``accelerator.prepare(dataloader)`` yields) unless ``shard=True``.
    With ``vocab_size``, ids outside ``[0, vocab_size)`` raise ``GaugeError`` (as each batch is produced).
    """
    it, n_b = _normalised(data, tokenizer, batch_size, max_length, shard)
    return (it if vocab_size is None else _in_vocab(it, vocab_size)), n_b


def _in_vocab(it: Iterator[tuple[torch.Tensor, torch.Tensor]],
              vocab: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for k, (ids, mask) in enumerate(it):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise GaugeError(f"batch {k}: token ids must lie in [0, {vocab}) for these models, got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        yield ids, mask


def _normalised(data: Any, tokenizer: Any, batch_size: int, max_length: int | None,
                shard: bool | None) -> tuple[Iterator[tuple[torch.Tensor, torch.Tensor]], int | None]:
    """``iter_batches`` without the vocabulary check."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise GaugeError(f"batch_size must be a positive integer, got {batch_size!r}")
    from accelerate import PartialState
    state = PartialState()
    rank, world = state.process_index, state.num_processes

    if isinstance(data, (str, bytes)):
        raise GaugeError("data is a single string: pass a list of strings (with tokenizer=...), a LongTensor of "
                         "input ids [n, T], or an iterable of batches")
    if isinstance(data, (torch.Tensor, np.ndarray)):
        ids = _check_ids(data, "data")
        if ids.numel() == 0:
            raise GaugeError(f"data is empty (shape {tuple(ids.shape)}): pass at least one token")
        if world > 1 and shard is not False:
            ids = ids[rank::world]
        n_b = math.ceil(ids.shape[0] / batch_size)
        it = ((ids[i:i + batch_size], torch.ones_like(ids[i:i + batch_size])) for i in range(0, ids.shape[0], batch_size))
        return it, n_b
    if isinstance(data, Sequence) and len(data) > 0 and all(isinstance(x, str) for x in data):
        if tokenizer is None:
            raise GaugeError("data is a list of strings but no tokenizer was given: pass tokenizer=AutoTokenizer."
                             "from_pretrained(...) (the same tokenizer both models use)")
        texts = list(data)
        if world > 1 and shard is not False:
            texts = texts[rank::world]
        kw = dict(truncation=True, max_length=max_length) if max_length else {}

        def gen():
            for i in range(0, len(texts), batch_size):
                enc = tokenizer(texts[i:i + batch_size], **kw)
                seqs = [list(s) for s in enc["input_ids"]]
                yield _pad(seqs)
        return gen(), math.ceil(len(texts) / batch_size)
    if isinstance(data, Sequence) and len(data) == 0:
        raise GaugeError("data is empty: pass token ids, strings or batches")
    if isinstance(data, Mapping):
        data = [data]
    if not isinstance(data, Iterable):
        raise GaugeError(f"unsupported data of type {type(data).__name__}: pass a LongTensor of input ids [n, T], a "
                         "list of strings with tokenizer=..., or an iterable of batch dicts (input_ids, attention_mask)")
    try:
        n_b = len(data)  # type: ignore[arg-type]
    except TypeError:
        n_b = None

    def gen_batches():
        for k, b in enumerate(data):
            if world > 1 and shard is True and k % world != rank:
                continue
            if isinstance(b, Mapping):
                if "input_ids" not in b:
                    raise GaugeError(f"batch {k} has no 'input_ids' (keys: {sorted(b)}); pass batch dicts with "
                                     "input_ids and optionally attention_mask")
                ids = _check_ids(b["input_ids"], f"batch {k} input_ids")
                mask = b.get("attention_mask")
                mask = torch.ones_like(ids) if mask is None else _check_ids(mask, f"batch {k} attention_mask")
                if mask.shape != ids.shape:
                    raise GaugeError(f"batch {k}: attention_mask shape {tuple(mask.shape)} differs from input_ids "
                                     f"{tuple(ids.shape)}")
            elif isinstance(b, (torch.Tensor, np.ndarray)):
                ids = _check_ids(b, f"batch {k}")
                mask = torch.ones_like(ids)
            elif isinstance(b, str):
                raise GaugeError("data yields strings: pass a list of strings with tokenizer=..., or tokenize first")
            else:
                raise GaugeError(f"batch {k} is a {type(b).__name__}: each batch must be a dict with input_ids "
                                 "(and attention_mask) or a LongTensor of ids")
            yield ids, mask
    return gen_batches(), n_b


def token_batches(data: Any, *, tokenizer: Any = None, batch_size: int = 8) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(input_ids, attention_mask)`` batches of ``data`` (see ``iter_batches``)."""
    it, _ = iter_batches(data, tokenizer=tokenizer, batch_size=batch_size)
    yield from it


class Stop(Exception):
    """Raised by a hook to end a forward pass early (every needed site has fired)."""


def capture_inputs(m: torch.nn.Module, sites: dict[str, str], ids: torch.Tensor, mask: torch.Tensor | None,
                 stop_early: bool = False) -> dict[str, torch.Tensor]:
    """Inputs of the named modules (``{key: module path}``) for the non-padding tokens, as ``[n_tokens, width]``.
    ``stop_early``: end the forward pass once every site has fired (the order modules are registered in is not the
    order a block calls them: granitemoehybrid registers its MLPs before its mixer)."""
    got: dict[str, torch.Tensor] = {}
    keep = None if mask is None else mask.reshape(-1).bool()
    handles = []

    def hook_for(key: str):
        def hook(_mod, args, kwargs=None):
            x = args[0] if args else next(iter(kwargs.values()))
            x = x.detach().reshape(-1, x.shape[-1])
            got[key] = (x if keep is None else x[keep.to(x.device)]).to("cpu")
            if stop_early and len(got) == len(sites):
                raise Stop
        return hook

    try:
        for key, path in sites.items():
            handles.append(m.get_submodule(path).register_forward_pre_hook(hook_for(key)))
        forward(m, ids, mask)
    finally:
        for h in handles:
            h.remove()
    return got


def input_device(m: torch.nn.Module) -> torch.device:
    w = m.get_input_embeddings().weight
    return w.device if w.device.type != "meta" else torch.device("cpu")


def default_stats_device(m: torch.nn.Module) -> torch.device:
    dev = input_device(m)
    return dev if dev.type == "cuda" else torch.device("cpu")


@torch.no_grad()
def forward(m: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Run the base model only (the lm_head is not needed); position ids follow the mask (left padding is exact).
    A hook raising ``Stop`` ends the pass early."""
    dev = input_device(m)
    kw: dict[str, Any] = {"input_ids": ids.to(dev), "use_cache": False}
    if mask is not None:
        kw["attention_mask"] = mask.to(dev)
        kw["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0).to(dev)
    base = getattr(m, "base_model", m)
    try:
        base(**kw)
    except Stop:
        pass


@torch.no_grad()
def logits(m: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None,
           params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Float32 logits of the whole model (position ids from the mask as in ``forward``); with ``params``, of the
    model with those tensors in place of its own (``torch.func.functional_call``: the model is not modified)."""
    dev = input_device(m)
    kw: dict[str, Any] = {"input_ids": ids.to(dev), "use_cache": False}
    if mask is not None:
        kw["attention_mask"] = mask.to(dev)
        kw["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0).to(dev)
    if params:
        return torch.func.functional_call(m, params, args=(), kwargs=kw, strict=False).logits.float()
    return m(**kw).logits.float()


# ----------------------------------------------------------------------------------------------------------------
# The accumulator
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class PairStats:
    """Per-site float64 running sums for paired activations ``x_A``, ``x_B`` (rows: tokens): the one moment
    accumulator of hf_gauge.

    With ``blocks=h`` the ``d`` coordinates form ``h`` blocks of ``k = d / h`` (attention heads) and ``cross[s]`` is
    ``[h, h, k]``: the sums of ``x_A[block a, dim t] * x_B[block b, dim t]``; ``site_correlation`` then averages the
    per-dimension correlations within each block pair (``[h, h]``)."""

    sites: list[str]
    d: int
    blocks: int | None = None                       # heads: cross sums per dimension within blocks (see below)
    count: torch.Tensor = field(default=None)      # [S] tokens per site (float64 so it reduces like the rest)
    sum_a: torch.Tensor = field(default=None)      # [S, d]
    sum_b: torch.Tensor = field(default=None)      # [S, d]
    sumsq_a: torch.Tensor = field(default=None)    # [S, d]
    sumsq_b: torch.Tensor = field(default=None)    # [S, d]
    cross: torch.Tensor = field(default=None)      # [S, d, d]: sum over tokens of x_A[:, i] * x_B[:, j]
    device: torch.device | str = "cpu"

    def __post_init__(self) -> None:
        S, d, kw = len(self.sites), self.d, dict(dtype=torch.float64, device=self.device)
        if self.blocks is not None and (self.blocks < 1 or d % self.blocks):
            raise GaugeError(f"{d} coordinates do not split into {self.blocks} blocks")
        cross = (S, d, d) if self.blocks is None else (S, self.blocks, self.blocks, d // self.blocks)
        for name, shape in (("count", (S,)), ("sum_a", (S, d)), ("sum_b", (S, d)), ("sumsq_a", (S, d)),
                            ("sumsq_b", (S, d)), ("cross", cross)):
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros(shape, **kw))

    # ------------------------------------------------------------------ streaming
    def update_a(self, s: int, xa: torch.Tensor) -> None:
        """Add one batch of A's activations ``[n, d]`` (float64) at site ``s``."""
        self.sum_a[s] += xa.sum(0)
        self.sumsq_a[s] += (xa * xa).sum(0)

    def update_b(self, s: int, xa: torch.Tensor, xb: torch.Tensor) -> None:
        """Add B's activations ``[n, d]`` paired row by row with A's ``xa`` at site ``s``."""
        if xa.shape != xb.shape:
            raise GaugeError(f"site {self.sites[s]!r}: A gave {tuple(xa.shape)} activations but B gave "
                             f"{tuple(xb.shape)}; both models must see the same tokens")
        self.count[s] += xb.shape[0]
        self.sum_b[s] += xb.sum(0)
        self.sumsq_b[s] += (xb * xb).sum(0)
        if self.blocks is None:
            self.cross[s].addmm_(xa.T, xb)
        else:
            h = self.blocks
            self.cross[s] += torch.einsum("nak,nbk->abk", xa.view(xa.shape[0], h, -1), xb.view(xb.shape[0], h, -1))

    def update(self, s: int, xa: torch.Tensor, xb: torch.Tensor) -> None:
        """Add paired activations ``[n, d]`` at site ``s`` (used for synthetic data and tests)."""
        xa = xa.detach().to(self.count.device, torch.float64)
        xb = xb.detach().to(self.count.device, torch.float64)
        self.update_a(s, xa)
        self.update_b(s, xa, xb)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ("count", "sum_a", "sum_b", "sumsq_a", "sumsq_b", "cross")}

    def reduce(self) -> "PairStats":
        """Sum the raw moments over ``accelerate`` processes (a no-op in a single process); returns self."""
        for k, v in reduce_sums(self._tensors()).items():
            setattr(self, k, v.to(self.count.device))
        return self

    def to(self, device: torch.device | str) -> "PairStats":
        for k, v in self._tensors().items():
            setattr(self, k, v.to(device))
        self.device = device
        return self

    def merge(self, other: "PairStats") -> "PairStats":
        """Add another accumulator's sums (same sites and width) into this one; returns self."""
        if other.sites != self.sites or other.d != self.d or other.blocks != self.blocks:
            raise GaugeError("cannot merge statistics of different sites or widths")
        for k, v in other._tensors().items():
            getattr(self, k).add_(v.to(self.count.device))
        return self

    # ------------------------------------------------------------------ derived quantities
    @property
    def n_tokens(self) -> int:
        """Tokens seen (per site; every site sees every non-padding token)."""
        return int(self.count.max().item()) if self.count.numel() else 0

    def _site_moments(self, s: int):
        """Per-coordinate means and variances of A and B at site ``s`` and its centred cross-covariance (new tensor;
        ``[h, h, k]`` with blocks)."""
        n = float(self.count[s].clamp_min(1.0))
        mu_a, mu_b = self.sum_a[s] / n, self.sum_b[s] / n
        var_a = (self.sumsq_a[s] / n - mu_a**2).clamp_min(0.0)
        var_b = (self.sumsq_b[s] / n - mu_b**2).clamp_min(0.0)
        if self.blocks is not None:
            h = self.blocks
            cov = self.cross[s] / n - mu_a.view(h, 1, -1) * mu_b.view(1, h, -1)
            return var_a, var_b, cov
        cov = torch.addr(self.cross[s], mu_a, mu_b, beta=1.0 / n, alpha=-1.0)   # cross/n - mu_a mu_b^T
        return var_a, var_b, cov

    @staticmethod
    def _inv_sd(var: torch.Tensor) -> torch.Tensor:
        # a coordinate whose variance is at rounding level (relative to the site's mean) carries no signal: weight 0
        sd = var.sqrt()
        tiny = sd <= 1e-12 * sd.mean().clamp_min(1e-300)
        return torch.where(tiny, torch.zeros_like(sd), 1.0 / sd.clamp_min(1e-300))

    def site_correlation(self, s: int) -> torch.Tensor:
        """``C_s[i, j] = corr_s(A_i, B_j)`` ``[d, d]``; 0 where a coordinate is constant at site ``s``, and 0 everywhere
        when the site saw fewer than 3 tokens (the correlation of two points is ±1 whatever the data)."""
        if float(self.count[s]) < MIN_SITE_TOKENS:
            n = self.d if self.blocks is None else self.blocks
            return torch.zeros(n, n, dtype=torch.float64, device=self.count.device)
        var_a, var_b, cov = self._site_moments(s)
        if self.blocks is not None:                 # per-dimension correlations, averaged within block pairs
            h = self.blocks
            ia, ib = self._inv_sd(var_a).view(h, 1, -1), self._inv_sd(var_b).view(1, h, -1)
            return (cov * ia * ib).clamp_(-1.0, 1.0).mean(-1)
        return cov.mul_(self._inv_sd(var_a)[:, None]).mul_(self._inv_sd(var_b)[None, :]).clamp_(-1.0, 1.0)

    def site_correlations(self) -> torch.Tensor:
        """``[S, d, d]``: every site's correlation matrix."""
        return torch.stack([self.site_correlation(s) for s in range(len(self.sites))])

    def _check_nonempty(self) -> torch.Tensor:
        if self.n_tokens == 0:
            raise GaugeError("no tokens were seen: the data is empty (or every position is padding)")
        return self.count / self.count.sum()

    def correlation(self) -> torch.Tensor:
        """Pooled ``C [d, d]`` (float64): the token-weighted mean of the per-site correlations (z-scored pooling)."""
        w = self._check_nonempty()
        out = torch.zeros(self.d, self.d, dtype=torch.float64, device=self.count.device)
        for s in range(len(self.sites)):
            if float(w[s]) > 0:
                out.add_(self.site_correlation(s), alpha=float(w[s]))
        return out

    def cross_covariance(self) -> torch.Tensor:
        """Centred cross-covariance for Procrustes: ``M = sum_s w_s Cov_s(A, B) / sqrt(tr Cov_s(A) tr Cov_s(B))``.

        One scalar per site keeps ``M`` rotation-equivariant (if ``x_B = x_A R`` then ``M = P R`` with ``P`` positive
        semi-definite) while giving every site the same weight, whatever its scale.
        """
        w = self._check_nonempty()
        out = torch.zeros(self.d, self.d, dtype=torch.float64, device=self.count.device)
        for s in range(len(self.sites)):
            var_a, var_b, cov = self._site_moments(s)
            scale = float((var_a.sum() * var_b.sum()).sqrt())
            if float(w[s]) > 0 and scale > 0:
                out.add_(cov, alpha=float(w[s]) / scale)
        return out

    def summary(self) -> dict[str, Any]:
        return {"n_tokens": self.n_tokens, "n_sites": len(self.sites), "d": self.d}
