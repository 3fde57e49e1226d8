"""Llama-4 text (``llama4_text``, ``Llama4ForCausalLM``): pre-RMSNorm GQA decoder whose MoE layers (``moe_layers``,
every ``interleave_moe_layer_step``-th layer) route to experts beside a shared expert, and whose other layers hold a
dense SwiGLU MLP of ``intermediate_size_mlp`` units.

Residual group B_d (RMSNorm): the embedding, q/k/v, the router ``feed_forward.router [E, d]``, the fused expert input
``experts.gate_up_proj [E, d, 2f]`` (stored ``[in, out]``, transposed relative to Mixtral; the last axis is
``[gate | up]``) and the shared / dense ``gate_proj`` / ``up_proj`` read the residual; o_proj, the expert output
``experts.down_proj [E, f, d]`` and the shared / dense ``down_proj`` write it. Spaces:
- ``attn.{i}``: query heads within KV groups, KV groups as wholes, on every layer. NoPE layers (``no_rope_layers``)
  skip rotary, RoPE layers (with ``use_qk_norm``) apply a weightless RMS norm over each head's ``head_dim`` entries
  after rotary (per head: it commutes with head permutations; no parameter); NoPE layers scale queries by a
  position-only temperature (``attn_temperature_tuning``) and may use chunked attention masks
  (``attention_chunk_size``): all act inside heads or on positions.
- ``mlp.{i}`` (dense layers only): SwiGLU units, signs on the (up row, down column) pair.
- ``moe.{i}`` (MoE layers only): the experts as wholes, router row with its expert. The router keeps the top-k logits
  and scales each routed token's INPUT by ``sigmoid(logit)`` (not its output): a positive scalar per (token, expert),
  which commutes with every signed permutation of the expert's units, so it changes no sign rule; a sign on an
  expert would negate its logit (sigmoid and top-k are not odd): permutations only.
- ``experts.{i}.{e}`` (MoE layers; carried by ``moe.{i}``, indexed by the source expert): SwiGLU units of expert e,
  signs on the up / down pair.
- ``shared.{i}`` (MoE layers): the always-on shared expert's SwiGLU units (no gate of its own: its output is added).

Names are the same in memory and on disk (no conversion on load). Declared fields: ``hidden_act`` (every MLP and
expert is ``act(gate) * up``) and ``rms_norm_eps``. ``moe_layers`` / ``interleave_moe_layer_step`` place the spaces
(``layers_where``), ``use_qk_norm`` / ``no_rope_layers`` / ``attn_temperature_tuning`` / ``attention_chunk_size`` act
inside heads, ``attention_bias`` adds biases that have rules: none needs a declaration. The vision-language
``llama4`` model type is not covered.
"""
from __future__ import annotations

from .base import ArchSpec, Axis, Rule, Sites, Space, gain, layers_where, reads, segmented, writes
from .decoder import HEAD_RULES, RMSNORM, SILU_GATE, attention_rules, head_dim

L = "model.layers.{i}."
F = L + "feed_forward."
ROUTER_ROWS = Axis(0, "moe.{i}", signed=False)
EXPERT_SLICES = Axis(0, "moe.{i}", signed=False, stack="e")
E_GATE, E_UP = Axis(0, "experts.{i}.{e}", signed=False), Axis(0, "experts.{i}.{e}")
MOE = layers_where(lambda c, i: i in c.moe_layers)
DENSE = layers_where(lambda c, i: i not in c.moe_layers)


def _swiglu(path: str, space: str) -> tuple[Rule, ...]:
    """``down(act(gate x) * up x)`` at ``path`` with units in ``space``: gate rows permuted only."""
    return (Rule(path + "gate_proj.weight", reads(Axis(0, space, signed=False))),
            Rule(path + "up_proj.weight", reads(Axis(0, space))),
            Rule(path + "down_proj.weight", writes(Axis(1, space))))


LLAMA4_TEXT = ArchSpec(
    name="llama4_text",
    model_types=("llama4_text",),
    norm="rmsnorm",
    spaces={
        "residual": Space(lambda c: c.hidden_size, "any", "residual stream", kind="residual"),
        "attn.{i}": Space(lambda c: c.num_attention_heads, "none", "query heads of layer i", kind="heads"),
        "mlp.{i}": Space(lambda c: c.intermediate_size_mlp, "any", "SwiGLU units of dense layer i", kind="units",
                         ranges={"i": DENSE}),
        "moe.{i}": Space(lambda c: c.num_local_experts, "none",
                         "the experts of MoE layer i, as wholes (router rows with them)", kind="experts",
                         ranges={"i": MOE}),
        "experts.{i}.{e}": Space(lambda c: c.intermediate_size, "any",
                                 "SwiGLU units of expert e of MoE layer i (source chart)", kind="units",
                                 ranges={"i": MOE, "e": lambda c: c.num_local_experts}, carried_by={"e": "moe.{i}"}),
        "shared.{i}": Space(lambda c: c.intermediate_size, "any", "SwiGLU units of MoE layer i's shared expert",
                            kind="units", ranges={"i": MOE}),
    },
    rules=(
        Rule("model.embed_tokens.weight", reads()),
        *attention_rules(L),
        *_swiglu(F, "mlp.{i}"),
        *_swiglu(F + "shared_expert.", "shared.{i}"),
        Rule(F + "router.weight", reads(ROUTER_ROWS)),
        Rule(F + "experts.gate_up_proj", (EXPERT_SLICES, Axis(1, "residual"), segmented(2, E_GATE, E_UP))),
        Rule(F + "experts.down_proj", (EXPERT_SLICES, Axis(1, "experts.{i}.{e}"), Axis(2, "residual"))),
        Rule(L + "input_layernorm.weight", gain()),
        Rule(L + "post_attention_layernorm.weight", gain()),
        Rule("model.norm.weight", gain()),
        Rule("lm_head.weight", reads()),
        *HEAD_RULES,
    ),
    dims=head_dim,
    requires=(SILU_GATE, RMSNORM),
    sites=Sites(layers="model.layers", final_norm="model.norm", embed="model.embed_tokens",
                inputs={"attn.{i}": L + "self_attn.o_proj", "mlp.{i}": F + "down_proj",
                        "shared.{i}": F + "shared_expert.down_proj"}),
)
