"""GPT-J: a parallel block ``h + attn(ln_1 h) + mlp(ln_1 h)`` with rotary q/k and a biased ``lm_head``.

Residual group S_d x {±1}: one LayerNorm per block (``ln_1``) feeds both sublayers, plus ``ln_f`` (gains permuted,
biases signed by the global sign). Rotary acts on the first ``rotary_dim`` entries of every head, interleaved in
pairs (``rotate_every_two``): the pairs lie inside a head, so heads permute as wholes and never inside. No position
table: ``wte`` is the only embedding. MLP ``fc_out(act(fc_in x))``: units permute, no signs (GELU is not odd).
``lm_head.bias`` is indexed by the vocabulary (untouched).
Declared field: ``layer_norm_epsilon`` (the mean-centring ``nn.LayerNorm``); ``rotary_dim`` (up to the whole head)
and ``activation_function`` need no declaration (rotary stays inside heads; elementwise activation).
"""
from __future__ import annotations

from .base import UNTOUCHED, ArchSpec, Axis, Rule, Sites, reads, writes
from .decoder import HEAD_RULES, head_dim
from .layernorm import LAYERNORM, layernorm_rules, layernorm_spaces

T = "transformer."
L = T + "h.{i}."
HEAD_ROWS = Axis(0, "attn.{i}", signed=False, block="head_dim")
HEAD_COLS = Axis(1, "attn.{i}", signed=False, block="head_dim")
MLP_ROWS = Axis(0, "mlp.{i}", signed=False)
MLP_COLS = Axis(1, "mlp.{i}", signed=False)


def _inner(c) -> int:
    return c.n_inner or 4 * c.hidden_size


GPTJ = ArchSpec(
    name="gptj",
    model_types=("gptj",),
    norm="layernorm",
    spaces=layernorm_spaces(_inner, "MLP hidden units of layer i (GELU: no signs)"),
    rules=(
        Rule(T + "wte.weight", reads()),
        *layernorm_rules(L + "ln_1", T + "ln_f"),
        Rule(L + "attn.q_proj.weight", reads(HEAD_ROWS)),
        Rule(L + "attn.k_proj.weight", reads(HEAD_ROWS)),
        Rule(L + "attn.v_proj.weight", reads(HEAD_ROWS)),
        Rule(L + "attn.out_proj.weight", writes(HEAD_COLS)),
        Rule(L + "mlp.fc_in.weight", reads(MLP_ROWS)),
        Rule(L + "mlp.fc_in.bias", (MLP_ROWS,)),
        Rule(L + "mlp.fc_out.weight", writes(MLP_COLS)),
        Rule(L + "mlp.fc_out.bias", writes()),
        Rule("lm_head.weight", reads()),
        Rule("lm_head.bias", UNTOUCHED),
        *HEAD_RULES,
    ),
    # older checkpoints store the causal-mask buffers, which transformers ignores on load
    file_rules=(Rule(L + "attn.bias", UNTOUCHED), Rule(L + "attn.masked_bias", UNTOUCHED)),
    dims=head_dim,
    requires=(LAYERNORM,),
    sites=Sites(layers=T + "h", final_norm=T + "ln_f", embed=T + "wte",
                inputs={"mlp.{i}": L + "mlp.fc_out", "attn.{i}": L + "attn.out_proj"}),
)
