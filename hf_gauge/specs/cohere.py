"""Cohere (Command-R): a parallel block on one weight-only LayerNorm, SwiGLU MLP, optional per-head q/k LayerNorm.

``CohereDecoderLayer``: ``h = x + attn(ln(x)) + mlp(ln(x))`` with one ``input_layernorm``. ``CohereLayerNorm`` is
``(x - mean x) / std(x) * w`` with no bias: it still mean-centres, so of the residual's signed permutations only
``Q = s P`` (a global sign ``s``) commutes with it: ``LN(s P x) = s P LN(x)`` when ``w`` is permuted, never signed
(``mean(s P x) = s mean(x)``, ``std(s P x) = std(x)``). With no bias there is nothing else to flip, so ``s = -1`` is
admitted: residual group S_d x {±1}. The sublayers' readers absorb ``s`` in their columns, the writers (o_proj,
down_proj and their biases) carry it in their rows, the embedding and (tied) ``lm_head`` in their columns.
``logit_scale`` multiplies the logits (a scalar). MLP: ``down(silu(gate x) * up x)``: signs on the (up, down) pair,
gate rows permuted only. Heads: query heads within KV groups, KV groups as wholes; RoPE (interleaved pairs) rotates
within each head. ``use_qk_norm`` adds ``q_norm.weight [n_heads, head_dim]`` and ``k_norm.weight [n_kv, head_dim]``:
a LayerNorm over each head's ``head_dim`` with a gain row per head, which moves with its head (axis 0 indexes heads).
Registered as Llama (signed residual), the function broke (relative logit error 0.48).
Declared fields: ``hidden_act`` (SiLU gate) and ``layer_norm_eps`` (the mean-centring LayerNorm).
"""
from __future__ import annotations

from .base import ArchSpec, Axis, Requires, Sites, Space
from .decoder import SILU_GATE, decoder_rules, head_dim

COHERE = ArchSpec(
    name="cohere",
    model_types=("cohere",),
    norm="layernorm",
    spaces={
        "residual": Space(lambda c: c.hidden_size, "global", "residual stream", kind="residual"),
        "mlp.{i}": Space(lambda c: c.intermediate_size, "any", "SwiGLU hidden units of layer i", kind="units"),
        "attn.{i}": Space(lambda c: c.num_attention_heads, "none", "query heads of layer i", kind="heads"),
    },
    rules=decoder_rules("model.", ("input_layernorm",), qk_norm=(Axis(0, "attn.{i}", signed=False),)),
    dims=head_dim,
    requires=(SILU_GATE,
              Requires("layer_norm_eps", (float,),
                       "CohereLayerNorm mean-centres, which this spec's S_d x {±1} residual group is derived for")),
    sites=Sites(layers="model.layers", final_norm="model.norm", embed="model.embed_tokens",
                inputs={"mlp.{i}": "model.layers.{i}.mlp.down_proj", "attn.{i}": "model.layers.{i}.self_attn.o_proj"}),
)
