"""Registry of architecture specs keyed by ``config.model_type``. Adding an architecture = adding a spec file."""
from __future__ import annotations

from typing import Callable

from ..errors import GaugeError
from .base import ArchSpec, Axis, Requires, Rule, Sites, Space, fill, template_regex
from .arcee import ARCEE
from .bloom import BLOOM
from .cohere import COHERE
from .deepseek import DEEPSEEK_V2, DEEPSEEK_V3
from .falcon import FALCON
from .glm4 import GLM4, GLM4_MOE
from .gemma import GEMMA, GEMMA2, GEMMA3, GEMMA3_TEXT, VAULTGEMMA
from .gpt2 import GPT2
from .gpt_oss import GPT_OSS
from .gpt_neo import GPT_NEO
from .gpt_neox import GPT_NEOX
from .gptj import GPTJ
from .granite import GRANITE
from .granitemoehybrid import GRANITEMOEHYBRID
from .llama import EXAONE, LLAMA
from .ernie_moe import ERNIE4_5_MOE
from .llama4 import LLAMA4_TEXT
from .moe import MIXTRAL, OLMOE, QWEN2_MOE, QWEN3_MOE
from .olmo2 import OLMO2
from .opt import OPT
from .phi import PHI
from .phi3 import PHI3
from .phimoe import PHIMOE
from .qwen3_next import QWEN3_NEXT
from .smollm3 import SMOLLM3
from .stablelm import STABLELM
from .starcoder2 import STARCODER2

SPECS: dict[str, ArchSpec] = {mt: spec for spec in (LLAMA, GPT_NEOX, GEMMA, GEMMA2, GEMMA3_TEXT, GEMMA3, GRANITE, SMOLLM3,
                                                                        OLMO2, PHI3, MIXTRAL, QWEN2_MOE, QWEN3_MOE,
                                                                        OLMOE, ERNIE4_5_MOE, PHIMOE, GLM4, GLM4_MOE,
                                                                        EXAONE, VAULTGEMMA, ARCEE, COHERE,
                                                                        GPT2, GPT_NEO, GPTJ, OPT, DEEPSEEK_V2, DEEPSEEK_V3,
                                                                        BLOOM, FALCON, PHI, STARCODER2, STABLELM,
                                                                        GPT_OSS, LLAMA4_TEXT, QWEN3_NEXT, GRANITEMOEHYBRID)
                            for mt in spec.model_types}


def supported_model_types() -> list[str]:
    return sorted(SPECS)


def space_families() -> list[str]:
    """Every space family declared by a registered spec (``ArchSpec.families``), sorted; torch-free."""
    return sorted({f for spec in SPECS.values() for f in spec.families})


def carried(space: str) -> tuple[str, int, Callable[[int], str]] | None:
    """A space carried by another (``Space.carried_by``): ``"experts.3.5"`` -> ``("moe.3", 5, k -> "experts.3.k")``
    (the carrier's name, the index the space has among the carrier's elements, the name at another index); None for
    every other name. Space templates mean the same in every spec, so any spec that declares the template answers."""
    for spec in {id(s): s for s in SPECS.values()}.values():
        for tmpl, sp in spec.spaces.items():
            for ph, carrier in sp.carried_by.items():
                m = template_regex(tmpl).match(space)
                if m:
                    values = m.groupdict()
                    return fill(carrier, values), int(values[ph]), lambda k, v=values, t=tmpl, p=ph: fill(t, {**v, p: k})
    return None


def carried_last(spaces) -> list[str]:
    """``spaces`` with every carried space after the others (so carriers are matched first), order kept otherwise."""
    return sorted(spaces, key=lambda s: carried(s) is not None)


def get_spec(model_or_config_or_type) -> ArchSpec:
    """The spec for a model, a config, or a ``model_type`` string; ``GaugeError`` if unsupported."""
    mt = model_or_config_or_type
    if not isinstance(mt, str):
        config = getattr(mt, "config", mt)
        mt = getattr(config, "model_type", None)
    if mt not in SPECS:
        raise GaugeError(
            f"unsupported architecture model_type={mt!r}; hf_gauge supports {', '.join(supported_model_types())}. "
            "Add a spec under hf_gauge/specs/ to support another architecture."
        )
    return SPECS[mt]


__all__ = ["ArchSpec", "Axis", "Requires", "Rule", "Sites", "Space", "SPECS", "carried", "carried_last", "get_spec", "space_families", "supported_model_types"]
