"""Gemma, Gemma 2 and Gemma 3 decoders (text-only, and the text model inside multimodal Gemma 3).

Residual group B_d. Gemma's RMSNorm computes ``x / rms(x) * (1 + w)``: the gain ``1 + w`` is permuted, never
signed, so ``w`` is permuted (``(1 + w)[perm] = 1 + w[perm]``). The embedding is scaled by ``sqrt(d)`` (a
scalar: commutes with every gauge). Gemma 2/3 put RMSNorms on both sides of each sublayer
(``input_layernorm`` -> attention -> ``post_attention_layernorm`` -> + residual; ``pre_feedforward_layernorm``
-> MLP -> ``post_feedforward_layernorm`` -> + residual): all four gains live on the residual and are permuted.
Attention and final-logit soft-capping act on scores and logits, which every gauge leaves unchanged.
MLP: GeGLU ``gelu_tanh(gate) * up``; GELU is not odd, so signs act on (up row, down column) only, as for SwiGLU.
Heads permute within KV groups and KV groups as wholes. Gemma 3's ``q_norm``/``k_norm`` gains are ``[head_dim]``
vectors shared by every head: untouched by residual and head gauges alike.
Declared fields: the GeGLU gate's activation (``hidden_act`` in Gemma, ``hidden_activation`` in Gemma 2/3, the field
each modeling file reads) and ``rms_norm_eps``; soft-capping, ``query_pre_attn_scalar`` and sliding windows act on
scores and need no declaration.
"""
from __future__ import annotations

from dataclasses import replace

from .base import UNTOUCHED, ArchSpec, Axis, Rule, Sites, Space
from .decoder import RMSNORM, decoder_rules, gelu_gate, head_dim

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
    requires=(gelu_gate("hidden_act"), RMSNORM),             # GemmaMLP reads config.hidden_act
    sites=_sites("model."),
)

_SANDWICH = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
_SANDWICH_REQUIRES = (gelu_gate("hidden_activation"), RMSNORM)   # Gemma2MLP / Gemma3MLP read hidden_activation

GEMMA2 = ArchSpec(
    name="gemma2",
    model_types=("gemma2",),
    norm="rmsnorm",
    spaces=_SPACES,
    rules=decoder_rules("model.", _SANDWICH),
    dims=head_dim,
    requires=_SANDWICH_REQUIRES,
    sites=_sites("model."),
)

GEMMA3_TEXT = ArchSpec(
    name="gemma3_text",
    model_types=("gemma3_text",),
    norm="rmsnorm",
    spaces=_SPACES,
    rules=decoder_rules("model.", _SANDWICH, qk_norm=None),     # q_norm/k_norm [head_dim]: head space, untouched
    dims=head_dim,
    requires=_SANDWICH_REQUIRES,
    sites=_sites("model."),
)

# VaultGemma (``modular_vaultgemma.py``): Gemma 2's attention, GeGLU MLP and (1 + w) RMSNorm, but only the pre-norms
# (``input_layernorm``, ``pre_feedforward_layernorm``): no post-sublayer norms, so its own rules name exactly those.
VAULTGEMMA = ArchSpec(
    name="vaultgemma",
    model_types=("vaultgemma",),
    norm="rmsnorm",
    spaces=_SPACES,
    rules=decoder_rules("model.", ("input_layernorm", "pre_feedforward_layernorm")),
    dims=head_dim,
    requires=_SANDWICH_REQUIRES,
    sites=_sites("model."),
)

# --- Gemma 3 multimodal (``Gemma3ForConditionalGeneration``): the text decoder under ``model.language_model``.
# The SigLIP vision tower never touches the text residual (untouched). The projector ends in
# ``pooled @ mm_input_projection_weight`` (``[vision_dim, d]``), whose output replaces the image tokens' embeddings:
# it WRITES the text residual, so its residual axis (1) is signed-permuted like the token embedding's columns. Its
# ``mm_soft_emb_norm`` normalises vision features (untouched). Residual group B_d, as for gemma3_text; dimensions
# come from ``config.text_config`` (``hf_gauge.view.ConfigView``).
# Checkpoint files keep the older layout (``language_model.model.*``, ``language_model.lm_head``, ``vision_tower.*``
# or ``vision_tower.vision_model.*``, ``multi_modal_projector.*``): those names get the same rules.
def _vision_untouched(tower: str) -> tuple[Rule, ...]:
    layer = tower + "encoder.layers.{i}."
    names = (
        tower + "embeddings.patch_embedding.weight", tower + "embeddings.patch_embedding.bias",
        tower + "embeddings.position_embedding.weight",
        *(layer + m + "." + w for m in ("layer_norm1", "layer_norm2", "self_attn.q_proj", "self_attn.k_proj",
                                        "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
          for w in ("weight", "bias")),
        tower + "post_layernorm.weight", tower + "post_layernorm.bias",
        tower + "head.probe", tower + "head.attention.in_proj_weight", tower + "head.attention.in_proj_bias",
        *(tower + "head." + m + "." + w for m in ("attention.out_proj", "layernorm", "mlp.fc1", "mlp.fc2")
          for w in ("weight", "bias")),
    )
    return tuple(Rule(n, UNTOUCHED) for n in names)


def _projector(prefix: str) -> tuple[Rule, ...]:
    return (Rule(prefix + "multi_modal_projector.mm_input_projection_weight", (Axis(1, "residual"),)),
            Rule(prefix + "multi_modal_projector.mm_soft_emb_norm.weight", UNTOUCHED))


GEMMA3 = ArchSpec(
    name="gemma3",
    model_types=("gemma3",),
    norm="rmsnorm",
    spaces=_SPACES,
    rules=(decoder_rules("model.language_model.", _SANDWICH, qk_norm=None)           # live module names
           + _projector("model.") + _vision_untouched("model.vision_tower.")
           + decoder_rules("language_model.model.", _SANDWICH, qk_norm=None,           # checkpoint file names
                           lm_head="language_model.lm_head", heads=False)
           + _projector("") + _vision_untouched("vision_tower.") + _vision_untouched("vision_tower.vision_model.")),
    dims=head_dim,
    requires=_SANDWICH_REQUIRES,
    sites=replace(_sites("model.language_model."), final_norm_files=("language_model.model.norm.weight",)),
)
