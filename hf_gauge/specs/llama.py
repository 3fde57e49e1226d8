"""Llama-family decoders: Llama, Mistral, Qwen2, Qwen3 (pre-RMSNorm, SwiGLU MLP, GQA attention), and the families
that reuse the layout (read from each modeling file): InternLM3 and EXAONE (``LlamaForCausalLM`` itself), Helium
(Llama blocks, interleaved RoPE within each head), ERNIE 4.5 (``use_bias`` on every projection), Ministral (Qwen2
blocks, no biases, sliding-window layers) and Seed-OSS (q/k/v bias, ``attention_out_bias`` on o_proj,
``mlp_bias``).

Residual group B_d. MLP units of layer i: any permutation, signs act on the (up row, down column) pair only
(SiLU is not odd, so gate rows are permuted, never signed). Query heads permute within KV groups, and KV groups
as wholes; Qwen2's q/k/v biases and Qwen3's per-head q_norm/k_norm live in head space.
Declared fields: ``hidden_act`` (SiLU gate: ``LlamaMLP`` is ``down(act(gate x) * up x)``) and ``rms_norm_eps``
(``LlamaRMSNorm``). Biases (``attention_bias``, ``mlp_bias``, Qwen2's fixed q/k/v biases) all have rules; sliding
windows, RoPE parameters and ``head_dim`` act within heads and need no declaration.

EXAONE checkpoint files keep the original names (``transformer.h.{i}.attn.attention.q_proj``, ``c_fc_0`` gate,
``c_fc_1`` up, ``c_proj`` down, ``ln_1``/``ln_2``, ``wte``, ``ln_f``), which transformers renames on load and back on
save: ``EXAONE.file_rules`` are the Llama rules under those names, and under the inner names alone with Llama's
body prefix (a bare base model saves ``layers.{i}.attn.attention.q_proj``, which ``ArchSpec.file_alias`` prefixes).
"""
from __future__ import annotations

import re
from dataclasses import replace

from .base import ArchSpec, Rule, Sites, Space
from .decoder import RMSNORM, SILU_GATE, decoder_rules, head_dim

LLAMA = ArchSpec(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3", "internlm3", "helium", "ernie4_5", "ministral", "seed_oss"),
    norm="rmsnorm",
    spaces={
        "residual": Space(lambda c: c.hidden_size, "any", "residual stream", kind="residual"),
        "mlp.{i}": Space(lambda c: c.intermediate_size, "any", "SwiGLU hidden units of layer i", kind="units"),
        "attn.{i}": Space(lambda c: c.num_attention_heads, "none", "query heads of layer i", kind="heads"),
    },
    rules=decoder_rules("model.", ("input_layernorm", "post_attention_layernorm")),
    dims=head_dim,
    requires=(SILU_GATE, RMSNORM),
    sites=Sites(
        layers="model.layers",
        final_norm="model.norm",
        embed="model.embed_tokens",
        inputs={"mlp.{i}": "model.layers.{i}.mlp.down_proj", "attn.{i}": "model.layers.{i}.self_attn.o_proj"},
    ),
)

# transformers' conversion mapping for "exaone" (on-disk name -> live name), applied backwards to the live patterns:
# the body prefix (which a bare base model's files lack), then the names inside a layer
_EXAONE_BODY = ((r"^model\.embed_tokens\.", "transformer.wte."), (r"^model\.layers\.", "transformer.h."),
                (r"^model\.norm\.", "transformer.ln_f."))
_EXAONE_INNER = ((r"\.self_attn\.o_proj\.", ".attn.attention.out_proj."), (r"\.self_attn\.", ".attn.attention."),
                 (r"\.input_layernorm\.", ".ln_1."), (r"\.post_attention_layernorm\.", ".ln_2."),
                 (r"\.mlp\.gate_proj\.", ".mlp.c_fc_0."), (r"\.mlp\.up_proj\.", ".mlp.c_fc_1."),
                 (r"\.mlp\.down_proj\.", ".mlp.c_proj."))


def _renamed(pattern: str, renames: tuple[tuple[str, str], ...]) -> str:
    for old, new in renames:
        pattern = re.sub(old, new, pattern)
    return pattern


def _exaone_file_rules() -> tuple[Rule, ...]:
    out: dict[str, Rule] = {}
    for r in LLAMA.rules:
        inner = _renamed(r.pattern, _EXAONE_INNER)
        for name in (_renamed(inner, _EXAONE_BODY), inner):
            if name != r.pattern:
                out.setdefault(name, Rule(name, r.axes))
    return tuple(out.values())


EXAONE = replace(LLAMA, name="exaone", model_types=("exaone",), file_rules=_exaone_file_rules(),
                 sites=replace(LLAMA.sites, final_norm_files=("transformer.ln_f.weight",)))
