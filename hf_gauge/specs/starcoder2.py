"""StarCoder2: pre-LayerNorm decoder (``norm_epsilon``, LayerNorms with bias), a non-gated GELU MLP ``c_proj(act(
c_fc x))`` and GQA attention with rotary embeddings.

Residual group S_d x {±1} (LayerNorm: gains permuted, biases signed-permuted by the global sign). MLP units permute
only: ``act`` is elementwise and not odd, and no gate carries a sign (any elementwise ``hidden_act`` keeps the
permutations exact, so the group does not depend on it). Heads permute as wholes (rotary acts inside a head) within
KV groups, KV groups as wholes. ``use_bias`` only adds biases: q/k/v biases live in head space (moved with the head
blocks), ``o_proj``/``c_proj`` biases write the residual.
Declared field: ``norm_epsilon`` (the LayerNorms). ``hidden_act`` and ``use_bias`` need no declaration: unsigned unit
permutations commute with any elementwise activation, and biases only add tensors that have rules.
"""
from __future__ import annotations

from .base import UNTOUCHED, ArchSpec, Rule, Sites, reads
from .decoder import HEAD_RULES, attention_rules, head_dim, plain_mlp_rules
from .layernorm import layernorm_eps, layernorm_rules, layernorm_spaces

L = "model.layers.{i}."

STARCODER2 = ArchSpec(
    name="starcoder2",
    model_types=("starcoder2",),
    norm="layernorm",
    spaces=layernorm_spaces(lambda c: c.intermediate_size, "GELU hidden units of layer i"),
    rules=(
        Rule("model.embed_tokens.weight", reads()),
        *attention_rules(L),
        *plain_mlp_rules(L + "mlp.c_fc", L + "mlp.c_proj"),
        *layernorm_rules(L + "input_layernorm"),
        *layernorm_rules(L + "post_attention_layernorm"),
        *layernorm_rules("model.norm"),
        Rule("lm_head.weight", reads()),
        Rule("lm_head.bias", UNTOUCHED),
        *HEAD_RULES,
    ),
    dims=head_dim,
    requires=(layernorm_eps("norm_epsilon"),),
    sites=Sites(layers="model.layers", final_norm="model.norm", embed="model.embed_tokens",
                inputs={"mlp.{i}": L + "mlp.c_proj", "attn.{i}": L + "self_attn.o_proj"}),
)
