"""IBM Granite (dense): the Llama layout with scalar multipliers.

``embedding_multiplier`` scales the embedding output, ``residual_multiplier`` each sublayer output before it is
added, ``attention_multiplier`` replaces ``1/sqrt(head_dim)`` and ``logits_scaling`` divides the logits: all
scalars, which commute with every signed permutation. Residual group B_d; MLP units (SwiGLU) signed on the
(up, down) pair, gate rows permuted only; query heads permute within KV groups and KV groups as wholes.
Declared fields as Llama's: ``GraniteMLP`` gates with ``ACT2FN[hidden_act]`` (SiLU), ``GraniteRMSNorm``.
"""
from __future__ import annotations

from dataclasses import replace

from .llama import LLAMA

GRANITE = replace(LLAMA, name="granite", model_types=("granite",))
