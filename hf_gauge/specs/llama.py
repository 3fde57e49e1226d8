"""Llama-family decoders: Llama, Mistral, Qwen2, Qwen3 (pre-RMSNorm, SwiGLU MLP, GQA attention).

Residual group B_d. MLP units of layer i: any permutation, signs act on the (up row, down column) pair only
(SiLU is not odd, so gate rows are permuted, never signed). Query heads permute within KV groups, and KV groups
as wholes; Qwen2's q/k/v biases and Qwen3's per-head q_norm/k_norm live in head space.
Declared fields: ``hidden_act`` (SiLU gate: ``LlamaMLP`` is ``down(act(gate x) * up x)``) and ``rms_norm_eps``
(``LlamaRMSNorm``). Biases (``attention_bias``, ``mlp_bias``, Qwen2's fixed q/k/v biases) all have rules; sliding
windows, RoPE parameters and ``head_dim`` act within heads and need no declaration.
"""
from __future__ import annotations

from .base import ArchSpec, Sites, Space
from .decoder import RMSNORM, SILU_GATE, decoder_rules, head_dim

LLAMA = ArchSpec(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    norm="rmsnorm",
    spaces={
        "residual": Space(lambda c: c.hidden_size, "any", "residual stream", kind="residual"),
        "mlp.{i}": Space(lambda c: c.intermediate_size, "any", "SwiGLU hidden units of layer i", kind="units"),
        "attn.{i}": Space(lambda c: c.num_attention_heads, "none", "query heads of layer i", kind="heads"),
    },
    rules=decoder_rules("model.", ("input_layernorm", "post_attention_layernorm")),
    dims=head_dim,
    requires=(SILU_GATE, RMSNORM),
    sites=Sites(
        layers="model.layers",
        final_norm="model.norm",
        embed="model.embed_tokens",
        inputs={"mlp.{i}": "model.layers.{i}.mlp.down_proj", "attn.{i}": "model.layers.{i}.self_attn.o_proj"},
    ),
)
