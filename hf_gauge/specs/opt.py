"""OPT: LayerNorm decoder with learned positions (offset 2), a ReLU MLP and biased projections.

Residual group S_d x {±1} (LayerNorm: gains permuted, biases signed by the global sign). ``embed_tokens`` and
``embed_positions`` (``[max_positions + 2, d]``: the offset only shifts which rows are read) add into the residual:
columns signed-permuted. MLP ``fc2(relu(fc1 x))``: ReLU is not odd, so units permute with no signs. Heads permute as
wholes (no KV sharing, no rotary).
"""
from __future__ import annotations

from .base import ArchSpec, Axis, Rule, Sites, reads, writes
from .decoder import HEAD_RULES, head_dim, layernorm_rules, layernorm_spaces

D = "model.decoder."
L = D + "layers.{i}."
HEAD_ROWS = Axis(0, "attn.{i}", signed=False, block="head_dim")
HEAD_COLS = Axis(1, "attn.{i}", signed=False, block="head_dim")
MLP_ROWS = Axis(0, "mlp.{i}", signed=False)
MLP_COLS = Axis(1, "mlp.{i}", signed=False)

OPT = ArchSpec(
    name="opt",
    model_types=("opt",),
    norm="layernorm",
    spaces=layernorm_spaces(lambda c: c.ffn_dim, "MLP hidden units of layer i (ReLU: no signs)"),
    rules=(
        Rule(D + "embed_tokens.weight", reads()),
        Rule(D + "embed_positions.weight", reads()),
        *layernorm_rules(L + "self_attn_layer_norm", L + "final_layer_norm", D + "final_layer_norm"),
        *(Rule(L + f"self_attn.{p}_proj.{w}", reads(HEAD_ROWS) if w == "weight" else (HEAD_ROWS,))
          for p in "qkv" for w in ("weight", "bias")),
        Rule(L + "self_attn.out_proj.weight", writes(HEAD_COLS)),
        Rule(L + "self_attn.out_proj.bias", writes()),
        Rule(L + "fc1.weight", reads(MLP_ROWS)),
        Rule(L + "fc1.bias", (MLP_ROWS,)),
        Rule(L + "fc2.weight", writes(MLP_COLS)),
        Rule(L + "fc2.bias", writes()),
        Rule("lm_head.weight", reads()),
        *HEAD_RULES,
    ),
    dims=head_dim,
    sites=Sites(layers=D + "layers", final_norm=D + "final_layer_norm", embed=D + "embed_tokens",
                inputs={"mlp.{i}": L + "fc2", "attn.{i}": L + "self_attn.out_proj"}),
)
