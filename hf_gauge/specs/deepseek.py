"""DeepSeek-V2 and DeepSeek-V3: multi-head latent attention (MLA) and routed + shared experts after dense layers.

Residual group B_d (RMSNorm everywhere on the residual: ``input_layernorm``, ``post_attention_layernorm``, ``norm``
are ``gain()``). Readers: the embedding, ``q_a_proj`` (or ``q_proj``), ``kv_a_proj_with_mqa``, the dense MLP's and the
shared experts' gate/up, the router ``mlp.gate``, every expert's gate/up; writers: ``o_proj``, every down projection.

Attention (``DeepseekV3Attention.forward``), per layer i:
- ``qlat.{i}``: the q latent ``z = q_a_proj x`` (``q_lora_rank`` wide), read by ``q_b_proj`` through its own
  RMSNorm ``q_a_layernorm``. ``rms(P D z) = rms(z)`` and ``diag(P g) P D = P D diag(g)``, so a signed permutation
  ``Q = P D`` of the latent is exact: ``q_a_proj`` rows (and bias) signed-permuted, the gain permuted (never signed),
  ``q_b_proj`` columns signed-permuted. Kind ``units`` (its behaviour is exactly that of independent signed units:
  drawn, checked, matched from its weight slices or from the activation at ``q_b_proj``'s input). Absent when
  ``q_lora_rank`` is None (DeepSeek-V2-Lite: a plain ``q_proj`` whose rows are the head blocks; ``Space.when``).
- ``kvlat.{i}``: the kv latent, the first ``kv_lora_rank`` rows of ``kv_a_proj_with_mqa`` (rows ``[latent | k_rot]``),
  normalised by ``kv_a_layernorm`` and read by ``kv_b_proj``: a signed space as the q latent. The last
  ``qk_rope_head_dim`` rows are the RoPE key shared by every head: they never move (RoPE rotates pairs of them, so no
  permutation or sign of them commutes with it; the segment part ``""``).
- ``attn.{i}``: the heads. Head ``h`` owns rows ``[h*(nope+rope), (h+1)*(nope+rope))`` of ``q_b_proj`` / ``q_proj``
  (its ``[q_nope | q_rot]``), rows ``[h*(nope+v), ...)`` of ``kv_b_proj`` (its ``[k_nope | v]``) and columns
  ``[h*v, ...)`` of ``o_proj``: three block sizes (``dims``: ``q_head``, ``kv_head``, ``v_head``). The shared RoPE
  key is the same for every head, so heads permute as wholes (kind ``heads``; ``num_key_value_heads`` equals
  ``num_attention_heads`` in every MLA config that runs, so no grouping is imposed). No sign (below).

MLP: layers ``i < first_k_dense_replace`` are dense SwiGLU MLPs (``mlp.{i}``: signs on the up/down pair, the gate
rows permuted); the others (``layers_where``) route to ``n_routed_experts`` experts (``moe.{i}``: permutations of
whole experts, router rows and V3's ``e_score_correction_bias`` (a persistent buffer) with them; kind
``grouped_experts``: group-limited routing keeps the ``topk_group`` best of ``n_group`` consecutive groups of experts
(V3 always, by the sum of each group's two best scores; V2 under ``topk_method="group_limited_greedy"``, by the
best), which a permutation preserves only if it permutes within groups and moves groups as wholes. V2's greedy
routing would admit every permutation, but a V2 config that names ``n_group > 1`` with it still gets the grouped
ones: exact, not all of them; ``experts.{i}.{e}``: an expert's units, carried by ``moe.{i}``) plus
``n_shared_experts`` always-on experts fused in one SwiGLU (``shared.{i}``). On disk the routed experts are stored one
tensor per expert (``mlp.experts.{e}.gate_proj.weight``, ...; transformers fuses them on load).

Files: DeepSeek-V3's released checkpoints also hold ``num_nextn_predict_layers`` multi-token-prediction layers after
the model's (``ArchSpec.file_only_layers``, ``MTP_FILE_RULES``): they move with the residual.

Not symmetries (and why):
- a sign of a whole head (its q, k_nope and v rows and o_proj columns negated, exact where every head has its own
  key): the RoPE key ``k_rot`` is shared by every head and never moves, so the head's ``q_rot . k_rot`` term flips;
- a permutation or sign inside the RoPE slices: RoPE rotates each pair of rotary dims;
- an expert's sign: the router's sigmoid (V3) or softmax (V2) is not odd;
- the in-head maps of ``q_nope``/``k_nope`` (a signed permutation of a head's nope dims on both ``q_b_proj`` and
  ``kv_b_proj``) and of ``v``/``o_proj`` are exact, as in every attention, but no spec models in-head gauges.
Declared fields: ``hidden_act`` (SiLU gates), ``rms_norm_eps``, V2's ``topk_method``; ``n_group`` is read by the
kind (absent or None: one group; not dividing the experts: refused). Biases (``attention_bias``, V2's ``mlp_bias``),
RoPE settings, ``rope_interleave``, ``routed_scaling_factor``, ``topk_group`` and ``norm_topk_prob`` need no
declaration: every value is covered by the rules or acts inside a head or on the (permutation-equivariant) routing
weights.
"""
from __future__ import annotations

