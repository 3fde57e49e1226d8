"""Qwen3-Next: a hybrid decoder of Gated DeltaNet (linear attention) and gated full-attention layers, each followed by
a routed MoE with a sigmoid-gated shared expert (or, per ``mlp_only_layers`` / ``decoder_sparse_step``, a dense MLP).

Residual group B_d. Every norm on the residual (``input_layernorm``, ``post_attention_layernorm``, ``model.norm``) is
the zero-centred RMSNorm ``x / rms(x) * (1 + w)``: a per-channel gain, permuted and never signed. The sublayers read
the normalised residual (``in_proj_qkvz``, ``in_proj_ba``, q/k/v, the router, the experts, the shared expert and its
gate: columns signed-permuted) and write it (``out_proj``, ``o_proj``, the experts' and the shared expert's down
projections: rows signed-permuted).

Inner spaces:
- ``moe.{i}``, ``experts.{i}.{e}``, ``shared.{i}``: as Qwen2-MoE (``specs/moe.py``): experts as wholes with their
  router rows (permutations only: softmax is not odd), each expert's SwiGLU units (signs on the up row / down column
  pair), the shared expert's units; its gate ``shared_expert_gate [1, d]`` reads the residual.

Declared fields: ``hidden_act`` (the SwiGLU experts, the shared expert, and the DeltaNet conv1d's activation) and
``rms_norm_eps``; ``mlp_only_layers`` and ``decoder_sparse_step`` (every layer routes to experts). ``attention_bias``,
``partial_rotary_factor`` and the RoPE settings act inside a head and need no declaration.
Checkpoint files store the experts one tensor per expert (``mlp.experts.{e}.gate_proj.weight``; ``file_rules``).
"""
from __future__ import annotations

from .base import UNTOUCHED, ArchSpec, Rule, Sites, reads, writes
from .decoder import HEAD_RULES, RMSNORM, SILU_GATE, head_dim
from .moe import QWEN_SPARSE, QWEN2_MOE

L = "model.layers.{i}."
A = L + "self_attn."
D = L + "linear_attn."

_ATTENTION = (
    Rule(A + "q_proj.weight", reads()),          # rows [head, (q | output gate), head_dim]
    Rule(A + "k_proj.weight", reads()),
    Rule(A + "v_proj.weight", reads()),
    Rule(A + "q_proj.bias", UNTOUCHED),
    Rule(A + "k_proj.bias", UNTOUCHED),
    Rule(A + "v_proj.bias", UNTOUCHED),
    Rule(A + "q_norm.weight", UNTOUCHED),        # [head_dim], shared by every head
    Rule(A + "k_norm.weight", UNTOUCHED),
    Rule(A + "o_proj.weight", writes()),
    Rule(A + "o_proj.bias", writes()),
)

_DELTANET = (
    Rule(D + "in_proj_qkvz.weight", reads()),
    Rule(D + "in_proj_ba.weight", reads()),
    Rule(D + "conv1d.weight", UNTOUCHED),
    Rule(D + "A_log", UNTOUCHED),
    Rule(D + "dt_bias", UNTOUCHED),
    Rule(D + "norm.weight", UNTOUCHED),          # gated RMSNorm over head_v_dim, shared by every head
    Rule(D + "out_proj.weight", writes()),
)

_MOE_RULES = tuple(r for r in QWEN2_MOE.rules if ".mlp." in r.pattern)
_NORMS = tuple(r for r in QWEN2_MOE.rules if not r.pattern.startswith(L) or "layernorm" in r.pattern)

QWEN3_NEXT = ArchSpec(
    name="qwen3_next",
    model_types=("qwen3_next",),
    norm="rmsnorm",
    spaces={t: sp for t, sp in QWEN2_MOE.spaces.items() if t != "attn.{i}"},
    rules=_ATTENTION + _DELTANET + _MOE_RULES + _NORMS,
    file_rules=QWEN2_MOE.file_rules,
    dims=head_dim,
    sites=Sites(layers="model.layers", final_norm="model.norm", embed="model.embed_tokens",
                inputs={"shared.{i}": L + "mlp.shared_expert.down_proj"}),
    requires=(SILU_GATE, RMSNORM) + QWEN_SPARSE,
)
