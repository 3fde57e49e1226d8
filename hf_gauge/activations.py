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
from typing import Any, Iterator

import numpy as np
import torch

from .errors import GaugeError

__all__ = ["iter_batches", "token_batches", "Stop", "capture_inputs", "forward", "logits", "input_device", "default_stats_device",
           "CrossStats", "reduce_sums"]


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
        raise GaugeError(f"{what} must have shape [n, T] or [T], got {tuple(ids.shape)}")
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
                 shard: bool | None = None) -> tuple[Iterator[tuple[torch.Tensor, torch.Tensor]], int | None]:
    """Normalize ``data`` into ``(input_ids [b, T], attention_mask [b, T])`` batches; returns (iterator, n_batches).

    Accepts a LongTensor ``[n, T]`` / ``[T]``, a list of strings (with ``tokenizer``; right-padded), or an iterable of
    batches (mappings with ``input_ids`` and optional ``attention_mask``, as a DataLoader yields, or id tensors).
    Under several ``accelerate`` processes, tensors and string lists are split by rows between processes
    (``shard=None`` or True); an iterable is taken to be this process's shard already (as
    ``accelerator.prepare(dataloader)`` yields) unless ``shard=True``.
    """
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
                 stop_at: str | None = None) -> dict[str, torch.Tensor]:
    """Inputs of the named modules (``{key: module path}``) for the non-padding tokens, as ``[n_tokens, width]``."""
    got: dict[str, torch.Tensor] = {}
    keep = None if mask is None else mask.reshape(-1).bool()
    handles = []

    def hook_for(key: str):
        def hook(_mod, args, kwargs=None):
            x = args[0] if args else next(iter(kwargs.values()))
            x = x.detach().reshape(-1, x.shape[-1])
            got[key] = (x if keep is None else x[keep.to(x.device)]).to("cpu")
            if key == stop_at:
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
def logits(m: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 logits of the whole model (position ids from the mask as in ``forward``)."""
    dev = input_device(m)
    kw: dict[str, Any] = {"input_ids": ids.to(dev), "use_cache": False}
    if mask is not None:
        kw["attention_mask"] = mask.to(dev)
        kw["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0).to(dev)
    return m(**kw).logits.float()


class CrossStats:
    """Streaming float64 sums for ``corr(A_i, B_j)`` (or per-dimension head correlations with ``blocks``)."""

    def __init__(self, width: int, blocks: int | None = None) -> None:
        self.n = 0
        self.blocks = blocks
        self.sa = torch.zeros(width, dtype=torch.float64)
        self.sb = torch.zeros(width, dtype=torch.float64)
        self.saa = torch.zeros(width, dtype=torch.float64)
        self.sbb = torch.zeros(width, dtype=torch.float64)
        if blocks is None:
            self.sab = torch.zeros(width, width, dtype=torch.float64)
        else:
            self.sab = torch.zeros(blocks, blocks, width // blocks, dtype=torch.float64)

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if a.shape != b.shape:
            raise GaugeError(f"activation shapes differ between the models: {tuple(a.shape)} vs {tuple(b.shape)}")
        a, b = a.double(), b.double()
        self.n += a.shape[0]
        self.sa += a.sum(0)
        self.sb += b.sum(0)
        self.saa += (a * a).sum(0)
        self.sbb += (b * b).sum(0)
        if self.blocks is None:
            self.sab += a.T @ b
        else:
            h = self.blocks
            self.sab += torch.einsum("nak,nbk->abk", a.view(a.shape[0], h, -1), b.view(b.shape[0], h, -1))

    def reduce(self) -> "CrossStats":
        """Sum over ``accelerate`` processes (each streamed its own shard of the data); returns self."""
        names = ("sa", "sb", "saa", "sbb", "sab")
        summed = reduce_sums({"n": torch.tensor([float(self.n)], dtype=torch.float64),
                              **{k: getattr(self, k) for k in names}})
        self.n = int(summed["n"].item())
        for k in names:
            setattr(self, k, summed[k].cpu())
        return self

    def corr(self) -> np.ndarray:
        """``C[i, j]``; a constant coordinate correlates 0 with everything. Heads: mean over head dims."""
        if self.n < 2:
            raise GaugeError("need at least 2 non-padding tokens to correlate activations")
        n = self.n
        ma, mb = self.sa / n, self.sb / n
        va = (self.saa / n - ma * ma).clamp_min(0)
        vb = (self.sbb / n - mb * mb).clamp_min(0)
        sda = torch.where(va > 1e-24, va.sqrt(), torch.full_like(va, float("inf")))
        sdb = torch.where(vb > 1e-24, vb.sqrt(), torch.full_like(vb, float("inf")))
        if self.blocks is None:
            cov = self.sab / n - ma[:, None] * mb[None, :]
            C = cov / sda[:, None] / sdb[None, :]
        else:
            h = self.blocks
            ma, mb, sda, sdb = (t.view(h, -1) for t in (ma, mb, sda, sdb))
            cov = self.sab / n - ma[:, None, :] * mb[None, :, :]
            C = (cov / sda[:, None, :] / sdb[None, :, :]).mean(-1)
        return C.clamp(-1, 1).numpy()
