"""GPT-NeoX / Pythia: the LayerNorm contrast.

LayerNorm's mean-centring admits only ``Q 1 = ±1``: residual group S_d x {±1} (permutations, plus one global
sign flip that also flips every LayerNorm bias: ``LN(s P x) = s P LN(x)`` needs gain ``P g``, bias ``s P b``).
GELU is not odd: MLP units permute only. The fused query_key_value rows are laid out per head as
``[head, (q|k|v), head_dim]``, so a head is a block of ``3 * head_dim`` rows.
Declared field: ``layer_norm_eps`` (``nn.LayerNorm`` with bias: the mean-centring norm the global-sign group is
derived for). ``hidden_act`` needs no declaration: unsigned unit permutations commute with every elementwise
activation. ``use_parallel_residual`` neither: both ``x + attn(ln1 x) + mlp(ln2 x)`` and the sequential form read
and write the residual through the same rules. ``rotary_pct`` rotates within heads, which permute as wholes.
"""
from __future__ import annotations

from .base import UNTOUCHED, ArchSpec, Axis, Requires, Rule, Sites, Space, reads, writes
from .decoder import HEAD_RULES
from .layernorm import layernorm_rules

L = "gpt_neox.layers.{i}."
MLP_ROWS = Axis(0, "mlp.{i}", signed=False)
MLP_COLS = Axis(1, "mlp.{i}", signed=False)
QKV_ROWS = Axis(0, "attn.{i}", signed=False, block="qkv_block")
DENSE_COLS = Axis(1, "attn.{i}", signed=False, block="head_dim")


def _dims(config) -> dict[str, int]:
    head_dim = config.hidden_size // config.num_attention_heads
    return {"head_dim": head_dim, "qkv_block": 3 * head_dim}


GPT_NEOX = ArchSpec(
    name="gpt_neox",
    model_types=("gpt_neox",),
    norm="layernorm",
    spaces={
        "residual": Space(lambda c: c.hidden_size, "global", "residual stream", kind="residual"),
        "mlp.{i}": Space(lambda c: c.intermediate_size, "none", "GELU hidden units of layer i", kind="units"),
        "attn.{i}": Space(lambda c: c.num_attention_heads, "none", "attention heads of layer i", kind="heads"),
    },
    rules=(
        Rule("gpt_neox.embed_in.weight", reads()),
        *layernorm_rules(L + "input_layernorm", L + "post_attention_layernorm", "gpt_neox.final_layer_norm"),
        Rule(L + "attention.query_key_value.weight", reads(QKV_ROWS)),
        Rule(L + "attention.query_key_value.bias", (QKV_ROWS,)),
        Rule(L + "attention.dense.weight", writes(DENSE_COLS)),
        Rule(L + "attention.dense.bias", writes()),
        Rule(L + "mlp.dense_h_to_4h.weight", reads(MLP_ROWS)),
        Rule(L + "mlp.dense_h_to_4h.bias", (MLP_ROWS,)),
        Rule(L + "mlp.dense_4h_to_h.weight", writes(MLP_COLS)),
        Rule(L + "mlp.dense_4h_to_h.bias", writes()),
        Rule("embed_out.weight", reads()),
        Rule("lm_head.weight", reads()),
        Rule("gpt_neox.layers.{i}.attention.rotary_emb.inv_freq", UNTOUCHED),
        *HEAD_RULES,
    ),
    dims=_dims,
    requires=(Requires("layer_norm_eps", (float,),
                       "GPTNeoXLayer's nn.LayerNorm mean-centres, which this spec's S_d x {±1} group and signed "
                       "LayerNorm biases are derived for"),),
    sites=Sites(
        layers="gpt_neox.layers",
        final_norm="gpt_neox.final_layer_norm",
        embed="gpt_neox.embed_in",
        inputs={"mlp.{i}": "gpt_neox.layers.{i}.mlp.dense_4h_to_h", "attn.{i}": "gpt_neox.layers.{i}.attention.dense"},
    ),
)
