"""Paired activation statistics at the residual sites of two models, streamed in float64.

Both models see the same tokens. At every residual site (token-embedding output, every block output, the final
norm output: all in one residual chart) we keep, per site ``s``, running float64 sums over the non-padding tokens:
``n``, ``sum x_A``, ``sum x_B``, ``sum x_A**2``, ``sum x_B**2`` and the cross moment ``x_A^T x_B`` ``[d, d]``.
Memory is ``n_sites * d**2`` float64; no ``n x d`` activation matrix is ever kept (only the current batch of A's
activations, until B's forward at the same site has consumed it).

Pooling across sites (why per-site standardisation): residual norms grow by one to two orders of magnitude from
the embedding to the last block, a few "massive" coordinates dominate single sites, and site means differ. Pooling
raw sums would let the last layers and those coordinates dominate, and would turn the between-site mean shifts into
spurious covariance. We therefore z-score each coordinate *within its site* and pool the z-scored statistics: the
pooled correlation is ``C = sum_s n_s C_s / sum_s n_s`` with ``C_s[i, j] = corr_s(A_i, B_j)``. Every site then
counts equally, each coordinate at unit scale; for gauge-equivalent models every ``C_s`` holds exactly ``±1`` at the
matched pairs, so ``C`` does too. Per-coordinate z-scoring is not rotation-equivariant, so Procrustes instead uses
the centred cross-covariance with one *scalar* per site (``sqrt(tr Cov_s(A) tr Cov_s(B))``), which is: see
:meth:`PairStats.cross_covariance`.

Under ``accelerate launch`` every process streams its shard and :meth:`PairStats.reduce` sums the raw moments
across processes (``accelerate.utils.reduce``), so N processes give the statistics of one. The process layout is
accelerate's ``PartialState``: on CPU-only machines create ``Accelerator(cpu=True)`` / ``PartialState(cpu=True)`` before
calling hf_gauge (otherwise accelerate reports a single process and every process streams all the data).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from transformers.utils import logging

from .activations import PairStats, default_stats_device, forward, iter_batches
from .errors import GaugeError
from .view import ModelView

logger = logging.get_logger("hf_gauge")

__all__ = ["PairStats", "collect_pair_stats", "iter_batches", "residual_sites"]

MIN_SITE_TOKENS = 3      # fewer tokens at a site: its correlations carry no information (2 points correlate ±1)



# ----------------------------------------------------------------------------------------------------------------
# Hooks
# ----------------------------------------------------------------------------------------------------------------
def residual_sites(model: torch.nn.Module, layers: Sequence[int] | None = None,
                   include_embed: bool = True, include_final_norm: bool = True) -> list[str]:
    """Module paths whose outputs lie in the residual chart, from the architecture spec's ``sites``."""
    v = ModelView.of(model)
    spec = v.spec
    n_layers = len(v.submodule(spec.sites.layers))
    idx = range(n_layers) if layers is None else [int(i) for i in layers]
    for i in idx:
        if not -n_layers <= i < n_layers:
            raise GaugeError(f"layer {i} out of range: the model has {n_layers} layers")
    sites = [spec.sites.embed] if include_embed else []
    sites += [f"{spec.sites.layers}.{i % n_layers}" for i in idx]
    if include_final_norm:
        sites.append(spec.sites.final_norm)
    if not sites:
        raise GaugeError("no residual sites selected: include the embedding, some layers or the final norm")
    return sites


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    raise GaugeError(f"cannot read a hidden state from a module output of type {type(out).__name__}")


class _Collector:
    """Forward hooks on one model's sites; A's pass stores the batch, B's pass consumes it into the sums."""

    def __init__(self, stats: PairStats, d: int) -> None:
        self.stats, self.d = stats, d
        self.mask: torch.Tensor | None = None
        self.pending: dict[int, torch.Tensor] = {}
        self.role = "a"

    def rows(self, out: Any) -> torch.Tensor:
        h = _first_tensor(out).detach()
        if h.shape[-1] != self.d:
            raise GaugeError(f"a residual site produced width {h.shape[-1]}, expected {self.d}")
        h = h.reshape(-1, self.d)
        m = self.mask.to(h.device)
        if h.shape[0] != m.numel():
            raise GaugeError(f"a residual site produced {h.shape[0]} rows for a batch of {m.numel()} tokens")
        return h[m].to(device=self.stats.count.device, dtype=torch.float64)

    def hook(self, s: int):
        def fn(module, args, out):
            x = self.rows(out)
            if self.role == "a":
                self.stats.update_a(s, x)
                self.pending[s] = x
            else:
                xa = self.pending.pop(s, None)
                if xa is None:
                    raise GaugeError(f"site {self.stats.sites[s]!r} fired in model B but not in model A")
                self.stats.update_b(s, xa, x)
        return fn


def collect_pair_stats(model_a: Any, model_b: Any, data: Any, *, tokenizer: Any = None, batch_size: int = 8,
                       max_length: int | None = None, layers: Sequence[int] | None = None,
                       include_embed: bool = True, include_final_norm: bool = True, progress: bool | None = None,
                       stats_device: torch.device | str | None = None, shard: bool | None = None,
                       reduce: bool = True) -> PairStats:
    """Stream paired residual statistics of ``model_a`` and ``model_b`` on ``data`` (see the module docstring).

    Padding positions (``attention_mask == 0``) are excluded. Models may be spread over devices (device maps):
    activations are moved to ``stats_device`` (default: the CUDA device of A's embedding, else CPU) as float64.
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm

    va, vb = ModelView.of(model_a), ModelView.of(model_b)
    ma, mb = va.module, vb.module
    d = va.config.hidden
    sites = residual_sites(va, layers, include_embed, include_final_norm)
    sites_b = residual_sites(vb, layers, include_embed, include_final_norm)
    dev = torch.device(stats_device) if stats_device is not None else default_stats_device(ma)
    stats = PairStats(sites=sites, d=d, device=dev)
    vocab = min(ma.get_input_embeddings().weight.shape[0], mb.get_input_embeddings().weight.shape[0])
    batches, n_b = iter_batches(data, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, shard=shard)
    state = PartialState()
    disable = (not progress) if progress is not None else None
    if not state.is_main_process or os.environ.get("RANK", "0") != "0":      # torchrun: rank 0 alone draws it
        disable = True
    col = _Collector(stats, d)
    was_training = (ma.training, mb.training)
    ma.eval(), mb.eval()
    try:
        for ids, mask in tqdm(batches, total=n_b, disable=disable, desc="hf_gauge: activation statistics",
                              unit="batch"):
            if ids.numel() == 0:
                continue
            if int(ids.max()) >= vocab or int(ids.min()) < 0:
                raise GaugeError(f"token id {int(ids.max()) if int(ids.max()) >= vocab else int(ids.min())} is outside "
                                 f"the vocabulary [0, {vocab}); tokenize with the models' tokenizer")
            col.mask = mask.reshape(-1).bool()
            if not bool(col.mask.any()):
                continue
            for role, m, names in (("a", ma, sites), ("b", mb, sites_b)):
                col.role = role
                handles = [m.get_submodule(p).register_forward_hook(col.hook(s)) for s, p in enumerate(names)]
                try:
                    forward(m, ids, mask)
                finally:
                    for h in handles:
                        h.remove()
            if col.pending:
                raise GaugeError(f"sites {[sites[s] for s in col.pending]} fired in model A but not in model B")
    finally:
        ma.train(was_training[0]), mb.train(was_training[1])
        col.pending.clear()
    if reduce:
        stats.reduce()
    stats.to("cpu")
    return stats
