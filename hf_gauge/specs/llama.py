"""Llama-family decoders: Llama, Mistral, Qwen2, Qwen3 (pre-RMSNorm, SwiGLU MLP, GQA attention).

Residual group B_d. MLP units of layer i: any permutation, signs act on the (up row, down column) pair only
(SiLU is not odd, so gate rows are permuted, never signed). Query heads permute within KV groups, and KV groups
as wholes; Qwen2's q/k/v biases and Qwen3's per-head q_norm/k_norm live in head space.
"""
from __future__ import annotations

from .base import UNTOUCHED, ArchSpec, Axis, Rule, Sites, Space, gain, reads, writes
from .decoder import HEAD_RULES

L = "model.layers.{i}."
MLP = Axis(0, "mlp.{i}")                       # up_proj rows (and bias): signed
MLP_GATE = Axis(0, "mlp.{i}", signed=False)    # gate_proj rows (and bias): permute only
MLP_IN = Axis(1, "mlp.{i}")                    # down_proj columns: signed
Q_ROWS = Axis(0, "attn.{i}", signed=False, block="head_dim")
KV_ROWS = Axis(0, "attn.{i}", signed=False, block="head_dim", kv=True)
O_COLS = Axis(1, "attn.{i}", signed=False, block="head_dim")


def _dims(config) -> dict[str, int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"head_dim": head_dim}


LLAMA = ArchSpec(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    norm="rmsnorm",
    spaces={
        "residual": Space(lambda c: c.hidden_size, "any", "residual stream", kind="residual"),
        "mlp.{i}": Space(lambda c: c.intermediate_size, "any", "SwiGLU hidden units of layer i", kind="units"),
        "attn.{i}": Space(lambda c: c.num_attention_heads, "none", "query heads of layer i", kind="heads"),
    },
    rules=(
        Rule("model.embed_tokens.weight", reads()),
        Rule(L + "self_attn.q_proj.weight", reads(Q_ROWS)),
        Rule(L + "self_attn.k_proj.weight", reads(KV_ROWS)),
        Rule(L + "self_attn.v_proj.weight", reads(KV_ROWS)),
        Rule(L + "self_attn.q_proj.bias", (Q_ROWS,)),
        Rule(L + "self_attn.k_proj.bias", (KV_ROWS,)),
        Rule(L + "self_attn.v_proj.bias", (KV_ROWS,)),
        Rule(L + "self_attn.q_norm.weight", UNTOUCHED),
        Rule(L + "self_attn.k_norm.weight", UNTOUCHED),
        Rule(L + "self_attn.o_proj.weight", writes(O_COLS)),
        Rule(L + "self_attn.o_proj.bias", writes()),
        Rule(L + "mlp.gate_proj.weight", reads(MLP_GATE)),
        Rule(L + "mlp.up_proj.weight", reads(MLP)),
        Rule(L + "mlp.gate_proj.bias", (MLP_GATE,)),
        Rule(L + "mlp.up_proj.bias", (MLP,)),
        Rule(L + "mlp.down_proj.weight", writes(MLP_IN)),
        Rule(L + "mlp.down_proj.bias", writes()),
        Rule(L + "input_layernorm.weight", gain()),
        Rule(L + "post_attention_layernorm.weight", gain()),
        Rule("model.norm.weight", gain()),
        Rule("lm_head.weight", reads()),
        Rule("lm_head.bias", UNTOUCHED),
        *HEAD_RULES,
    ),
    dims=_dims,
    sites=Sites(
        layers="model.layers",
        final_norm="model.norm",
        embed="model.embed_tokens",
        inputs={"mlp.{i}": "model.layers.{i}.mlp.down_proj", "attn.{i}": "model.layers.{i}.self_attn.o_proj"},
    ),
)
