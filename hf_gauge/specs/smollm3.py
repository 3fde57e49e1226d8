"""SmolLM3: the Llama layout where some layers use no rotary embedding (``no_rope_layers``).

RoPE rotates within each head's ``head_dim`` (it never touches the residual), and a layer without it is plain
attention: whole heads still permute within KV groups and KV groups as wholes, in every layer alike. Residual
group B_d; MLP units (SwiGLU) signed on the (up, down) pair, gate rows permuted only. Declared fields as Llama's
(``SmolLM3MLP``'s SiLU gate, ``SmolLM3RMSNorm``).
"""
from __future__ import annotations

from dataclasses import replace

from .llama import LLAMA

SMOLLM3 = replace(LLAMA, name="smollm3", model_types=("smollm3",))
