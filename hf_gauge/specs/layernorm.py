"""Rule builders shared by the LayerNorm families (Bloom, Falcon, Phi, StarCoder2, StableLM spec files).

A LayerNorm on the residual, ``(x - mean x) / std * g + b``, commutes with ``Q = s P`` (a permutation and one global
sign ``s``) only: ``LN(s P x) = s P LN(x)`` needs gain ``P g`` (permuted, never signed) and bias ``s P b`` (signed).
A non-gated MLP ``act(W x + c)`` has no sign symmetry for a generic elementwise ``act`` (GELU, ReLU): its hidden units
permute only, rows of the up projection (and its bias) with the columns of the down projection.
"""
from __future__ import annotations

from .base import Axis, Requires, Rule, reads, writes

LN_GAIN = (Axis(0, "residual", signed=False),)
LN_BIAS = (Axis(0, "residual"),)              # signed: only a global flip is admitted, and it flips the bias
UNIT_ROWS = Axis(0, "mlp.{i}", signed=False)
UNIT_COLS = Axis(1, "mlp.{i}", signed=False)


def layernorm_eps(field: str) -> Requires:
    """The declared field of a family whose residual norms are ``nn.LayerNorm`` with bias (``field`` names its eps):
    present in every config of the family; a config without it is another model."""
    return Requires(field, (float,), "the residual norms are nn.LayerNorm with bias, which mean-centre: the "
                                     "S_d x {±1} group and the signed LayerNorm biases are derived for them")


def layernorm_rules(module: str) -> tuple[Rule, ...]:
    """``module.weight`` (gain) and ``module.bias`` of a LayerNorm on the residual."""
    return Rule(module + ".weight", LN_GAIN), Rule(module + ".bias", LN_BIAS)


def plain_mlp_rules(up: str, down: str) -> tuple[Rule, ...]:
    """``down(act(up x))`` with biases: units permute only (``act`` elementwise, not odd)."""
    return (Rule(up + ".weight", reads(UNIT_ROWS)), Rule(up + ".bias", (UNIT_ROWS,)),
            Rule(down + ".weight", writes(UNIT_COLS)), Rule(down + ".bias", writes()))
