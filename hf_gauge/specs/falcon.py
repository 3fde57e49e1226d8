"""Falcon (and RW): LayerNorm decoder, parallel or sequential attention + MLP, MQA, GQA (``new_decoder_architecture``),
rotary or ALiBi positions, optional biases.

Residual group S_d x {±1}: every LayerNorm on the residual (``input_layernorm``; ``post_attention_layernorm`` when
``parallel_attn`` is off; ``ln_attn`` / ``ln_mlp`` under ``new_decoder_architecture`` with two norms; ``ln_f``) has a
bias: gains permuted, biases signed by the global sign. Parallel or sequential, the sublayers read LayerNorm outputs
and write the residual through ``dense`` and ``dense_4h_to_h`` (biases with ``bias``). MLP units (``activation``,
GELU by default, elementwise and not odd) permute only.

Heads permute as wholes (rotary acts inside a head) within KV groups, groups as wholes. The fused
``query_key_value`` rows are ``[kv group, (its query heads | its key head | its value head), head_dim]`` in all three
layouts: ``new_decoder_architecture`` (``num_kv_heads`` groups), multi-query (one group: ``[q | k | v]``) and the
classic per-head ``[q | k | v]`` (one group per head) — one segmented axis interleaved over
``num_key_value_heads`` groups. With ``alibi`` the slopes are fixed by head index and all distinct (see ``bloom.py``),
so no head permutation is a symmetry: the heads space exists only without ALiBi (``Space.when``).
Declared field: ``layer_norm_epsilon``. ``new_decoder_architecture``, ``multi_query``, ``num_kv_heads``,
``parallel_attn``, ``num_ln_in_parallel_attn``, ``bias`` and ``activation`` need no declaration: every combination
transformers builds is covered by the rules above (tests/test_ln_families.py runs each), and ``alibi`` selects whether
the heads space exists.
"""
from __future__ import annotations

from .base import ArchSpec, Rule, Sites, Space, reads, segmented, writes
from .decoder import HEAD_RULES, KV_ROWS, O_COLS, Q_ROWS, plain_mlp_rules
from .layernorm import layernorm_eps, layernorm_rules

T = "transformer."
L = T + "h.{i}."
QKV_ROWS = segmented(0, Q_ROWS, KV_ROWS, KV_ROWS, groups="kv_heads")


def _dims(config) -> dict[str, int]:
    return {"head_dim": config.hidden_size // config.num_attention_heads, "kv_heads": config.num_key_value_heads}


FALCON = ArchSpec(
    name="falcon",
    model_types=("falcon",),
    norm="layernorm",
    spaces={
        "residual": Space(lambda c: c.hidden_size, "global", "residual stream", kind="residual"),
        "mlp.{i}": Space(lambda c: c.ffn_hidden_size, "none", "GELU hidden units of layer i", kind="units"),
        "attn.{i}": Space(lambda c: c.num_attention_heads, "none", "query heads of layer i", kind="heads",
                          when=lambda c: not c.alibi),
    },
    rules=(
        Rule(T + "word_embeddings.weight", reads()),
        Rule(L + "self_attention.query_key_value.weight", reads(QKV_ROWS)),
        Rule(L + "self_attention.query_key_value.bias", (QKV_ROWS,)),
        Rule(L + "self_attention.dense.weight", writes(O_COLS)),
        Rule(L + "self_attention.dense.bias", writes()),
        *plain_mlp_rules(L + "mlp.dense_h_to_4h", L + "mlp.dense_4h_to_h"),
        *(r for ln in ("input_layernorm", "post_attention_layernorm", "ln_attn", "ln_mlp")
          for r in layernorm_rules(L + ln)),
        *layernorm_rules(T + "ln_f"),
        Rule("lm_head.weight", reads()),
        *HEAD_RULES,
    ),
    dims=_dims,
    requires=(layernorm_eps("layer_norm_epsilon"),),
    sites=Sites(layers=T + "h", final_norm=T + "ln_f", embed=T + "word_embeddings",
                inputs={"mlp.{i}": L + "mlp.dense_4h_to_h", "attn.{i}": L + "self_attention.dense"}),
)
