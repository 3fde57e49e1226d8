"""IBM Granite 4.0 hybrid (granitemoehybrid): Mamba-2 and attention layers (``layer_types``), each followed by top-k
routed SwiGLU experts (absent when ``num_local_experts`` is 0) plus an always-on shared SwiGLU MLP.

Residual group B_d: every norm on the residual is an RMSNorm with a per-channel gain (permuted, never signed); the
mixers, the router, the experts and the shared MLP read the normalised residual (columns signed-permuted) and write it
through ``out_proj`` / ``o_proj`` / the down projections (rows and biases signed-permuted). ``embedding_multiplier``,
``residual_multiplier``, ``attention_multiplier`` and ``logits_scaling`` are scalars, which commute with everything.

Inner spaces:
- ``ssm.{i}`` (kind ``ssm_heads``, Mamba-2 layers only): the mixer's heads, permutations only. ``in_proj`` rows are
  ``[z | x | B | C | dt]``: z and x hold ``mamba_d_head`` rows per head, B and C ``mamba_d_state`` rows per group,
  dt one row per head; ``conv1d`` channels (weight and bias) are ``[x | B | C]``; ``A_log``, ``D`` and ``dt_bias``
  hold one entry per head; ``out_proj`` columns ``mamba_d_head`` per head. Heads ``n_heads / n_groups`` at a time
  share a group's B and C, so they permute within a group and groups as wholes (B and C rows move by the group
  permutation). The gated norm ``norm(y * silu(z))`` normalises each group of ``intermediate / n_groups`` channels
  jointly with a per-channel gain: a permutation of heads within a group keeps each group's rms and moves the gain
  with its head, and whole groups move with their gains, which is exactly what the B/C sharing allows already; a
  permutation of the ``mamba_d_head`` channels inside every head (the same on z, x, their conv channels, the norm
  gain and ``out_proj``) is a symmetry too (each channel runs its own scan with the head's dt and A), but the spec
  format cannot write one permutation repeated inside each block of a fused axis: left out. No signs: x passes
  through conv1d then SiLU, z through SiLU (not odd), and dt through softplus.
- ``attn.{i}`` (attention layers only): query heads within KV groups, KV groups as wholes (RoPE, or none with
  ``position_embedding_type`` unset, acts inside a head).
- ``moe.{i}`` / ``experts.{i}.{e}``: the experts as wholes with their router rows (permutations only: the top-k
  softmax is not odd) and each expert's SwiGLU units (``gate_up_proj`` rows ``[gate | up]``: signs on the up row /
  down column pair). ``shared.{i}``: the shared MLP's units (``input_linear`` rows ``[gate | up]``).

Checkpoint files keep GraniteMoE's names (transformers renames them on load): ``block_sparse_moe.input_linear``
``[E, 2 ff, d]``, ``output_linear`` ``[E, d, ff]`` and ``router.layer`` (``file_rules``).
Declared fields: ``hidden_act`` (the experts' and shared MLP's SiLU gate) and ``rms_norm_eps``. ``layer_types`` picks
each layer's mixer, which the layer ranges follow; the biases (``attention_bias``, ``mamba_proj_bias``,
``mamba_conv_bias``) have rules.
"""
from __future__ import annotations

from .base import UNTOUCHED, ArchSpec, Axis, Rule, Sites, Space, layers_where, reads, segmented, writes
from .decoder import HEAD_RULES, RMSNORM, SILU_GATE, attention_rules
from .moe import E_GATE, E_UP, EXPERT_SLICES, ROUTER_ROWS, expert_rules, norm_rules

L = "model.layers.{i}."
M = L + "mamba."
E = L + "block_sparse_moe."


def is_mamba(config, i: int) -> bool:
    """Layer ``i`` has a Mamba-2 mixer (transformers maps ``"mamba"`` to ``"linear_attention"``)."""
    return config.layer_types[i] in ("linear_attention", "mamba")


def _has_experts(config) -> bool:
    return config.num_local_experts > 0


