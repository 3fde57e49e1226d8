"""Qwen3-Next: a hybrid decoder of Gated DeltaNet (linear attention) and gated full-attention layers
(``layer_types``), each followed by a routed MoE with a sigmoid-gated shared expert or, per ``mlp_only_layers`` and
``decoder_sparse_step``, a dense SwiGLU MLP.

Residual group B_d. Every norm on the residual (``input_layernorm``, ``post_attention_layernorm``, ``model.norm``) is
the zero-centred RMSNorm ``x / rms(x) * (1 + w)``: a per-channel gain, permuted and never signed. The sublayers read
the normalised residual (``in_proj_qkvz``, ``in_proj_ba``, q/k/v, the router, the experts, the shared expert and its
gate: columns signed-permuted) and write it (``out_proj``, ``o_proj``, the down projections: rows signed-permuted).

Inner spaces (each on the layers that have it: ``layers_where``):
- ``lin.{i}`` (kind ``linear_heads``, DeltaNet layers): the value heads, permutations only. ``in_proj_qkvz`` rows are
  ``[key head g, (q | k | its value heads' v | their z)]`` and ``in_proj_ba`` rows ``[g, (b | a)]`` (one entry per
  value head), interleaved over the ``linear_num_key_heads`` groups; ``conv1d`` channels are ``[q | k | v]``;
  ``A_log`` and ``dt_bias`` hold one entry per value head; ``out_proj`` columns ``linear_value_head_dim`` per head.
  ``num_v / num_k`` consecutive value heads share one query/key head, so they permute within that group and the
  groups as wholes (q and k rows move by the group permutation). No signs: q, k and v pass through the depthwise
  conv1d and SiLU, z through SiLU, b through a sigmoid and a through softplus, none of them odd. The gated RMSNorm
  ``norm(o) * silu(z)`` acts on ``[head_v_dim]`` with one gain shared by every head: untouched. Not covered: a
  permutation of the key dimensions (the same on q and k in every head; the l2 norm and q.k are invariant) or of the
  value dimensions (the same on v, z, the shared norm gain and out_proj in every head) is a symmetry too, but the
  spec format cannot write one permutation repeated inside each block of a fused axis.
- ``attn.{i}`` (full-attention layers): query heads within KV groups, KV groups as wholes. ``q_proj`` rows are
  ``[head, (q | output gate), head_dim]`` (interleaved over the heads); the gate ``sigmoid`` is not odd, and partial
  rotary and the ``[head_dim]`` q/k norms act inside a head.
- ``moe.{i}``, ``experts.{i}.{e}``, ``shared.{i}`` (MoE layers): as Qwen2-MoE (``specs/moe.py``): experts as wholes
  with their router rows (softmax is not odd), each expert's SwiGLU units (signs on the up row / down column pair),
  the shared expert's units; its gate ``shared_expert_gate [1, d]`` reads the residual.
- ``mlp.{i}`` (dense layers): SwiGLU units.

The DeltaNet computes in float32 whatever the model's dtype (transformers' reference kernel), so a gauged model's
logits equal the original's to float32 rounding of its reordered sums (relative ~1e-5 on the tiny test configs; the
same LoRA model's float32 and float64 logits differ as much); the moves themselves are bit-exact index operations.

Declared fields: ``hidden_act`` (the SwiGLU gates) and ``rms_norm_eps``. ``layer_types``, ``mlp_only_layers``,
``decoder_sparse_step`` and ``num_experts`` pick each layer's mixer and MLP, which the layer ranges follow;
``attention_bias``, ``partial_rotary_factor`` and the RoPE settings act inside a head.
Checkpoint files store the experts one tensor per expert (``mlp.experts.{e}.gate_proj.weight``; ``file_rules``).
Qwen3-Next releases also hold a multi-token-prediction module (``mtp.*``, dropped by transformers on load, run by
vLLM and SGLang): ``fc [d, 2d]`` reads ``[pre_fc_norm_embedding(embed) | pre_fc_norm_hidden(h)]``, both halves in the
residual chart, and writes the MTP layers' residual; those layers are full-attention MoE decoder layers and
``mtp.norm`` is the final norm. File paths (streaming apply, find and verify from files) move them with the residual
(``file_rules``; their heads and experts stay: the gauge has no spaces for them), so a transformed checkpoint keeps a
working MTP head.
"""
from __future__ import annotations

from .base import UNTOUCHED, ArchSpec, Axis, Rule, Sites, Space, gain, layers_where, reads, segmented, writes
from .decoder import HEAD_RULES, KV_ROWS, O_COLS, Q_ROWS, RMSNORM, SILU_GATE, gated_mlp_rules
from .moe import QWEN_DISK, expert_file_rules, expert_rules, moe_spaces, norm_rules, qwen_moe_layer, shared_rules

L = "model.layers.{i}."
A = L + "self_attn."
D = L + "linear_attn."


def is_linear(config, i: int) -> bool:
    """Layer ``i`` mixes with a Gated DeltaNet."""
    return config.layer_types[i] == "linear_attention"


def _dims(config) -> dict[str, int]:
    return {"head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            "heads": config.num_attention_heads, "lin_k_heads": config.linear_num_key_heads,
            "lin_k_dim": config.linear_key_head_dim, "lin_v_dim": config.linear_value_head_dim}


