"""Optimizer state (``torch.optim`` ``state_dict()``; Trainer's ``optimizer.pt``, accelerate's ``optimizer.bin``).

Adam/AdamW update each entry from elementwise functions of its own gradient history, so with ``g`` acting on the
parameters (a gather plus signs) the whole run commutes with ``g`` when first moments move like their parameter
(signs included: ``exp_avg``, ``momentum_buffer``, ``grad_avg``) and second moments are only permuted (``exp_avg_sq``,
``max_exp_avg_sq``, ``square_avg``, ``sum``, ``acc_delta``, ``exp_inf``). Scalars (``step``) are unchanged.

Parameter ids: ``state_dict()`` numbers parameters in the order they were given, group by group. They are named
from, in order of preference: ``param_names=`` (a flat list, or one list per param group), the ``param_names`` torch
records when an optimizer is built from ``named_parameters()``, or ``model.named_parameters()`` (trainable ones,
in order; with several groups also the Trainer's decay / no-decay split). Every candidate is checked against the
state's shapes; an ambiguous choice is refused.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..engine import Move, move_tensor, source_names
from ..errors import GaugeError
from ..specs import ArchSpec
from . import register
from ._io import moves_for_names, spec_and_config

FIRST_MOMENTS = ("exp_avg", "momentum_buffer", "grad_avg")
SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta", "exp_inf")


def is_optim_state(o: Any) -> bool:
    return isinstance(o, Mapping) and set(o) >= {"state", "param_groups"} and isinstance(o["param_groups"], list)


def _ids(sd: Mapping[str, Any]) -> list[list[int]]:
    return [list(g.get("params", [])) for g in sd["param_groups"]]


def _trainer_split(model: torch.nn.Module, trainable: list[str]) -> list[str] | None:
    """The Trainer's two groups (weight decay first, then the rest), or None when transformers lacks the helper."""
    try:
        from transformers import Trainer
        decay = set(Trainer.get_decay_parameter_names(None, model))
    except Exception:       # the helper's signature changed: no such candidate
        return None
    return [n for n in trainable if n in decay] + [n for n in trainable if n not in decay]


def _shapes_ok(names: Sequence[str], flat_ids: Sequence[int], state: Mapping, shapes: Mapping[str, torch.Size]) -> bool:
    for n, pid in zip(names, flat_ids):
        for k, v in (state.get(pid) or {}).items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) != tuple(shapes[n]):
                return False
    return True


def _first_mismatch(names: Sequence[str], flat_ids: Sequence[int], state: Mapping,
                    shapes: Mapping[str, torch.Size]) -> str:
    for n, pid in zip(names, flat_ids):
        for k, v in (state.get(pid) or {}).items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) != tuple(shapes[n]):
                return (f"; e.g. state[{pid}][{k!r}] has shape {tuple(v.shape)} but parameter {n!r} (the "
                        f"{flat_ids.index(pid)}-th trainable one) has {tuple(shapes[n])}")
    if len(flat_ids) > len(names):
        return f"; e.g. state ids from {flat_ids[len(names)]} on have no parameter"
    return ""


def param_names_for(sd: Mapping[str, Any], *, model: Any = None,
                    param_names: Sequence[str] | Sequence[Sequence[str]] | None = None) -> dict[int, str]:
    """``{param id: parameter name}`` for an optimizer state dict (see module docstring)."""
    groups = _ids(sd)
    flat_ids = [i for g in groups for i in g]
    if len(set(flat_ids)) != len(flat_ids):
        raise GaugeError("the optimizer state lists a parameter id twice across param_groups")
    if param_names is not None:
        names = list(param_names)
        if names and not isinstance(names[0], str):
            if len(names) != len(groups) or any(len(a) != len(b) for a, b in zip(names, groups)):
                raise GaugeError(f"param_names has group sizes {[len(a) for a in names]} but the optimizer's groups have "
                                 f"{[len(g) for g in groups]}")
            names = [n for grp in names for n in grp]
        if len(names) != len(flat_ids):
            raise GaugeError(f"param_names has {len(names)} names but the optimizer state has {len(flat_ids)} "
                             "parameter ids")
        return dict(zip(flat_ids, names))
    recorded = [g.get("param_names") for g in sd["param_groups"]]
    if all(isinstance(r, list) for r in recorded) and recorded:
        names = [n for r in recorded for n in r]
        if len(names) == len(flat_ids):
            return dict(zip(flat_ids, names))
    if model is None:
        raise GaugeError("transporting optimizer state needs model= (the model whose parameters it holds, in the "
                         "source chart) or param_names=")
    params = dict(model.named_parameters())
    shapes = {n: p.shape for n, p in params.items()}
    trainable = [n for n, p in params.items() if p.requires_grad]
    cands: list[tuple[str, list[str]]] = []
    if len(groups) > 1:
        split = _trainer_split(model, trainable)
        if split is not None:
            cands.append(("Trainer decay/no-decay groups", split))
    cands += [("trainable named_parameters()", trainable), ("all named_parameters()", list(params))]
    fits = []
    for label, names in cands:
        if len(names) == len(flat_ids) and _shapes_ok(names, flat_ids, sd["state"], shapes):
            if all(names != f[1] for f in fits):
                fits.append((label, names))
    if not fits:
        counts = ", ".join(f"{lab}: {len(n)}" for lab, n in cands)
        first = _first_mismatch(trainable, flat_ids, sd["state"], shapes)
        raise GaugeError(
            f"the optimizer state ({len(flat_ids)} parameter ids) does not match this model's parameters ({counts}) "
            f"in count or shapes{first}; pass param_names= (the names of the parameters given to the optimizer, "
            "in order) if the order differs"
        )
    if len(fits) > 1:
        raise GaugeError(f"ambiguous parameter order: both {fits[0][0]} and {fits[1][0]} fit the optimizer state; "
                         "pass param_names=")
    return dict(zip(flat_ids, fits[0][1]))


