"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE (pre-RMSNorm, GQA attention, top-k routed
SwiGLU experts), and the builders other MoE specs share (``moe_spec``; ``specs/ernie_moe.py``, ``phimoe.py``,
``glm4.py``).

Residual group B_d (RMSNorm), as for Llama: the router ``mlp.gate [E, d]`` reads the residual like any linear. Inside
each MoE layer i:
- ``moe.{i}``: the experts as wholes, permutations only. Slot ``k`` takes expert ``perm[k]``: its router row and
  every weight of the expert move together (a sign would negate a router logit, and softmax is not odd).
- ``experts.{i}.{e}``: the hidden units of expert ``e`` (SwiGLU: any permutation; signs on the up row / down column
  pair, never the gate row). Carried by ``moe.{i}`` and indexed by the SOURCE expert (see ``Space.carried_by``).
- ``shared.{i}`` (Qwen2-MoE): the always-on shared expert's units, as a dense SwiGLU MLP; its sigmoid gate
  ``shared_expert_gate [1, d]`` reads the residual.
- ``attn.{i}``: query heads within KV groups, KV groups as wholes (Qwen2-MoE's q/k/v biases and Qwen3-MoE's per-head
  q_norm / k_norm live in head space).

In memory (transformers >= 5) the experts are fused: ``experts.gate_up_proj [E, 2 ff, d]`` (rows ``[gate | up]``)
and ``experts.down_proj [E, d, ff]``; checkpoint files store one tensor per expert, which ``file_rules`` name
(Mixtral: ``block_sparse_moe.experts.{e}.w1`` gate, ``w3`` up, ``w2`` down).
Qwen's dense layers (``mlp_only_layers``, ``decoder_sparse_step > 1``: a layer routes to experts iff it is not in
``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step == 0``) hold a dense SwiGLU ``mlp.{gate,up,down}_proj`` of
``intermediate_size`` units: ``mlp.{i}`` on those layers, ``moe.{i}``, ``experts.{i}.{e}`` and ``shared.{i}`` on
the others (``layers_where``), the layout transformers builds in ``Qwen2MoeDecoderLayer``.
OLMoE is Qwen3-MoE's layout with OLMo 2's q/k RMSNorms over the whole projection (``[n_heads * head_dim]``: the
gain blocks move with their heads; see ``specs/olmo2.py``); its ``clip_qkv`` clamps q, k, v elementwise inside the
heads, which commutes with permuting head blocks.
Declared fields: ``hidden_act`` (each expert is ``act(gate) * up``, SiLU) and ``rms_norm_eps``. ``mlp_only_layers``
and ``decoder_sparse_step`` need no declaration: every value is a layout the spaces follow.
"""
from __future__ import annotations

from typing import Callable

from .base import UNTOUCHED, ArchSpec, Axis, Requires, Rule, Sites, Space, gain, layers_where, reads, segmented, writes
from .decoder import HEAD_RULES, RMSNORM, SILU_GATE, attention_rules, gated_mlp_rules, head_dim
from .layernorm import layernorm_rules

L = "model.layers.{i}."
ROUTER_ROWS = Axis(0, "moe.{i}", signed=False)
ROUTER_COLS = Axis(1, "moe.{i}", signed=False)        # a router statistic [groups, E] (Ernie's e_score_correction_bias)
EXPERT_SLICES = Axis(0, "moe.{i}", signed=False, stack="e")
E_GATE = Axis(0, "experts.{i}.{e}", signed=False)      # SiLU gate rows: permuted only
E_UP = Axis(0, "experts.{i}.{e}")                      # up rows: signed
E_DOWN = Axis(1, "experts.{i}.{e}")                    # down columns: signed
S_GATE, S_UP, S_DOWN = Axis(0, "shared.{i}", signed=False), Axis(0, "shared.{i}"), Axis(1, "shared.{i}")

Layers = Callable[[object, int], bool]      # (config, layer) -> whether the layer routes to experts


def qwen_moe_layer(c, i: int) -> bool:
    """``Qwen2MoeDecoderLayer``: experts unless listed in ``mlp_only_layers``, on every ``decoder_sparse_step``-th
    layer (``num_experts > 0``)."""
    return i not in (c.mlp_only_layers or ()) and c.num_experts > 0 and (i + 1) % c.decoder_sparse_step == 0


def moe_spaces(n_experts, expert_size, *, moe_layers: Layers | None = None, dense_size=None, shared_size=None,
               shared_when=None, residual: str = "any", experts_kind: str = "experts") -> dict[str, Space]:
    """Residual, heads, the experts (``moe.{i}``, kind ``experts_kind``) and their units, a shared expert's units
    (``shared_size``; on configs where ``shared_when`` holds) and, where ``moe_layers`` leaves layers dense, their
    SwiGLU units ``mlp.{i}``."""
    on_moe = {"i": layers_where(moe_layers)} if moe_layers else {}
    out = {
        "residual": Space(lambda c: c.hidden_size, residual, "residual stream", kind="residual"),
        "attn.{i}": Space(lambda c: c.num_attention_heads, "none", "query heads of layer i", kind="heads"),
    }
    if moe_layers:
        out["mlp.{i}"] = Space(dense_size, "any", "SwiGLU hidden units of dense layer i", kind="units",
                               ranges={"i": layers_where(lambda c, i: not moe_layers(c, i))})
    out.update({
        "moe.{i}": Space(n_experts, "none", "the experts of layer i, as wholes (router rows with them)",
                         kind=experts_kind, ranges=on_moe),
        "experts.{i}.{e}": Space(expert_size, "any", "hidden units of expert e of layer i (source chart)",
                                 kind="units", ranges={**on_moe, "e": n_experts}, carried_by={"e": "moe.{i}"}),
    })
    if shared_size is not None:
        out["shared.{i}"] = Space(shared_size, "any", "hidden units of layer i's shared expert", kind="units",
                                  ranges=on_moe, when=shared_when)
    return out


def shared_rules(path: str) -> tuple[Rule, ...]:
    """An always-on shared expert (a SwiGLU MLP, biases optional) at ``path``, in space ``shared.{i}``."""
    return (
        Rule(path + ".gate_proj.weight", reads(S_GATE)), Rule(path + ".gate_proj.bias", (S_GATE,)),
        Rule(path + ".up_proj.weight", reads(S_UP)), Rule(path + ".up_proj.bias", (S_UP,)),
        Rule(path + ".down_proj.weight", writes(S_DOWN)), Rule(path + ".down_proj.bias", writes()),
    )


def expert_rules(block: str = "mlp", router: str = "gate") -> tuple[Rule, ...]:
    """The router ``{block}.{router}.weight [E, d]`` (rows with their experts) and the fused experts in memory."""
    m = L + block + "."
    return (
        Rule(m + router + ".weight", reads(ROUTER_ROWS)),
        Rule(m + "experts.gate_up_proj", (EXPERT_SLICES, segmented(1, E_GATE, E_UP), Axis(2, "residual"))),
        Rule(m + "experts.down_proj", (EXPERT_SLICES, Axis(1, "residual"), Axis(2, "experts.{i}.{e}"))),
    )


def expert_file_rules(block: str, router: str, gate: str, up: str, down: str) -> tuple[Rule, ...]:
    """Per-expert checkpoint names (``{e}`` renamed under ``moe.{i}``) and the router's on-disk name."""
    e = L + block + ".experts.{e}."
    return (
        Rule(L + block + "." + router + ".weight", reads(ROUTER_ROWS)),
        Rule(e + gate + ".weight", reads(E_GATE)),
        Rule(e + up + ".weight", reads(E_UP)),
        Rule(e + down + ".weight", writes(E_DOWN)),
    )


