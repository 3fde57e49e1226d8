"""gpt-oss: pre-RMSNorm GQA decoder with attention sinks, biases everywhere, and top-k routed experts on every layer.

Residual group B_d (RMSNorm): the embedding, q/k/v, the router ``mlp.router [E, d]`` and the fused expert input
``gate_up_proj`` read the residual; o_proj (and its bias), the expert output ``down_proj [E, f, d]`` and its bias
``down_proj_bias [E, d]`` write it (each expert's bias is added before the routing weight scales it: still a writer).
Inside each layer i:
- ``attn.{i}``: query heads within KV groups, KV groups as wholes; q/k/v biases move with their head blocks and the
  attention sinks (``self_attn.sinks [n_heads]``, one logit per query head in the softmax) with their query head.
  Sliding and full attention layers alternate (``layer_types``): the mask acts on positions, not heads, so every
  head permutes in both.
- ``moe.{i}``: the experts as wholes, permutations only: router row and router bias move with the expert's slices.
- ``experts.{i}.{e}``: the hidden units of expert e (carried by ``moe.{i}``, indexed by the source expert),
  permutations only. The expert computes ``(clamp(up, -l, l) + 1) * glu(clamp(gate, max=l))`` with
  ``glu(g) = g * sigmoid(alpha g)``: neither the ``+ 1`` nor the glu is odd, so a unit's sign is no symmetry; the
  clamps act per unit and commute with permutations.

In memory and on disk (no conversion on load) the experts are stored transposed relative to Mixtral:
``gate_up_proj [E, d, 2f]`` whose last axis interleaves gate and up at stride 2 (``gate_up[..., ::2]`` is the gate:
``segmented(..., interleave=True)``), ``gate_up_proj_bias [E, 2f]`` likewise, ``down_proj [E, f, d]``. The experts
module declares ``is_transposed``, so PEFT's ``ParamWrapper`` LoRA reads each slice as ``[in, out]``: the two rules
say ``transposed=True`` (Llama-4's ``[E, d, 2f]`` experts declare nothing, and PEFT reads them as ``[E, out, in]``).
The experts have no module whose input is their activation: ``moe.{i}`` and ``experts.{i}.{e}`` are matched from
weights.

The released checkpoints are MXFP4 (``*_blocks`` / ``*_scales`` uint8 with ``quantization_config``): a packed block
of 32 FP4 values shares one scale, so a residual permutation cannot move them by index. They are refused (declared
field ``quantization_config``; on files ``hf_gauge.fileconfig`` says the same), naming the way to a float checkpoint:
``from_pretrained(..., quantization_config=Mxfp4Config(dequantize=True))`` then ``save_pretrained``.
Declared fields: ``rms_norm_eps`` and ``quantization_config``. ``hidden_act`` is not read by the experts (their glu is
fixed), ``swiglu_limit`` / ``swiglu_alpha`` act per unit, ``sliding_window`` / ``layer_types`` / rope settings act
inside heads, ``attention_bias`` only adds biases that have rules: none needs a declaration.
"""
from __future__ import annotations

from .base import ArchSpec, Axis, Requires, Rule, Sites, Space, gain, reads, segmented
from .decoder import HEAD_RULES, RMSNORM, attention_rules, head_dim

L = "model.layers.{i}."
M = L + "mlp."
ROUTER_ROWS = Axis(0, "moe.{i}", signed=False)
EXPERT_SLICES = Axis(0, "moe.{i}", signed=False, stack="e")
UNIT = Axis(0, "experts.{i}.{e}", signed=False)            # gate and up alike: no unit signs


def _gate_up(axis: int) -> Axis:
    """The interleaved ``[g0, u0, g1, u1, ...]`` axis of ``gate_up_proj`` (and its bias)."""
    return segmented(axis, UNIT, UNIT, interleave=True)


MXFP4 = Requires("quantization_config", (None,),
                 "MXFP4 weights pack 32 FP4 values per shared scale, which no index move preserves; load with "
                 "quantization_config=Mxfp4Config(dequantize=True) and save_pretrained a float checkpoint")

GPT_OSS = ArchSpec(
    name="gpt_oss",
    model_types=("gpt_oss",),
    norm="rmsnorm",
    spaces={
        "residual": Space(lambda c: c.hidden_size, "any", "residual stream", kind="residual"),
        "attn.{i}": Space(lambda c: c.num_attention_heads, "none", "query heads of layer i (with their sinks)",
                          kind="heads"),
        "moe.{i}": Space(lambda c: c.num_local_experts, "none",
                         "the experts of layer i, as wholes (router rows and biases with them)", kind="experts"),
        "experts.{i}.{e}": Space(lambda c: c.intermediate_size, "none",
                                 "hidden units of expert e of layer i (source chart; (clamp(up) + 1) * glu: no signs)",
                                 kind="units", ranges={"e": lambda c: c.num_local_experts},
                                 carried_by={"e": "moe.{i}"}),
    },
    rules=(
        Rule("model.embed_tokens.weight", reads()),
        *attention_rules(L),
        Rule(L + "self_attn.sinks", (Axis(0, "attn.{i}", signed=False),)),
        Rule(M + "router.weight", reads(ROUTER_ROWS)),
        Rule(M + "router.bias", (ROUTER_ROWS,)),
        Rule(M + "experts.gate_up_proj", (EXPERT_SLICES, Axis(1, "residual"), _gate_up(2)), transposed=True),
        Rule(M + "experts.gate_up_proj_bias", (EXPERT_SLICES, _gate_up(1))),
        Rule(M + "experts.down_proj", (EXPERT_SLICES, Axis(1, "experts.{i}.{e}", signed=False), Axis(2, "residual")),
             transposed=True),
        Rule(M + "experts.down_proj_bias", (EXPERT_SLICES, Axis(1, "residual"))),
        Rule(L + "input_layernorm.weight", gain()),
        Rule(L + "post_attention_layernorm.weight", gain()),
        Rule("model.norm.weight", gain()),
        Rule("lm_head.weight", reads()),
        *HEAD_RULES,
    ),
    dims=head_dim,
    requires=(RMSNORM, MXFP4),
    sites=Sites(layers="model.layers", final_norm="model.norm", embed="model.embed_tokens",
                inputs={"attn.{i}": L + "self_attn.o_proj"}),
)
