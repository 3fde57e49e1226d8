"""Gemma, Gemma 2 and Gemma 3 (text) decoders.

Residual group B_d. Gemma's RMSNorm computes ``x / rms(x) * (1 + w)``: the gain ``1 + w`` is permuted, never
signed, so ``w`` is permuted (``(1 + w)[perm] = 1 + w[perm]``). The embedding is scaled by ``sqrt(d)`` (a
scalar: commutes with every gauge). Gemma 2/3 put RMSNorms on both sides of each sublayer
(``input_layernorm`` -> attention -> ``post_attention_layernorm`` -> + residual; ``pre_feedforward_layernorm``
-> MLP -> ``post_feedforward_layernorm`` -> + residual): all four gains live on the residual and are permuted.
Attention and final-logit soft-capping act on scores and logits, which every gauge leaves unchanged.
MLP: GeGLU ``gelu_tanh(gate) * up``; GELU is not odd, so signs act on (up row, down column) only, as for SwiGLU.
Heads permute within KV groups and KV groups as wholes. Gemma 3's ``q_norm``/``k_norm`` gains are ``[head_dim]``
vectors shared by every head: untouched by residual and head gauges alike.
"""
from __future__ import annotations

from .base import ArchSpec, Sites, Space
from .decoder import decoder_rules, head_dim

_SPACES = {
    "residual": Space(lambda c: c.hidden_size, "any", "residual stream"),
    "mlp.{i}": Space(lambda c: c.intermediate_size, "any", "GeGLU hidden units of layer i", per_layer=True),
    "attn.{i}": Space(lambda c: c.num_attention_heads, "none", "query heads of layer i", per_layer=True),
}


def _sites(prefix: str) -> Sites:
    return Sites(layers=prefix + "layers", final_norm=prefix + "norm", embed=prefix + "embed_tokens",
                 mlp_in=prefix + "layers.{i}.mlp.down_proj", attn_out_in=prefix + "layers.{i}.self_attn.o_proj")


GEMMA = ArchSpec(
    name="gemma",
    model_types=("gemma",),
    norm="rmsnorm",
    spaces=_SPACES,
    rules=decoder_rules("model.", ("input_layernorm", "post_attention_layernorm")),
    dims=head_dim,
    sites=_sites("model."),
)

_SANDWICH = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")

GEMMA2 = ArchSpec(
    name="gemma2",
    model_types=("gemma2",),
    norm="rmsnorm",
    spaces=_SPACES,
    rules=decoder_rules("model.", _SANDWICH),
    dims=head_dim,
    sites=_sites("model."),
)

GEMMA3_TEXT = ArchSpec(
    name="gemma3_text",
    model_types=("gemma3_text",),
    norm="rmsnorm",
    spaces=_SPACES,
    rules=decoder_rules("model.", _SANDWICH, qk_norm=None),     # q_norm/k_norm [head_dim]: head space, untouched
    dims=head_dim,
    sites=_sites("model."),
)
