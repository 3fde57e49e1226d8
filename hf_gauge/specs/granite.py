"""IBM Granite (dense): the Llama layout with scalar multipliers.

``embedding_multiplier`` scales the embedding output, ``residual_multiplier`` each sublayer output before it is
added, ``attention_multiplier`` replaces ``1/sqrt(head_dim)`` and ``logits_scaling`` divides the logits: all
scalars, which commute with every signed permutation. Residual group B_d; MLP units (SwiGLU) signed on the
(up, down) pair, gate rows permuted only; query heads permute within KV groups and KV groups as wholes.
"""
from __future__ import annotations

from .base import ArchSpec, Sites, Space
from .decoder import decoder_rules, head_dim

GRANITE = ArchSpec(
    name="granite",
    model_types=("granite",),
    norm="rmsnorm",
    spaces={
        "residual": Space(lambda c: c.hidden_size, "any", "residual stream"),
        "mlp.{i}": Space(lambda c: c.intermediate_size, "any", "SwiGLU hidden units of layer i", per_layer=True),
        "attn.{i}": Space(lambda c: c.num_attention_heads, "none", "query heads of layer i", per_layer=True),
    },
    rules=decoder_rules("model.", ("input_layernorm", "post_attention_layernorm")),
    dims=head_dim,
    sites=Sites(layers="model.layers", final_norm="model.norm", embed="model.embed_tokens",
                mlp_in="model.layers.{i}.mlp.down_proj", attn_out_in="model.layers.{i}.self_attn.o_proj"),
)
