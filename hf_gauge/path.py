"""Compose local gauges along a path of checkpoints.

Adjacent checkpoints of one run differ little, so their local gauges are found reliably; composing them
(``g = g_k @ ... @ g_2 @ g_1``, ``x_last = g(x_first)``) carries coordinates along the whole path. Cross-run use:
``compose_path([run1_T, ..., run1_1, base, run2_1, ..., run2_T])``.

``via``: waypoints routed through between two endpoints: ``compose_path([a, b], via=base)`` is
``compose_path([a, base, b])`` and ``via=[w1, w2]`` gives ``[a, w1, w2, b]``. This is the "route through the shared
base only" control (two hops) that the full trajectory is compared against; it is refused with more than two
checkpoints, where its place would be ambiguous.
"""
from __future__ import annotations

import gc
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .errors import GaugeError
from .gauge import Gauge
from .modelref import model_ref

__all__ = ["compose_path"]


def _label(ckpt: Any) -> str:
    """A hop's endpoint as recorded: its Hub id where one can be known, else its folder's absolute path
    (``modelref.model_ref``), else the class name of an in-memory model."""
    if isinstance(ckpt, (str, os.PathLike)):
        return model_ref(str(ckpt))[0]
    cfg = getattr(ckpt, "config", None)
    return model_ref(getattr(cfg, "_name_or_path", "") or "")[0] or type(ckpt).__name__


def _load(ckpt: Any, load_kwargs: dict[str, Any]) -> Any:
    if isinstance(ckpt, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM
        if isinstance(ckpt, str) and not os.path.isdir(ckpt) and os.path.sep in ckpt:
            raise GaugeError(f"checkpoint folder {ckpt!r} does not exist")
        return AutoModelForCausalLM.from_pretrained(
            ckpt, **{"dtype": torch.float32, "trust_remote_code": False, **load_kwargs}).eval()
    if isinstance(ckpt, torch.nn.Module):
        return ckpt
    raise GaugeError(f"a checkpoint must be a model or a local path, got {type(ckpt).__name__}")


def compose_path(checkpoints: Sequence[Any], data: Any = None, via: Any = None, method: str = "signed",
                 load_kwargs: dict[str, Any] | None = None, **kw: Any) -> Gauge:
    """The gauge from ``checkpoints[0]``'s chart to ``checkpoints[-1]``'s, composed from consecutive local gauges.

    Checkpoints are models or local folders (loaded with ``AutoModelForCausalLM.from_pretrained(path,
    **load_kwargs)``, float32 by default, at most two in memory at a time). ``data`` and ``**kw`` go to every hop's
    ``find_gauge`` (data-free when ``data is None``); ``data`` must be re-iterable (a tensor, a list, a DataLoader).

    ``gauge.metrics["hops"]`` lists each hop's metrics with its endpoints; ``gauge.confidence["residual"]`` is, per
    final coordinate, the smallest margin met along the path by the coordinate it traces back to.
    """
    from .match import find_gauge

    if method not in ("signed", "permutation"):
        raise GaugeError(f"compose_path composes signed permutations: method must be 'signed' or 'permutation', "
                         f"got {method!r}")
    if isinstance(checkpoints, (str, os.PathLike, torch.nn.Module)) or not isinstance(checkpoints, Sequence):
        raise GaugeError("checkpoints must be a list of models or local paths (at least two)")
    path = list(checkpoints)
    if via is not None:
        if len(path) != 2:
            raise GaugeError(f"via= inserts waypoints between two endpoints, but {len(path)} checkpoints were given; "
                             "list every checkpoint of the path explicitly instead")
        waypoints = list(via) if isinstance(via, (list, tuple)) else [via]
        path = [path[0], *waypoints, path[1]]
    if len(path) < 2:
        raise GaugeError(f"a path needs at least two checkpoints, got {len(path)}")
    if data is not None and isinstance(data, Iterator):
        raise GaugeError("data is a one-shot iterator but every hop needs the same tokens: pass a tensor, a list of "
                         "strings or a DataLoader (re-iterable)")
    load_kwargs = dict(load_kwargs or {})

    total: Gauge | None = None
    conf: torch.Tensor | None = None
    hops: list[dict[str, Any]] = []
    prev = _load(path[0], load_kwargs)
    for k in range(1, len(path)):
        nxt = _load(path[k], load_kwargs)
        g = find_gauge(prev, nxt, data=data, method=method, **kw)
        hops.append({"from": _label(path[k - 1]), "to": _label(path[k]), **g.metrics})
        margin = torch.as_tensor(g.confidence["residual"], dtype=torch.float64)
        conf = margin.clone() if conf is None else torch.minimum(conf[g.residual.perm], margin)
        source = total.source if total is not None else g.source
        total = g if total is None else (g @ total)
        total.source, total.target = source, g.target
        prev = nxt                              # drop the older model: at most two are alive
        gc.collect()
    assert total is not None and conf is not None
    total.method = f"composed({len(hops)} hops, {method})"
    total.metrics = {
        "method": method, "n_hops": len(hops), "hops": hops,
        "min_margin": float(conf.min()), "mean_margin": float(conf.mean()),
        "n_low_confidence": int((conf < float(kw.get("low_confidence", 0.05))).sum()),
        "data_free": data is None,
    }
    total.confidence = {"residual": conf}
    return total
