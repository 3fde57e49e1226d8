"""Steering / control vectors from the ecosystem: ``steering_vectors.SteeringVector`` and ``repeng.ControlVector``.

Rule: each per-layer vector moves as ``v_B = g(v_A)`` (``v_B[j] = sign[j] * v_A[perm[j]]``) on the residual
space. Every ``SteeringVector.layer_type`` (block output, attention/MLP output, norm outputs) is a width-d vector in
the residual chart (norm gains are only permuted). Neither package is imported: objects are recognised by their
type's module and rebuilt with ``dataclasses.replace`` (repeng 0.4 does not import under NumPy 2, see tests).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from ..errors import GaugeError
from . import register
from .vectors import as_tensor, move_vector


def _is(o: Any, module: str, name: str) -> bool:
    t = type(o)
    return t.__name__ == name and (t.__module__ == module or t.__module__.startswith(module + "."))


@register(lambda o: _is(o, "steering_vectors", "SteeringVector"), "steering_vectors.SteeringVector")
def _steering_vector(gauge, sv: Any, **_: Any) -> Any:
    acts = getattr(sv, "layer_activations", None)
    if not isinstance(acts, dict):
        raise GaugeError("SteeringVector.layer_activations must be a dict {layer: tensor}")
    out = {}
    for layer, v in acts.items():
        if not isinstance(v, torch.Tensor):
            raise GaugeError(f"SteeringVector layer {layer}: expected a tensor, got {type(v).__name__}")
        try:
            out[layer] = move_vector(gauge, v, what=f"steering vector for layer {layer}")
        except GaugeError as e:
            raise GaugeError(f"layer {layer}: {e}") from None
    return dataclasses.replace(sv, layer_activations=out)


@register(lambda o: _is(o, "repeng", "ControlVector") and dataclasses.is_dataclass(o), "repeng.ControlVector")
def _control_vector(gauge, cv: Any, **_: Any) -> Any:
    dirs = getattr(cv, "directions", None)
    if not isinstance(dirs, dict):
        raise GaugeError("ControlVector.directions must be a dict {layer: ndarray}")
    out = {}
    for layer, v in dirs.items():
        arr = np.asarray(v)
        try:
            moved = move_vector(gauge, as_tensor(arr, f"control direction {layer}"), what=f"control direction {layer}")
        except GaugeError as e:
            raise GaugeError(f"layer {layer}: {e}") from None
        out[layer] = moved.numpy().copy()
    return dataclasses.replace(cv, directions=out)
