"""Rule builders shared by the LayerNorm families (GPT-2, GPT-Neo, GPT-J, OPT, Bloom, Falcon, Phi, StarCoder2,
StableLM, GPT-NeoX spec files).

A LayerNorm on the residual, ``(x - mean x) / std * g + b``, commutes with ``Q = s P`` (a permutation and one global
sign ``s``) only: ``LN(s P x) = s P LN(x)`` needs gain ``P g`` (permuted, never signed) and bias ``s P b`` (signed).
A non-gated MLP ``act(W x + c)`` has no sign symmetry for a generic elementwise ``act`` (GELU, ReLU): its hidden units
permute only (``decoder.plain_mlp_rules``).
"""
from __future__ import annotations

from typing import Callable

from .base import Requires, Rule, Space, gain, writes


def layernorm_eps(field: str) -> Requires:
    """The declared field of a family whose residual norms are ``nn.LayerNorm`` with bias (``field`` names its eps):
    present in every config of the family; a config without it is another model."""
    return Requires(field, (float,), "the residual norms are nn.LayerNorm with bias, which mean-centre: the "
                                     "S_d x {±1} group and the signed LayerNorm biases are derived for them")


LAYERNORM = layernorm_eps("layer_norm_epsilon")     # the name GPT-2, GPT-Neo and GPT-J configs give it


def layernorm_rules(*modules: str) -> tuple[Rule, ...]:
    """``.weight`` (gain: permuted, never signed) and ``.bias`` (signed by the global sign) of a LayerNorm on the
    residual at each module path."""
    return tuple(r for m in modules for r in (Rule(m + ".weight", gain()), Rule(m + ".bias", writes())))


def layernorm_spaces(mlp_size: Callable[[object], int], mlp_doc: str) -> dict[str, Space]:
    """The spaces of a LayerNorm decoder with a non-gated MLP ``W2 act(W1 x)``: residual S_d x {±1}; MLP units
    permute with no signs (an activation that is not odd, such as GELU or ReLU); query heads permute as wholes
    (within KV groups where the config shares keys and values, groups as wholes: the ``heads`` kind)."""
    return {
        "residual": Space(lambda c: c.hidden_size, "global", "residual stream (LayerNorm)", kind="residual"),
        "mlp.{i}": Space(mlp_size, "none", mlp_doc, kind="units"),
        "attn.{i}": Space(lambda c: c.num_attention_heads, "none", "query heads of layer i", kind="heads"),
    }