from .base import UNTOUCHED, ArchSpec, Axis, Requires, Rule, Sites, Space, gain, layers_where, reads, segmented, writes
from .decoder import HEAD_RULES, RMSNORM, SILU_GATE

L = "model.layers.{i}."
A = L + "self_attn."
M = L + "mlp."

Q_LAT, Q_LAT_GAIN = Axis(0, "qlat.{i}"), Axis(0, "qlat.{i}", signed=False)
KV_LAT, KV_LAT_GAIN = Axis(0, "kvlat.{i}"), Axis(0, "kvlat.{i}", signed=False)
KV_A_ROWS = segmented(0, KV_LAT, Axis(0, "", block="rope"))          # [latent | k_rot]: the RoPE key never moves
Q_HEADS = Axis(0, "attn.{i}", signed=False, block="q_head")
KV_HEADS = Axis(0, "attn.{i}", signed=False, block="kv_head")
O_HEADS = Axis(1, "attn.{i}", signed=False, block="v_head")
ROUTER_ROWS = Axis(0, "moe.{i}", signed=False)
EXPERT_SLICES = Axis(0, "moe.{i}", signed=False, stack="e")
E_GATE, E_UP, E_DOWN = Axis(0, "experts.{i}.{e}", signed=False), Axis(0, "experts.{i}.{e}"), Axis(1, "experts.{i}.{e}")


def _gated(path: str, space: str) -> tuple[Rule, ...]:
    """A SwiGLU ``down(silu(gate x) * up x)`` at ``path`` with units in ``space`` (biases: V2's ``mlp_bias``)."""
    gate, up, down = Axis(0, space, signed=False), Axis(0, space), Axis(1, space)
    return (
        Rule(path + "gate_proj.weight", reads(gate)), Rule(path + "gate_proj.bias", (gate,)),
        Rule(path + "up_proj.weight", reads(up)), Rule(path + "up_proj.bias", (up,)),
        Rule(path + "down_proj.weight", writes(down)), Rule(path + "down_proj.bias", writes()),
    )


def _rules() -> tuple[Rule, ...]:
    return (
        Rule("model.embed_tokens.weight", reads()),
        Rule(A + "q_proj.weight", reads(Q_HEADS)),
        Rule(A + "q_a_proj.weight", reads(Q_LAT)),
        Rule(A + "q_a_proj.bias", (Q_LAT,)),
        Rule(A + "q_a_layernorm.weight", (Q_LAT_GAIN,)),
        Rule(A + "q_b_proj.weight", (Q_HEADS, Axis(1, "qlat.{i}"))),
        Rule(A + "kv_a_proj_with_mqa.weight", reads(KV_A_ROWS)),
        Rule(A + "kv_a_proj_with_mqa.bias", (KV_A_ROWS,)),
        Rule(A + "kv_a_layernorm.weight", (KV_LAT_GAIN,)),
        Rule(A + "kv_b_proj.weight", (KV_HEADS, Axis(1, "kvlat.{i}"))),
        Rule(A + "o_proj.weight", writes(O_HEADS)),
        Rule(A + "o_proj.bias", writes()),
        *_gated(M, "mlp.{i}"),
        *_gated(M + "shared_experts.", "shared.{i}"),
        Rule(M + "gate.weight", reads(ROUTER_ROWS)),
        Rule(M + "gate.e_score_correction_bias", (ROUTER_ROWS,)),
        Rule(M + "experts.gate_up_proj", (EXPERT_SLICES, segmented(1, E_GATE, E_UP), Axis(2, "residual"))),
        Rule(M + "experts.down_proj", (EXPERT_SLICES, Axis(1, "residual"), Axis(2, "experts.{i}.{e}"))),
        Rule(L + "input_layernorm.weight", gain()),
        Rule(L + "post_attention_layernorm.weight", gain()),
        Rule("model.norm.weight", gain()),
        Rule("lm_head.weight", reads()),
        Rule("lm_head.bias", UNTOUCHED),
        *HEAD_RULES,
    )


# Checkpoint files store the routed experts one tensor per expert ({e} renamed under moe.{i}).
FILE_RULES = (
    Rule(M + "experts.{e}.gate_proj.weight", reads(E_GATE)),
    Rule(M + "experts.{e}.up_proj.weight", reads(E_UP)),
    Rule(M + "experts.{e}.down_proj.weight", writes(E_DOWN)),
)