def transport_optimizer_state(gauge, sd: Mapping[str, Any], *, model: Any = None,
                              param_names: Sequence[str] | Sequence[Sequence[str]] | None = None,
                              model_type: str | None = None, spec: ArchSpec | None = None,
                              config: Any = None, **_: Any) -> dict[str, Any]:
    """A new optimizer state dict in the gauge's target chart (``param_groups`` copied, tensors moved)."""
    if not is_optim_state(sd):
        raise GaugeError("not an optimizer state dict: expected {'state': {...}, 'param_groups': [...]}")
    ids = param_names_for(sd, model=model, param_names=param_names)
    spec, config = spec_and_config(gauge, model=model, config=config, model_type=model_type, spec=spec,
                                   what="optimizer state")
    plan = moves_for_names(spec, config, gauge, sorted(set(ids.values())))
    shapes = {n: p.shape for n, p in model.named_parameters()} if model is not None else {}
    state_out: dict[Any, Any] = {}
    for pid, st in sd["state"].items():
        if pid not in ids:
            raise GaugeError(f"optimizer state has an entry for parameter id {pid}, which no param_group lists")
        name = ids[pid]
        moves = plan[name]
        unsigned: tuple[Move, ...] = tuple(m.without_signs() for m in moves)
        new_st = {}
        for k, v in st.items():
            where = f"state[{pid}][{k!r}] (parameter {name!r})"
            if not isinstance(v, torch.Tensor) or v.dim() == 0:
                new_st[k] = v.clone() if isinstance(v, torch.Tensor) else v
                continue
            if name in shapes and tuple(v.shape) != tuple(shapes[name]):
                raise GaugeError(f"{where} has shape {tuple(v.shape)} but the parameter has {tuple(shapes[name])}: "
                                 "the optimizer state does not belong to this model")
            if k in FIRST_MOMENTS:
                mv = moves
            elif k in SECOND_MOMENTS:
                mv = unsigned
            else:
                raise GaugeError(f"{where}: unknown optimizer state entry; hf_gauge knows first moments "
                                 f"{FIRST_MOMENTS} and second moments {SECOND_MOMENTS}")
            try:
                new_st[k] = move_tensor(v, mv)
            except GaugeError as e:
                raise GaugeError(f"{where}: {e}") from None
        state_out[pid] = new_st
    pid_of = {n: pid for pid, n in ids.items()}
    renamed = source_names(spec, gauge, pid_of, config=config)    # one module per head: its state follows it
    moved = dict(state_out)
    for n, src in renamed.items():
        if src not in pid_of:
            raise GaugeError(f"parameter {n!r} takes the place of {src!r}, which the optimizer does not hold: its "
                             "state cannot follow it")
        if pid_of[src] in moved:
            state_out[pid_of[n]] = moved[pid_of[src]]
        else:
            state_out.pop(pid_of[n], None)
    groups = [{k: (list(v) if isinstance(v, list) else v) for k, v in g.items()} for g in sd["param_groups"]]
    out = {k: v for k, v in sd.items() if k not in ("state", "param_groups")}
    out.update(state=state_out, param_groups=groups)
    return out


@register(is_optim_state, "torch optimizer state_dict (needs model= or param_names=)")
def _optim_state(gauge, sd: Mapping[str, Any], **kw: Any) -> dict[str, Any]:
    return transport_optimizer_state(gauge, sd, **kw)