def _dims(config) -> dict[str, int]:
    return {"head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            "ssm_head_dim": config.mamba_d_head, "ssm_state": config.mamba_d_state}


HEAD = Axis(0, "ssm.{i}", signed=False, block="ssm_head_dim")           # z, x rows: one head's channels
GROUP = Axis(0, "ssm.{i}", signed=False, block="ssm_state", kv=True)    # B, C rows: one group's state
PER_HEAD = Axis(0, "ssm.{i}", signed=False)                              # dt rows, A_log, D, dt_bias
IN_ROWS = segmented(0, HEAD, HEAD, GROUP, GROUP, PER_HEAD)               # in_proj: [z | x | B | C | dt]
CONV = segmented(0, HEAD, GROUP, GROUP)                                  # conv1d channels: [x | B | C]
S_GATE_UP = segmented(0, Axis(0, "shared.{i}", signed=False), Axis(0, "shared.{i}"))

GRANITEMOEHYBRID = ArchSpec(
    name="granitemoehybrid",
    model_types=("granitemoehybrid",),
    norm="rmsnorm",
    spaces={
        "residual": Space(lambda c: c.hidden_size, "any", "residual stream", kind="residual"),
        "ssm.{i}": Space(lambda c: c.mamba_n_heads, "none", "Mamba-2 heads of layer i", kind="ssm_heads",
                         ranges={"i": layers_where(is_mamba)}),
        "attn.{i}": Space(lambda c: c.num_attention_heads, "none", "query heads of layer i", kind="heads",
                          ranges={"i": layers_where(lambda c, i: not is_mamba(c, i))}),
        "moe.{i}": Space(lambda c: c.num_local_experts, "none", "the experts of layer i, as wholes",
                         kind="experts", when=_has_experts),
        "experts.{i}.{e}": Space(lambda c: c.intermediate_size, "any", "hidden units of expert e of layer i",
                                 kind="units", ranges={"e": lambda c: c.num_local_experts},
                                 carried_by={"e": "moe.{i}"}, when=_has_experts),
        "shared.{i}": Space(lambda c: c.shared_intermediate_size, "any", "hidden units of layer i's shared MLP",
                            kind="units"),
    },
    rules=(
        Rule("model.embed_tokens.weight", reads()),
        Rule(M + "in_proj.weight", reads(IN_ROWS)),
        Rule(M + "in_proj.bias", (IN_ROWS,)),
        Rule(M + "conv1d.weight", (CONV,)),
        Rule(M + "conv1d.bias", (CONV,)),
        Rule(M + "A_log", (PER_HEAD,)),
        Rule(M + "D", (PER_HEAD,)),
        Rule(M + "dt_bias", (PER_HEAD,)),
        Rule(M + "norm.weight", (HEAD,)),
        Rule(M + "out_proj.weight", writes(Axis(1, "ssm.{i}", signed=False, block="ssm_head_dim"))),
        Rule(M + "out_proj.bias", writes()),
        *attention_rules(L),
        *expert_rules("block_sparse_moe", "router"),
        Rule(L + "shared_mlp.input_linear.weight", reads(S_GATE_UP)),
        Rule(L + "shared_mlp.output_linear.weight", writes(Axis(1, "shared.{i}"))),
        *norm_rules(),
        Rule("lm_head.weight", reads()),
        Rule("lm_head.bias", UNTOUCHED),
        *HEAD_RULES,
    ),
    file_rules=(
        Rule(E + "router.layer.weight", reads(ROUTER_ROWS)),
        Rule(E + "input_linear.weight", (EXPERT_SLICES, segmented(1, E_GATE, E_UP), Axis(2, "residual"))),
        Rule(E + "output_linear.weight", (EXPERT_SLICES, Axis(1, "residual"), Axis(2, "experts.{i}.{e}"))),
    ),
    dims=_dims,
    sites=Sites(layers="model.layers", final_norm="model.norm", embed="model.embed_tokens",
                inputs={"ssm.{i}": M + "out_proj", "attn.{i}": L + "self_attn.o_proj",
                        "shared.{i}": L + "shared_mlp.output_linear"}),
    requires=(SILU_GATE, RMSNORM),
)