def norm_rules(layernorm: bool = False) -> tuple[Rule, ...]:
    """The pre-norms of each layer and the final norm: RMSNorm gains, or LayerNorms with bias."""
    paths = (L + "input_layernorm", L + "post_attention_layernorm", "model.norm")
    if layernorm:
        return layernorm_rules(*paths)
    return tuple(Rule(p + ".weight", gain()) for p in paths)


def moe_sites(dense: bool, shared: str | None = None) -> Sites:
    """Observation sites: heads, dense layers' units, a shared expert's units (``shared``: its module path under
    ``model.layers.{i}``). ``moe.{i}`` and ``experts.{i}.{e}`` have no module whose input is their activation (the
    fused experts loop over slices functionally): they are matched from weights, also when activations are given."""
    inputs = {"attn.{i}": L + "self_attn.o_proj"}
    if dense:
        inputs["mlp.{i}"] = L + "mlp.down_proj"
    if shared:
        inputs["shared.{i}"] = L + shared + ".down_proj"
    return Sites(layers="model.layers", final_norm="model.norm", embed="model.embed_tokens", inputs=inputs)


def moe_spec(name: str, n_experts, expert_size, on_disk: tuple[str, str, str, str], *,
             shared: tuple[str, Callable] | None = None, shared_when=None, moe_layers: Layers | None = None,
             dense_size=None,
             qk_norm: tuple[Axis, ...] | None = None, router: str = "gate", layernorm: bool = False,
             experts_kind: str = "experts", rules: tuple[Rule, ...] = (), file_rules: tuple[Rule, ...] = (),
             requires: tuple[Requires, ...] = (SILU_GATE, RMSNORM)) -> ArchSpec:
    """A pre-norm MoE decoder's spec: experts counted and sized by the config callables; ``on_disk`` = (block,
    gate, up, down) names of the per-expert checkpoint tensors (the router's on-disk name is ``{block}.gate``);
    ``shared`` = (module path under the layer, size) of an always-on shared expert (present where ``shared_when``
    holds, if given); ``moe_layers(config, i)`` (None: every layer) picks the layers with experts, the others
    holding a dense SwiGLU ``mlp`` of ``dense_size`` units; ``qk_norm`` as in ``attention_rules``; ``router`` the
    router's module under ``mlp``; ``layernorm``: LayerNorms with bias (residual S_d x {±1}); ``rules`` /
    ``file_rules`` added (router statistics)."""
    dense = moe_layers is not None
    body = (Rule("model.embed_tokens.weight", reads()),) + attention_rules(L, qk_norm)
    body += (gated_mlp_rules(L) if dense else ()) + expert_rules("mlp", router)
    body += shared_rules(L + shared[0]) if shared else ()
    body += rules + norm_rules(layernorm) + (Rule("lm_head.weight", reads()), Rule("lm_head.bias", UNTOUCHED))
    return ArchSpec(name=name, model_types=(name,), norm="layernorm" if layernorm else "rmsnorm",
                    spaces=moe_spaces(n_experts, expert_size, moe_layers=moe_layers, dense_size=dense_size,
                                      shared_size=shared[1] if shared else None, shared_when=shared_when,
                                      residual="global" if layernorm else "any", experts_kind=experts_kind),
                    rules=body + HEAD_RULES,
                    file_rules=file_rules + expert_file_rules(on_disk[0], "gate", *on_disk[1:]),
                    dims=head_dim, sites=moe_sites(dense, shared[0] if shared else None), requires=requires)


QWEN_DISK = ("mlp", "gate_proj", "up_proj", "down_proj")
MIXTRAL = moe_spec("mixtral", lambda c: c.num_local_experts, lambda c: c.intermediate_size,
                   ("block_sparse_moe", "w1", "w3", "w2"))
QWEN2_MOE = moe_spec("qwen2_moe", lambda c: c.num_experts, lambda c: c.moe_intermediate_size, QWEN_DISK,
                     shared=("mlp.shared_expert", lambda c: c.shared_expert_intermediate_size),
                     rules=(Rule(L + "mlp.shared_expert_gate.weight", reads()),),
                     moe_layers=qwen_moe_layer, dense_size=lambda c: c.intermediate_size)
QWEN3_MOE = moe_spec("qwen3_moe", lambda c: c.num_experts, lambda c: c.moe_intermediate_size, QWEN_DISK,
                     moe_layers=qwen_moe_layer, dense_size=lambda c: c.intermediate_size)
OLMOE = moe_spec("olmoe", lambda c: c.num_experts, lambda c: c.intermediate_size, QWEN_DISK,
                 qk_norm=(Axis(0, "attn.{i}", signed=False, block="head_dim"),))
