"""PhiMoE (``phimoe``, Phi-3.5-MoE): a MoE decoder whose residual norms are ``nn.LayerNorm`` with bias.

``PhimoeDecoderLayer`` and ``PhimoeModel.norm`` are ``nn.LayerNorm(hidden_size, eps=config.rms_norm_eps)`` despite
the field's name: mean-centring, so the residual group is S_d x {±1} (a permutation and one global sign), each
LayerNorm's gain permuted and its bias signed (``specs/layernorm.py``). Inside:
- ``moe.{i}``: the experts as wholes, permutations only. The router ``mlp.router.weight [E, d]`` (on disk
  ``block_sparse_moe.gate.weight``) feeds ``sparsemixer``: a max, a relative-threshold mask and softmaxes over the
  experts, all equivariant under a permutation of them (ties aside), never under a sign.
- ``experts.{i}.{e}``: each expert's SwiGLU units (signed on up/down; the signs live inside the expert, untouched by
  LayerNorm), carried by ``moe.{i}``; on disk ``block_sparse_moe.experts.{e}.w1`` (gate), ``w3`` (up), ``w2``.
- ``attn.{i}``: query heads within KV groups (``attention_bias``: q/k/v/o biases have rules).
``lm_head_bias`` lies in vocabulary space (untouched); the jitter noises act in training only.
Declared fields: ``hidden_act`` (SiLU gate) and ``rms_norm_eps`` (the LayerNorms' epsilon, which must be present).
"""
from __future__ import annotations

from .base import Requires
from .decoder import SILU_GATE
from .moe import moe_spec

PHIMOE = moe_spec(
    "phimoe", lambda c: c.num_local_experts, lambda c: c.intermediate_size, ("block_sparse_moe", "w1", "w3", "w2"),
    router="router", layernorm=True,
    requires=(SILU_GATE, Requires("rms_norm_eps", (float,), "PhiMoE's residual norms are nn.LayerNorm with bias "
                                  "(eps from rms_norm_eps), which mean-centre: the S_d x {±1} group and the signed "
                                  "LayerNorm biases are derived for them")),
)
