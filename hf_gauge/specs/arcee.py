"""Arcee (AFM): Llama's attention and names with a gateless ReLU² MLP, ``down_proj(relu(up_proj x) ** 2)``.

Residual group B_d (``ArceeRMSNorm``), as for Llama. MLP units: permutations only. A unit's sign would have to pass
through ``relu²``, which is even on its support and not odd (``relu(-x)² != -relu(x)²``), and there is no linear
gate-free factor to carry it, so ``signs="none"`` and the up rows / down columns are permuted, never signed.
Registered as Llama, signed units gave a relative logit error of 1.22. Query heads permute within KV groups and KV
groups as wholes. Declared field: ``rms_norm_eps``; ``hidden_act`` needs none (unsigned permutations commute with
every elementwise activation).
"""
from __future__ import annotations

from .base import ArchSpec, Sites, Space
from .decoder import RMSNORM, decoder_rules, head_dim

ARCEE = ArchSpec(
    name="arcee",
    model_types=("arcee",),
    norm="rmsnorm",
    spaces={
        "residual": Space(lambda c: c.hidden_size, "any", "residual stream", kind="residual"),
        "mlp.{i}": Space(lambda c: c.intermediate_size, "none", "ReLU² hidden units of layer i", kind="units"),
        "attn.{i}": Space(lambda c: c.num_attention_heads, "none", "query heads of layer i", kind="heads"),
    },
    rules=decoder_rules("model.", ("input_layernorm", "post_attention_layernorm"), gated=False),
    dims=head_dim,
    requires=(RMSNORM,),
    sites=Sites(layers="model.layers", final_norm="model.norm", embed="model.embed_tokens",
                inputs={"mlp.{i}": "model.layers.{i}.mlp.down_proj", "attn.{i}": "model.layers.{i}.self_attn.o_proj"}),
)