Q_GATE_ROWS = segmented(0, Q_ROWS, Q_ROWS, groups="heads")                     # q_proj: [head, (q | gate)]
LQK = Axis(0, "lin.{i}", signed=False, block="lin_k_dim", kv=True)             # q, k: one key head's rows
LVZ = Axis(0, "lin.{i}", signed=False, block="lin_v_dim")                      # v, z: one value head's rows
LHEAD = Axis(0, "lin.{i}", signed=False)                                       # b, a, A_log, dt_bias

_ATTENTION = (
    Rule(A + "q_proj.weight", reads(Q_GATE_ROWS)),
    Rule(A + "q_proj.bias", (Q_GATE_ROWS,)),
    Rule(A + "k_proj.weight", reads(KV_ROWS)),
    Rule(A + "k_proj.bias", (KV_ROWS,)),
    Rule(A + "v_proj.weight", reads(KV_ROWS)),
    Rule(A + "v_proj.bias", (KV_ROWS,)),
    Rule(A + "q_norm.weight", UNTOUCHED),        # [head_dim], shared by every head
    Rule(A + "k_norm.weight", UNTOUCHED),
    Rule(A + "o_proj.weight", writes(O_COLS)),
    Rule(A + "o_proj.bias", writes()),
)

_DELTANET = (
    Rule(D + "in_proj_qkvz.weight", reads(segmented(0, LQK, LQK, LVZ, LVZ, groups="lin_k_heads"))),
    Rule(D + "in_proj_ba.weight", reads(segmented(0, LHEAD, LHEAD, groups="lin_k_heads"))),
    Rule(D + "conv1d.weight", (segmented(0, LQK, LQK, LVZ),)),
    Rule(D + "A_log", (LHEAD,)),
    Rule(D + "dt_bias", (LHEAD,)),
    Rule(D + "norm.weight", UNTOUCHED),          # gated RMSNorm over head_v_dim, shared by every head
    Rule(D + "out_proj.weight", writes(Axis(1, "lin.{i}", signed=False, block="lin_v_dim"))),
)

_MOE_RULES = (*expert_rules("mlp"), *shared_rules(L + "mlp.shared_expert"),
              Rule(L + "mlp.shared_expert_gate.weight", reads()))
T = "mtp.layers.{j}."          # {j}, {x}: MTP layers and experts, which no gauge space indexes
_MTP = (
    Rule("mtp.fc.weight", writes(segmented(1, Axis(1, "residual"), Axis(1, "residual")))),
    Rule("mtp.pre_fc_norm_embedding.weight", gain()),
    Rule("mtp.pre_fc_norm_hidden.weight", gain()),
    Rule("mtp.norm.weight", gain()),
    *(Rule(T + n + ".weight", gain()) for n in ("input_layernorm", "post_attention_layernorm")),
    *(Rule(T + "self_attn." + n + ".weight", reads()) for n in ("q_proj", "k_proj", "v_proj")),
    *(Rule(T + "self_attn." + n + ".bias", UNTOUCHED) for n in ("q_proj", "k_proj", "v_proj")),
    Rule(T + "self_attn.q_norm.weight", UNTOUCHED),
    Rule(T + "self_attn.k_norm.weight", UNTOUCHED),
    Rule(T + "self_attn.o_proj.weight", writes()),
    Rule(T + "self_attn.o_proj.bias", writes()),
    *(Rule(T + "mlp." + m + n + ".weight", reads()) for m in ("", "shared_expert.", "experts.{x}.")
      for n in ("gate_proj", "up_proj")),
    *(Rule(T + "mlp." + m + "down_proj.weight", writes()) for m in ("", "shared_expert.", "experts.{x}.")),
    Rule(T + "mlp.gate.weight", reads()),
    Rule(T + "mlp.shared_expert_gate.weight", reads()),
)
_ENDS = (Rule("model.embed_tokens.weight", reads()), *norm_rules(), Rule("lm_head.weight", reads()), *HEAD_RULES)

QWEN3_NEXT = ArchSpec(
    name="qwen3_next",
    model_types=("qwen3_next",),
    norm="rmsnorm",
    spaces={
        **moe_spaces(lambda c: c.num_experts, lambda c: c.moe_intermediate_size, moe_layers=qwen_moe_layer,
                     dense_size=lambda c: c.intermediate_size,
                     shared_size=lambda c: c.shared_expert_intermediate_size),
        "attn.{i}": Space(lambda c: c.num_attention_heads, "none", "query heads of layer i", kind="heads",
                          ranges={"i": layers_where(lambda c, i: not is_linear(c, i))}),
        "lin.{i}": Space(lambda c: c.linear_num_value_heads, "none", "Gated DeltaNet value heads of layer i",
                         kind="linear_heads", ranges={"i": layers_where(is_linear)}),
    },
    rules=_ATTENTION + _DELTANET + gated_mlp_rules(L) + _MOE_RULES + _ENDS,
    file_rules=expert_file_rules("mlp", "gate", *QWEN_DISK[1:]) + _MTP,    # one tensor per expert; the MTP module
    dims=_dims,
    sites=Sites(layers="model.layers", final_norm="model.norm", embed="model.embed_tokens",
                inputs={"lin.{i}": D + "out_proj", "attn.{i}": A + "o_proj", "mlp.{i}": L + "mlp.down_proj",
                        "shared.{i}": L + "mlp.shared_expert.down_proj"}),
    requires=(SILU_GATE, RMSNORM),
)
