"""Over every entry of the spec registry and every head class transformers registers for it (base model,
sequence / token classification, question answering): the symmetry group (generic gains -> the spec's group; every
residual gain constant -> O(d), which base models once missed), and one chart shared by a base model and the
CausalLM holding the same weights. The function-preservation battery is tests/test_architectures.py."""
from __future__ import annotations

import pytest
import torch

import hf_gauge
from hf_gauge import apply_gauge, random_gauge, symmetry_group
from hf_gauge.engine import axes_for
from hf_gauge.specs import SPECS
from hf_gauge.view import ModelView

from test_architectures import MODEL_TYPES, build, build_class, head_classes


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_symmetry_group_on_every_head_class(model_type):
    spec = SPECS[model_type]
    for _, cls in head_classes(model_type):
        m = build_class(model_type, cls)
        assert symmetry_group(m) == spec.group, cls
        if spec.norm == "layernorm":
            continue
        v = ModelView.of(m)
        with torch.no_grad():
            for n, p in v.named_parameters():
                axes = axes_for(spec, n)
                if p.dim() == 1 and axes and all(x.space == "residual" and not x.signed for x in axes):
                    p.fill_(1.0)
        with pytest.warns(UserWarning, match="constant"):
            assert symmetry_group(m) == "O(d)", cls


@pytest.mark.parametrize("model_type", [mt for mt in MODEL_TYPES if mt != "gemma3"])   # gemma3's body: gemma3_text
def test_base_model_shares_the_causal_lm_chart(model_type):
    """The same weights as a bare base model and inside the CausalLM: same fingerprint and spaces, and a gauge moves
    the base model's tensors exactly as it moves them inside the CausalLM."""
    causal = build(model_type)
    # Llama4ForCausalLM keeps its body at .model, although its prefix is the composite model's "language_model"
    base = getattr(causal, causal.base_model_prefix, None) or causal.model
    assert hf_gauge.fingerprint(causal) == hf_gauge.fingerprint(base)
    assert hf_gauge.gauge_spaces(base) == hf_gauge.gauge_spaces(causal)
    g = random_gauge(causal, seed=1, spaces="all")
    alone = {k: v.clone() for k, v in base.state_dict().items()}
    copy_ = type(base)._from_config(base.config)
    copy_.load_state_dict(alone)
    apply_gauge(causal, g)
    apply_gauge(copy_, g)
    for k, v in copy_.state_dict().items():
        assert torch.equal(v, base.state_dict()[k]), k
