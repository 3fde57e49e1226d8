"""GLM-4 (``glm4``, dense) and GLM-4.5 MoE (``glm4_moe``).

GLM-4: pre-RMSNorm layers with sandwich norms. ``Glm4DecoderLayer`` computes
``h + post_self_attn_layernorm(attn(input_layernorm(h)))`` then
``h + post_mlp_layernorm(mlp(post_attention_layernorm(h)))``: the post-sublayer RMSNorms normalise a writer's
output whose rows the gauge moves (``rms(Q y) = rms(y)``, ``Q diag(g) = diag(P g) Q``), so every gain is permuted,
never signed: residual group B_d. The MLP's fused
``gate_up_proj`` rows are ``[gate | up]`` (``up * silu(gate)``): units permute in both segments, signs on the up
segment and the down columns only. q/k/v carry biases (``attention_bias``), o_proj none; the partial rotary
(``partial_rotary_factor``) acts inside each head's block: heads permute within KV groups, groups as wholes.

GLM-4.5 MoE (``Glm4MoeDecoderLayer``): the first ``first_k_dense_replace`` layers hold a dense SwiGLU MLP
(``mlp.{i}``, ``intermediate_size``), the others a DeepSeek-V3-style MoE block:
- ``moe.{i}`` (kind ``grouped_experts``): the router ``mlp.gate.weight [E, d]`` scores experts by a sigmoid; the
  choice adds ``mlp.gate.e_score_correction_bias [E]`` (a persistent buffer, moved like a parameter), so entry ``k``
  moves with expert ``k``. Routing is group-limited: the ``E`` experts form ``n_group`` consecutive groups, a token
  keeps the ``topk_group`` groups with the best top-2 score sums, then its top-k experts inside them. A permutation
  is therefore exact only if it maps groups to groups as wholes (experts permute within a group, groups as wholes);
  one that mixes groups changes which experts compete and is refused. No sign: the sigmoid is not odd.
- ``experts.{i}.{e}``: each expert's SwiGLU units (signed on up/down), carried by ``moe.{i}``.
- ``shared.{i}``: the ``n_shared_experts`` shared experts fused as one SwiGLU MLP (``mlp.shared_experts``).
- heads as GLM-4's; ``use_qk_norm``'s q/k RMSNorms are ``[head_dim]``, shared by every head: untouched.
``routed_scaling_factor`` and ``norm_topk_prob`` scale or normalise the chosen weights: equivariant, no declaration.
Not covered: the multi-token-prediction layer that released GLM-4.5 files store as ``model.layers.{num_hidden_layers}``
(transformers does not load it); the files' layer indices then exceed the config's range and are refused.
Declared fields: ``hidden_act`` (SiLU gate) and ``rms_norm_eps``.
"""
from __future__ import annotations

from .base import ArchSpec, Axis, Rule, Sites, Space, gain, reads, segmented, writes
from .decoder import HEAD_RULES, RMSNORM, SILU_GATE, attention_rules, head_dim
from .moe import L, moe_spec

GATE_UP_ROWS = segmented(0, Axis(0, "mlp.{i}", signed=False), Axis(0, "mlp.{i}"))

GLM4 = ArchSpec(
    name="glm4",
    model_types=("glm4",),
    norm="rmsnorm",
    spaces={
        "residual": Space(lambda c: c.hidden_size, "any", "residual stream", kind="residual"),
        "mlp.{i}": Space(lambda c: c.intermediate_size, "any", "SwiGLU hidden units of layer i", kind="units"),
        "attn.{i}": Space(lambda c: c.num_attention_heads, "none", "query heads of layer i", kind="heads"),
    },
    rules=(Rule("model.embed_tokens.weight", reads()),) + attention_rules(L) + (
        Rule(L + "mlp.gate_up_proj.weight", reads(GATE_UP_ROWS)),
        Rule(L + "mlp.down_proj.weight", writes(Axis(1, "mlp.{i}"))),
        *(Rule(L + n + ".weight", gain()) for n in ("input_layernorm", "post_self_attn_layernorm",
                                                     "post_attention_layernorm", "post_mlp_layernorm")),
        Rule("model.norm.weight", gain()),
        Rule("lm_head.weight", reads()),
        *HEAD_RULES,
    ),
    dims=head_dim,
    requires=(SILU_GATE, RMSNORM),
    sites=Sites(layers="model.layers", final_norm="model.norm", embed="model.embed_tokens",
                inputs={"mlp.{i}": L + "mlp.down_proj", "attn.{i}": L + "self_attn.o_proj"}),
)

GLM4_MOE = moe_spec(
    "glm4_moe", lambda c: c.n_routed_experts, lambda c: c.moe_intermediate_size,
    ("mlp", "gate_proj", "up_proj", "down_proj"),
    shared=("mlp.shared_experts", lambda c: c.moe_intermediate_size * c.n_shared_experts),
    moe_layers=lambda c, i: i >= c.first_k_dense_replace, dense_size=lambda c: c.intermediate_size,
    experts_kind="grouped_experts",
    rules=(Rule(L + "mlp.gate.e_score_correction_bias", (Axis(0, "moe.{i}", signed=False),)),),
)
