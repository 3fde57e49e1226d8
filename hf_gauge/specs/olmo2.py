"""OLMo 2 and OLMo 3: RMSNorms on the sublayer outputs, and q/k RMSNorms over the whole projection.

OLMo 3 (``modular_olmo3.py``) is OLMo 2's layer with sliding-window attention on some layers (``layer_types``) and
per-layer-type RoPE: both act within heads, so the rules and groups are OLMo 2's.

A layer computes ``h + post_attention_layernorm(attn(h))`` then ``h + post_feedforward_layernorm(mlp(h))``: the
sublayers read the raw residual (their readers' columns move), and each post-norm normalises a writer's output
``W_o y`` whose rows the gauge moves: ``rms(Q y)`` is invariant and ``Q diag(g) = diag(P g) Q``, so the gains are
permuted, never signed. The final norm likewise. Residual group B_d.

``q_norm`` (``[n_heads * head_dim]``) and ``k_norm`` (``[n_kv_heads * head_dim]``) normalise the projection of all
heads jointly: the rms over the whole vector is invariant under a permutation of head blocks, and the gain moves
with its head block. Heads therefore permute (within KV groups, KV groups as wholes) carrying their q/k norm
blocks; no sign or in-head map is admitted. MLP units (SwiGLU): signed on the (up, down) pair, gate rows permuted.
Declared fields: ``hidden_act`` (``Olmo2MLP``'s SiLU gate) and ``rms_norm_eps``.
"""
from __future__ import annotations

from .base import ArchSpec, Axis, Sites, Space
from .decoder import RMSNORM, SILU_GATE, decoder_rules, head_dim

OLMO2 = ArchSpec(
    name="olmo2",
    model_types=("olmo2", "olmo3"),
    norm="rmsnorm",
    spaces={
        "residual": Space(lambda c: c.hidden_size, "any", "residual stream"),
        "mlp.{i}": Space(lambda c: c.intermediate_size, "any", "SwiGLU hidden units of layer i", per_layer=True),
        "attn.{i}": Space(lambda c: c.num_attention_heads, "none", "query heads of layer i", per_layer=True),
    },
    rules=decoder_rules("model.", ("post_attention_layernorm", "post_feedforward_layernorm"),
                        qk_norm=(Axis(0, "attn.{i}", signed=False, block="head_dim"),)),
    dims=head_dim,
    requires=(SILU_GATE, RMSNORM),
    sites=Sites(layers="model.layers", final_norm="model.norm", embed="model.embed_tokens",
                mlp_in="model.layers.{i}.mlp.down_proj", attn_out_in="model.layers.{i}.self_attn.o_proj"),
)
