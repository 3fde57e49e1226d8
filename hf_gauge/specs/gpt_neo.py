"""GPT-Neo: GPT-2's block with ``nn.Linear`` projections, separate q/k/v without bias and local/global attention.

Residual group S_d x {±1} (LayerNorm ``ln_1``, ``ln_2``, ``ln_f``: gains permuted, biases signed by the global sign);
``wte`` and the learned positions ``wpe`` add into the residual (columns signed-permuted). Heads permute as wholes
in every layer: a local layer's sliding window masks positions, the same for every head, so the per-layer attention
type changes nothing. No attention scale (GPT-Neo omits ``1 / sqrt(head_dim)``): scores are unchanged by every
gauge either way. MLP ``c_proj(act(c_fc x))``: units permute, no signs (GELU is not odd).
Declared field: ``layer_norm_epsilon`` (the mean-centring ``nn.LayerNorm``); ``activation_function``,
``attention_types`` and ``window_size`` need no declaration (elementwise activation, masks shared by every head).
"""
from __future__ import annotations

from .base import UNTOUCHED, ArchSpec, Axis, Rule, Sites, reads, writes
from .decoder import HEAD_RULES, head_dim
from .layernorm import LAYERNORM, layernorm_rules, layernorm_spaces

T = "transformer."
L = T + "h.{i}."
A = L + "attn.attention."
HEAD_ROWS = Axis(0, "attn.{i}", signed=False, block="head_dim")
HEAD_COLS = Axis(1, "attn.{i}", signed=False, block="head_dim")
MLP_ROWS = Axis(0, "mlp.{i}", signed=False)
MLP_COLS = Axis(1, "mlp.{i}", signed=False)


def _inner(c) -> int:
    return c.intermediate_size or 4 * c.hidden_size


GPT_NEO = ArchSpec(
    name="gpt_neo",
    model_types=("gpt_neo",),
    norm="layernorm",
    spaces=layernorm_spaces(_inner, "MLP hidden units of layer i (GELU: no signs)"),
    rules=(
        Rule(T + "wte.weight", reads()),
        Rule(T + "wpe.weight", reads()),
        *layernorm_rules(L + "ln_1", L + "ln_2", T + "ln_f"),
        Rule(A + "q_proj.weight", reads(HEAD_ROWS)),
        Rule(A + "k_proj.weight", reads(HEAD_ROWS)),
        Rule(A + "v_proj.weight", reads(HEAD_ROWS)),
        Rule(A + "out_proj.weight", writes(HEAD_COLS)),
        Rule(A + "out_proj.bias", writes()),
        Rule(L + "mlp.c_fc.weight", reads(MLP_ROWS)),
        Rule(L + "mlp.c_fc.bias", (MLP_ROWS,)),
        Rule(L + "mlp.c_proj.weight", writes(MLP_COLS)),
        Rule(L + "mlp.c_proj.bias", writes()),
        Rule("lm_head.weight", reads()),
        *HEAD_RULES,
    ),
    # older checkpoints store the (local / global) causal-mask buffers, which transformers rebuilds on load
    file_rules=(Rule(A + "bias", UNTOUCHED), Rule(A + "masked_bias", UNTOUCHED)),
    dims=head_dim,
    requires=(LAYERNORM,),
    sites=Sites(layers=T + "h", final_norm=T + "ln_f", embed=T + "wte",
                inputs={"mlp.{i}": L + "mlp.c_proj", "attn.{i}": A + "out_proj"}),
)
