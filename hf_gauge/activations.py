"""The activation pipeline: token batches in, hooked forward passes, float64 moment sums out.

Every activation statistic of hf_gauge runs through here: pair statistics of the residual stream (``stats``),
inner-space matching (``inner``), the audit's claims (``audit``) and ``verify``. Batches are ``(input_ids,
attention_mask)``; position ids follow the padding mask (left padding is exact); padding tokens never enter a sum;
a forward pass stops early once the last hooked site has fired (``Stop``); sums are added up over ``accelerate``
processes (``reduce_sums``).
"""
from __future__ import annotations

import inspect
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from .errors import GaugeError

__all__ = ["token_batches", "Stop", "capture_inputs", "forward", "logits", "input_device", "default_stats_device",
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


def token_batches(data: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(input_ids, attention_mask)`` from a LongTensor ``[B, T]``, a dict / BatchEncoding, or an iterable of those."""
    if isinstance(data, torch.Tensor):
        if data.dtype not in (torch.int64, torch.int32) or data.dim() not in (1, 2):
            raise GaugeError(f"data must be token ids [batch, seq] (int64), got {data.dtype} {tuple(data.shape)}")
        yield (data if data.dim() == 2 else data[None]).long(), None
        return
    if isinstance(data, Mapping):
        if "input_ids" not in data:
            raise GaugeError("a data dict needs 'input_ids' (and optionally 'attention_mask')")
        ids = torch.as_tensor(data["input_ids"])
        mask = data.get("attention_mask")
        yield (ids if ids.dim() == 2 else ids[None]).long(), (None if mask is None else torch.as_tensor(mask).reshape(ids.shape[0] if ids.dim() == 2 else 1, -1))
        return
    if isinstance(data, (list, tuple)) or inspect.isgenerator(data) or hasattr(data, "__iter__"):
        n = 0
        for item in data:
            for b in token_batches(item):
                n += 1
                yield b
        if n == 0:
            raise GaugeError("data is empty")
        return
    raise GaugeError(f"unsupported data of type {type(data).__name__}: pass token ids [batch, seq] or a tokenizer output")


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
