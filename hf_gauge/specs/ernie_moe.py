"""ERNIE 4.5 MoE (``ernie4_5_moe``): a pre-RMSNorm MoE decoder with dense layers, shared experts and a router
statistic that moves with the experts.

Residual group B_d (RMSNorm), as for Llama. ``Ernie4_5_MoeDecoderLayer`` routes to experts on layer ``i`` iff
``(i + 1) % moe_layer_interval == 0`` and ``moe_layer_start_index <= i <= moe_layer_end_index`` (``-1``: the last
layer); the other layers hold a dense SwiGLU ``mlp`` of ``intermediate_size`` units (``mlp.{i}``). On MoE layers:
- ``moe.{i}``: the experts as wholes, permutations only. The router ``mlp.gate.weight [E, d]`` scores experts by a
  softmax; the top-k choice adds ``mlp.gate.moe_statics.e_score_correction_bias [1, E]`` (on disk
  ``mlp.moe_statics.e_score_correction_bias``: transformers renames it on load), so its column ``k`` moves with
  expert ``k``: the choice, the softmax weights and the ``moe_norm_min`` clamp of their sum are then permuted alike.
- ``experts.{i}.{e}``: each expert's SwiGLU units (signed on up/down), carried by ``moe.{i}``.
- ``shared.{i}``: ``moe_num_shared_experts`` shared experts fused as one SwiGLU MLP of ``moe_intermediate_size *
  moe_num_shared_experts`` units (absent when that is 0).
- ``attn.{i}``: query heads within KV groups (ERNIE's interleaved rotary acts inside a head's block).
``use_bias`` adds biases to q/k/v/o, the dense and shared MLPs and ``lm_head``: all have rules (``lm_head.bias``
lies in vocabulary space, untouched). Declared fields: ``hidden_act`` (SiLU gate) and ``rms_norm_eps``.
"""
from __future__ import annotations

from .base import Rule
from .moe import L, ROUTER_COLS, moe_spec


def ernie_moe_layer(c, i: int) -> bool:
    """``Ernie4_5_MoeDecoderLayer``'s choice (an end index of -1, as a raw config.json may hold, is the last layer)."""
    end = c.moe_layer_end_index
    end = c.num_hidden_layers - 1 if end == -1 else end
    return (i + 1) % c.moe_layer_interval == 0 and c.moe_layer_start_index <= i <= end


ERNIE4_5_MOE = moe_spec(
    "ernie4_5_moe", lambda c: c.moe_num_experts, lambda c: c.moe_intermediate_size,
    ("mlp", "gate_proj", "up_proj", "down_proj"),
    shared=("mlp.shared_experts", lambda c: c.moe_intermediate_size * c.moe_num_shared_experts),
    shared_when=lambda c: c.moe_num_shared_experts > 0,
    moe_layers=ernie_moe_layer, dense_size=lambda c: c.intermediate_size,
    rules=(Rule(L + "mlp.gate.moe_statics.e_score_correction_bias", (ROUTER_COLS,)),),
    file_rules=(Rule(L + "mlp.moe_statics.e_score_correction_bias", (ROUTER_COLS,)),),
)
