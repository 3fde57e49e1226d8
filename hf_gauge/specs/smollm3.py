"""SmolLM3: the Llama layout where some layers use no rotary embedding (``no_rope_layers``).

RoPE rotates within each head's ``head_dim`` (it never touches the residual), and a layer without it is plain
attention: whole heads still permute within KV groups and KV groups as wholes, in every layer alike. Residual
group B_d; MLP units (SwiGLU) signed on the (up, down) pair, gate rows permuted only.
"""
from __future__ import annotations

from .base import ArchSpec, Sites, Space
from .decoder import decoder_rules, head_dim

SMOLLM3 = ArchSpec(
    name="smollm3",
    model_types=("smollm3",),
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
