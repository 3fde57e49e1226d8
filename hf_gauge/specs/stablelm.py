"""StableLM (StableLM-3B-4E1T, StableLM 2): LayerNorm decoder with a gated (SwiGLU) MLP and partial rotary.

Residual group S_d x {±1}: ``input_layernorm``, ``post_attention_layernorm`` (absent under
``use_parallel_residual``, where one LayerNorm feeds attention and MLP in parallel) and the final ``norm`` are
LayerNorms (gains permuted, biases signed by the global sign). MLP units: ``down(act(gate x) * up x)``, signs act on
the (up row, down column) pair, gate rows are permuted only, as for Llama. Rotary covers the first
``partial_rotary_factor * head_dim`` dimensions of each head: heads permute as wholes within KV groups, KV groups as
wholes; the optional q/k/v biases (``use_qkv_bias``) move with their head blocks.

``qk_layernorm``: one LayerNorm per head (``q_layernorm.norms.{h}``, ``k_layernorm.norms.{h}``, each a
``[head_dim]`` gain with its own module). Inside a head they act in head space (untouched); a head permutation
carries each head's norm module to the head's new index (``Rule.carried``: query norms by the query-head
permutation, key norms by its KV-group reduction), renaming the tensors in live models, files and optimizer states.
Declared field: ``layer_norm_eps``. ``hidden_act`` (the gate's activation: unit signs ride on the linear up/down pair
for any gate activation), ``use_parallel_residual``, ``use_qkv_bias``, ``partial_rotary_factor`` need no declaration;
``qk_layernorm`` only adds the per-head norms.
"""
from __future__ import annotations

from .base import UNTOUCHED, ArchSpec, Axis, Rule, Sites, Space, reads
from .decoder import HEAD_RULES, attention_rules, gated_mlp_rules
from .layernorm import layernorm_eps, layernorm_rules

L = "model.layers.{i}."
A = L + "self_attn."


def _dims(config) -> dict[str, int]:
    return {"head_dim": config.hidden_size // config.num_attention_heads}      # StableLmAttention's head_dim


STABLELM = ArchSpec(
    name="stablelm",
    model_types=("stablelm",),
    norm="layernorm",
    spaces={
        "residual": Space(lambda c: c.hidden_size, "global", "residual stream", kind="residual"),
        "mlp.{i}": Space(lambda c: c.intermediate_size, "any", "SwiGLU hidden units of layer i", kind="units"),
        "attn.{i}": Space(lambda c: c.num_attention_heads, "none", "query heads of layer i", kind="heads"),
    },
    rules=(
        Rule("model.embed_tokens.weight", reads()),
        *attention_rules(L),
        *(Rule(A + f"{qk}_layernorm.norms.{{h}}.{w}", UNTOUCHED, carried={"h": head})
          for qk, head in (("q", Axis(0, "attn.{i}")), ("k", Axis(0, "attn.{i}", kv=True))) for w in ("weight", "bias")),
        *gated_mlp_rules(L),
        *layernorm_rules(L + "input_layernorm"),
        *layernorm_rules(L + "post_attention_layernorm"),
        *layernorm_rules("model.norm"),
        Rule("lm_head.weight", reads()),
        Rule("lm_head.bias", UNTOUCHED),
        *HEAD_RULES,
    ),
    dims=_dims,
    requires=(layernorm_eps("layer_norm_eps"),),
    sites=Sites(layers="model.layers", final_norm="model.norm", embed="model.embed_tokens",
                inputs={"mlp.{i}": L + "mlp.down_proj", "attn.{i}": A + "o_proj"}),
)
