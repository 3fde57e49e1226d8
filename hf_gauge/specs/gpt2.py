"""GPT-2: pre-LayerNorm blocks, learned positions, ``Conv1D`` projections stored ``[in, out]``.

Residual group S_d x {±1}: every block reads the residual through a LayerNorm (``ln_1``, ``ln_2``, ``ln_f``), whose
mean-centring admits only ``Q 1 = ±1`` (gains permuted, biases signed by the one global sign). The token and the
learned position embeddings (``wte``, ``wpe``) are both added into the residual: their columns are signed-permuted.
``lm_head`` is tied to ``wte`` in released checkpoints (one tensor, moved once).

``Conv1D`` computes ``x @ W + b`` with ``W [in, out]``, so a reader's residual axis is axis 0 and a writer's is
axis 1 (``Rule(transposed=True)`` tells the LoRA roles: PEFT wraps ``Conv1D`` with ``fan_in_fan_out`` and keeps
``lora_A [r, in]``, ``lora_B [out, r]``). ``c_attn``'s output axis is ``[q | k | v]``, each part ``n_head`` blocks
of ``head_dim`` columns. Heads permute as wholes (no rotary, no KV sharing); the attention scale (also
``scale_attn_by_inverse_layer_idx``'s ``1 / (layer + 1)``) and ``reorder_and_upcast_attn`` act on scores, which
every gauge leaves unchanged. MLP ``c_proj(act(c_fc x))``: an elementwise activation (GELU is not odd) admits
permutations of the units, no signs.

Declared fields: ``layer_norm_epsilon`` (the mean-centring ``nn.LayerNorm``) and ``add_cross_attention`` (False:
cross-attention's keys and values read an encoder's stream, another chart). ``activation_function`` needs no
declaration (unsigned unit permutations commute with every elementwise activation), nor do the attention-scale
flags (scores are unchanged by every gauge).
"""
from __future__ import annotations

from .base import UNTOUCHED, ArchSpec, Axis, Requires, Rule, Sites, reads, segmented, writes
from .decoder import HEAD_RULES, head_dim
from .layernorm import LAYERNORM, layernorm_rules, layernorm_spaces

T = "transformer."
L = T + "h.{i}."
HEAD_COLS = Axis(1, "attn.{i}", signed=False, block="head_dim")     # Conv1D output columns of one head
QKV_COLS = segmented(1, HEAD_COLS, HEAD_COLS, HEAD_COLS)
MLP_COLS = Axis(1, "mlp.{i}", signed=False)


def _inner(c) -> int:
    return c.n_inner or 4 * c.hidden_size


GPT2 = ArchSpec(
    name="gpt2",
    model_types=("gpt2",),
    norm="layernorm",
    spaces=layernorm_spaces(_inner, "MLP hidden units of layer i (GELU: no signs)"),
    rules=(
        Rule(T + "wte.weight", reads()),
        Rule(T + "wpe.weight", reads()),                                   # [n_positions, d]: added to the residual
        *layernorm_rules(L + "ln_1", L + "ln_2", T + "ln_f"),
        Rule(L + "attn.c_attn.weight", (Axis(0, "residual"), QKV_COLS), transposed=True),
        Rule(L + "attn.c_attn.bias", (QKV_COLS.on(0),)),
        Rule(L + "attn.c_proj.weight", (HEAD_COLS.on(0), Axis(1, "residual")), transposed=True),
        Rule(L + "attn.c_proj.bias", writes()),
        Rule(L + "mlp.c_fc.weight", (Axis(0, "residual"), MLP_COLS), transposed=True),
        Rule(L + "mlp.c_fc.bias", (MLP_COLS.on(0),)),
        Rule(L + "mlp.c_proj.weight", (MLP_COLS.on(0), Axis(1, "residual")), transposed=True),
        Rule(L + "mlp.c_proj.bias", writes()),
        Rule("lm_head.weight", reads()),
        Rule("multiple_choice_head.summary.weight", reads()),             # GPT2DoubleHeadsModel
        Rule("multiple_choice_head.summary.bias", UNTOUCHED),
        *HEAD_RULES,
    ),
    # older checkpoints store the causal-mask buffers, which transformers ignores on load
    file_rules=(Rule(L + "attn.bias", UNTOUCHED), Rule(L + "attn.masked_bias", UNTOUCHED)),
    dims=head_dim,
    requires=(LAYERNORM,
              Requires("add_cross_attention", (False,), "cross-attention's keys and values read an encoder's "
                       "stream, a chart of another model")),
    sites=Sites(
        layers=T + "h",
        final_norm=T + "ln_f",
        embed=T + "wte",
        inputs={"mlp.{i}": L + "mlp.c_proj", "attn.{i}": L + "attn.c_proj"},
    ),
)
