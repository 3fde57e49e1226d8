"""Phi-3: a Llama-like decoder whose projections are fused, declared with segmented axes.

``qkv_proj`` rows are ``[q (n_heads * head_dim) | k (n_kv * head_dim) | v (n_kv * head_dim)]``: the query segment
moves with the query-head permutation, the key and value segments with its KV-group reduction. ``gate_up_proj`` rows
are ``[gate (d_ff) | up (d_ff)]``: both segments move with the MLP-unit permutation, only the up segment is signed
(SiLU is not odd). Residual group B_d (RMSNorm), as for Llama. Declared fields: ``hidden_act`` (``Phi3MLP``:
``up * act(gate)`` after splitting ``gate_up_proj``) and ``rms_norm_eps``.
"""
from __future__ import annotations

from .base import ArchSpec, Axis, Rule, Sites, Space, gain, reads, segmented, writes
from .decoder import HEAD_RULES, RMSNORM, SILU_GATE

L = "model.layers.{i}."
QKV_ROWS = segmented(0,
                     Axis(0, "attn.{i}", signed=False, block="head_dim"),
                     Axis(0, "attn.{i}", signed=False, block="head_dim", kv=True),
                     Axis(0, "attn.{i}", signed=False, block="head_dim", kv=True))
GATE_UP_ROWS = segmented(0, Axis(0, "mlp.{i}", signed=False), Axis(0, "mlp.{i}"))
O_COLS = Axis(1, "attn.{i}", signed=False, block="head_dim")
DOWN_COLS = Axis(1, "mlp.{i}")


def _dims(config) -> dict[str, int]:
    return {"head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads}


PHI3 = ArchSpec(
    name="phi3",
    model_types=("phi3",),
    norm="rmsnorm",
    spaces={
        "residual": Space(lambda c: c.hidden_size, "any", "residual stream", kind="residual"),
        "mlp.{i}": Space(lambda c: c.intermediate_size, "any", "SwiGLU hidden units of layer i", kind="units"),
        "attn.{i}": Space(lambda c: c.num_attention_heads, "none", "query heads of layer i", kind="heads"),
    },
    rules=(
        Rule("model.embed_tokens.weight", reads()),
        Rule(L + "self_attn.qkv_proj.weight", reads(QKV_ROWS)),
        Rule(L + "self_attn.qkv_proj.bias", (QKV_ROWS,)),
        Rule(L + "self_attn.o_proj.weight", writes(O_COLS)),
        Rule(L + "self_attn.o_proj.bias", writes()),
        Rule(L + "mlp.gate_up_proj.weight", reads(GATE_UP_ROWS)),
        Rule(L + "mlp.gate_up_proj.bias", (GATE_UP_ROWS,)),
        Rule(L + "mlp.down_proj.weight", writes(DOWN_COLS)),
        Rule(L + "mlp.down_proj.bias", writes()),
        Rule(L + "input_layernorm.weight", gain()),
        Rule(L + "post_attention_layernorm.weight", gain()),
        Rule("model.norm.weight", gain()),
        Rule("lm_head.weight", reads()),
        Rule("lm_head.bias", ()),
        *HEAD_RULES,
    ),
    dims=_dims,
    requires=(SILU_GATE, RMSNORM),
    sites=Sites(layers="model.layers", final_norm="model.norm", embed="model.embed_tokens",
                inputs={"mlp.{i}": "model.layers.{i}.mlp.down_proj", "attn.{i}": "model.layers.{i}.self_attn.o_proj"}),
)
