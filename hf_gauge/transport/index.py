"""Index sets and attribution lists (``hf_gauge.IndexSet`` / ``hf_gauge.Attribution``).

Source coordinate ``i`` of space ``s`` lands at ``j = g[s].inverse().perm[i]`` (``map_indices``); scores are
multiplied by ``g[s].sign[j]`` unless the attribution is ``signed=False`` (gauge-invariant scores). A space the gauge
does not mention is the identity. A carried space changes its name with its carrier: the units of A's expert ``a``
(``experts.i.a``) are those of B's expert ``sigma^-1(a)`` (``gauge.target_space``).
"""
from __future__ import annotations

from typing import Any

from ..errors import GaugeError
from ..gauge import target_space
from ..objects import Attribution, IndexSet
from . import register
from ._io import element


def _check(el, obj, what: str) -> None:
    if el is not None and len(obj) and int(obj.indices.max()) >= el.size:
        raise GaugeError(f"{what} index {int(obj.indices.max())} is out of range for space {obj.space!r}, which has "
                         f"{el.size} coordinates in this gauge")


@register(lambda o: isinstance(o, IndexSet), "hf_gauge.IndexSet")
def _index_set(gauge, obj: IndexSet, **_: Any) -> IndexSet:
    el = element(gauge, obj.space)
    _check(el, obj, "IndexSet")
    return IndexSet(obj.indices.clone() if el is None else el.map_indices(obj.indices),
                    target_space(obj.space, gauge.spaces))


@register(lambda o: isinstance(o, Attribution), "hf_gauge.Attribution")
def _attribution(gauge, obj: Attribution, **_: Any) -> Attribution:
    el = element(gauge, obj.space)
    _check(el, obj, "Attribution")
    space = target_space(obj.space, gauge.spaces)
    if el is None:
        return Attribution(obj.indices.clone(), obj.scores.clone(), space, obj.signed)
    new = el.map_indices(obj.indices)
    if not obj.signed or el.is_permutation:
        return Attribution(new, obj.scores.clone(), space, obj.signed)
    s = el.sign[new].to(obj.scores.dtype)
    scores = obj.scores * s.view([-1] + [1] * (obj.scores.dim() - 1))
    return Attribution(new, scores, space, obj.signed)