# DeepSeek-V3's released files hold num_nextn_predict_layers multi-token-prediction layers after the model's, at
# model.layers.{N} (N = num_hidden_layers; DeepSeek-V3's README_WEIGHTS.md): a full decoder layer (the rules above,
# its inner spaces left alone: they are no spaces of the model) plus h' = eh_proj([enorm(embed(t)) | hnorm(h)]),
# whose output feeds the layer, and logits = shared_head.head(shared_head.norm(.)). Both halves of eh_proj's input
# are residual-chart vectors (the order of the concatenation does not matter), so its columns are [residual |
# residual] and its rows write the residual; the norms are gains, the two tables read the residual.
MTP_FILE_RULES = (
    Rule(L + "embed_tokens.weight", reads()),
    Rule(L + "enorm.weight", gain()),
    Rule(L + "hnorm.weight", gain()),
    Rule(L + "eh_proj.weight", (Axis(0, "residual"), segmented(1, Axis(1, "residual"), Axis(1, "residual")))),
    Rule(L + "shared_head.norm.weight", gain()),
    Rule(L + "shared_head.head.weight", reads()),
)


def _dims(c) -> dict[str, int]:
    """Block sizes of one head in each tensor: q ``[nope | rope]``, kv ``[k_nope | v]``, o ``v``; the RoPE key."""
    return {"q_head": c.qk_nope_head_dim + c.qk_rope_head_dim, "kv_head": c.qk_nope_head_dim + c.v_head_dim,
            "v_head": c.v_head_dim, "rope": c.qk_rope_head_dim}


DENSE = layers_where(lambda c, i: i < c.first_k_dense_replace)         # DeepseekV3DecoderLayer: dense MLP
SPARSE = layers_where(lambda c, i: i >= c.first_k_dense_replace)       # routed + shared experts


def _spaces() -> dict[str, Space]:
    experts = lambda c: c.n_routed_experts                                   # noqa: E731
    out = {
        "residual": Space(lambda c: c.hidden_size, "any", "residual stream", kind="residual"),
        "attn.{i}": Space(lambda c: c.num_attention_heads, "none", "attention heads of layer i (MLA)", kind="heads"),
    }
    out["qlat.{i}"] = Space(lambda c: c.q_lora_rank, "any", "q latent of layer i (q_a_layernorm's gain with it)",
                            kind="units", when=lambda c: c.q_lora_rank is not None)
    out["kvlat.{i}"] = Space(lambda c: c.kv_lora_rank, "any", "kv latent of layer i (not the RoPE key)", kind="units")
    out.update({
        "mlp.{i}": Space(lambda c: c.intermediate_size, "any", "SwiGLU units of dense layer i", kind="units",
                         ranges={"i": DENSE}),
        "moe.{i}": Space(experts, "none", "the routed experts of layer i, as wholes (router rows and score "
                         "correction bias with them), within routing groups and groups as wholes",
                         kind="grouped_experts", ranges={"i": SPARSE}),
        "experts.{i}.{e}": Space(lambda c: c.moe_intermediate_size, "any", "hidden units of routed expert e of "
                                 "layer i (source chart)", kind="units", ranges={"i": SPARSE, "e": experts},
                                 carried_by={"e": "moe.{i}"}),
        "shared.{i}": Space(lambda c: c.moe_intermediate_size * c.n_shared_experts, "any",
                            "hidden units of layer i's shared experts (one fused SwiGLU)", kind="units",
                            ranges={"i": SPARSE}),
    })
    return out


def _sites() -> Sites:
    inputs = {"attn.{i}": A + "o_proj", "qlat.{i}": A + "q_b_proj", "kvlat.{i}": A + "kv_b_proj",
              "mlp.{i}": M + "down_proj", "shared.{i}": M + "shared_experts.down_proj"}
    # moe.{i} / experts.{i}.{e}: no module's input is their activation (fused experts): matched from the weights
    return Sites(layers="model.layers", final_norm="model.norm", embed="model.embed_tokens", inputs=inputs)


# DeepSeek-V2's router: softmax, then greedy top-k or (group_limited_greedy) top-k within the topk_group best of
# n_group groups; any other topk_method computes no routing in transformers' DeepseekV2TopkRouter.
V2_ROUTING = Requires("topk_method", ("greedy", "group_limited_greedy"),
                      "greedy top-k is equivariant under every permutation of the experts, and group-limited top-k "
                      "under those that permute experts within their n_group groups and groups as wholes")


def _spec(name: str, mtp: bool) -> ArchSpec:
    return ArchSpec(
        name=name, model_types=(name,), norm="rmsnorm", spaces=_spaces(), rules=_rules(),
        file_rules=FILE_RULES + (MTP_FILE_RULES if mtp else ()), dims=_dims, sites=_sites(),
        requires=(SILU_GATE, RMSNORM) + ((V2_ROUTING,) if name == "deepseek_v2" else ()),
        file_only_layers=(lambda c: c.num_nextn_predict_layers) if mtp else None,
    )


DEEPSEEK_V2 = _spec("deepseek_v2", False)
DEEPSEEK_V3 = _spec("deepseek_v3", True)
