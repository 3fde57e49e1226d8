"""BLOOM: pre-LayerNorm decoder with ALiBi position biases, a LayerNorm right after the embedding, and a GELU MLP.

Residual group S_d x {±1}: ``word_embeddings_layernorm`` (on the residual right after the embedding), every block's
``input_layernorm`` / ``post_attention_layernorm`` and ``ln_f`` are LayerNorms with bias (gains permuted, biases
signed by the global sign). With ``apply_residual_connection_post_layernorm`` the residual carried on is a LayerNorm
output, which lies in the same chart: the group is the same. MLP units (``4 * hidden``, GELU, not odd) permute only.

Heads: no head permutation is a symmetry, so no heads space is declared. ALiBi adds ``slope_h * distance`` to head
``h``'s scores, with slopes fixed by head index (``_get_alibi_slopes``): for ``n`` heads and ``c`` the largest power of
two <= n, ``slope_h = 2^(-8 (h + 1) / c)`` for the first ``c`` heads (exponents 8/c times 1..c: even multiples of
4/c) and ``2^(-4 (2 j + 1) / c)`` for the ``n - c`` others (odd multiples of 4/c). All exponents differ, so no two heads
share a slope, for any head count, and a head moved to another index would get another position bias. The fused
``query_key_value`` rows (per head ``[q | k | v]``) and ``dense`` columns therefore never move.

``pretraining_tp > 1`` with ``slow_but_exact`` computes the same sums in slices (the gauge is exact up to float
order) but calls ``dense_4h_to_h`` through ``F.linear``: its forward hook never fires, so matching MLP units from
activations is refused (naming the site); they are matched from the weights.
Declared field: ``layer_norm_epsilon``. ``apply_residual_connection_post_layernorm``, ``pretraining_tp`` and
``slow_but_exact`` need no declaration (same chart, same group).
"""
from __future__ import annotations

from .base import ArchSpec, Rule, Sites, Space, reads, writes
from .decoder import HEAD_RULES, plain_mlp_rules
from .layernorm import layernorm_eps, layernorm_rules

T = "transformer."
L = T + "h.{i}."

BLOOM = ArchSpec(
    name="bloom",
    model_types=("bloom",),
    norm="layernorm",
    spaces={
        "residual": Space(lambda c: c.hidden_size, "global", "residual stream", kind="residual"),
        "mlp.{i}": Space(lambda c: 4 * c.hidden_size, "none", "GELU hidden units of layer i", kind="units"),
    },
    rules=(
        Rule(T + "word_embeddings.weight", reads()),
        *layernorm_rules(T + "word_embeddings_layernorm"),
        *layernorm_rules(L + "input_layernorm"),
        Rule(L + "self_attention.query_key_value.weight", reads()),
        Rule(L + "self_attention.query_key_value.bias", ()),
        Rule(L + "self_attention.dense.weight", writes()),
        Rule(L + "self_attention.dense.bias", writes()),
        *layernorm_rules(L + "post_attention_layernorm"),
        *plain_mlp_rules(L + "mlp.dense_h_to_4h", L + "mlp.dense_4h_to_h"),
        *layernorm_rules(T + "ln_f"),
        Rule("lm_head.weight", reads()),
        *HEAD_RULES,
    ),
    dims=lambda c: {},
    requires=(layernorm_eps("layer_norm_epsilon"),),
    sites=Sites(layers=T + "h", final_norm=T + "ln_f", embed=T + "word_embeddings",
                inputs={"mlp.{i}": L + "mlp.dense_4h_to_h"}),
)
