"""Phi (Phi-1, Phi-1.5, Phi-2): one LayerNorm feeding parallel attention and MLP, ``h + attn(LN h) + mlp(LN h)``.

Residual group S_d x {±1}: ``input_layernorm`` and ``final_layernorm`` are LayerNorms (gains permuted, biases signed
by the global sign); the attention ``dense`` and MLP ``fc2`` outputs, both with bias, write the residual. MLP units
(``fc2(act(fc1 x))``, GELU-new, not odd) permute only. Rotary covers the first ``partial_rotary_factor * head_dim``
dimensions of each head: heads permute as wholes (within KV groups, groups as wholes), never inside. The optional
``qk_layernorm`` LayerNorms are ``[head_dim]`` gains shared by every head: head space, untouched. ``lm_head`` has a
bias over the vocabulary: untouched.
Declared field: ``layer_norm_eps``. ``hidden_act``, ``qk_layernorm`` and ``partial_rotary_factor`` need no declaration:
units are unsigned, the q/k norms and the rotary part act inside heads, which permute as wholes, for every value.
"""
from __future__ import annotations

from .base import UNTOUCHED, ArchSpec, Rule, Sites, reads, writes
from .decoder import HEAD_RULES, KV_ROWS, O_COLS, Q_ROWS, head_dim, plain_mlp_rules
from .layernorm import layernorm_eps, layernorm_rules, layernorm_spaces

L = "model.layers.{i}."
A = L + "self_attn."

PHI = ArchSpec(
    name="phi",
    model_types=("phi",),
    norm="layernorm",
    spaces=layernorm_spaces(lambda c: c.intermediate_size, "GELU hidden units of layer i"),
    rules=(
        Rule("model.embed_tokens.weight", reads()),
        Rule(A + "q_proj.weight", reads(Q_ROWS)), Rule(A + "q_proj.bias", (Q_ROWS,)),
        Rule(A + "k_proj.weight", reads(KV_ROWS)), Rule(A + "k_proj.bias", (KV_ROWS,)),
        Rule(A + "v_proj.weight", reads(KV_ROWS)), Rule(A + "v_proj.bias", (KV_ROWS,)),
        Rule(A + "dense.weight", writes(O_COLS)), Rule(A + "dense.bias", writes()),
        *(Rule(A + f"{qk}_layernorm.{w}", UNTOUCHED) for qk in "qk" for w in ("weight", "bias")),
        *plain_mlp_rules(L + "mlp.fc1", L + "mlp.fc2"),
        *layernorm_rules(L + "input_layernorm"),
        *layernorm_rules("model.final_layernorm"),
        Rule("lm_head.weight", reads()),
        Rule("lm_head.bias", UNTOUCHED),
        *HEAD_RULES,
    ),
    dims=head_dim,
    requires=(layernorm_eps("layer_norm_eps"),),
    sites=Sites(layers="model.layers", final_norm="model.final_layernorm", embed="model.embed_tokens",
                inputs={"mlp.{i}": L + "mlp.fc2", "attn.{i}": A + "dense"}),
)
