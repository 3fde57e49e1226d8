"""Function-preservation battery over every entry of the spec registry (a new spec file is tested here without
editing tests), for ``*ForCausalLM``, bare base models (``AutoModel``) and ``*ForSequenceClassification``."""
from __future__ import annotations

import inspect

import pytest
import torch

import hf_gauge
from hf_gauge import apply_gauge, random_gauge, symmetry_group
from hf_gauge.specs import SPECS

VOCAB = 128
MODEL_TYPES = sorted(SPECS)
HEADS = ("causal", "base", "seq")


def _config(model_type: str, **over):
    from transformers import CONFIG_MAPPING
    cls = CONFIG_MAPPING[model_type]
    params = set(inspect.signature(cls.__init__).parameters) | set(getattr(cls, "__annotations__", {}))
    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
              tie_word_embeddings=False, pad_token_id=0)
    small = {"num_key_value_heads": 2, "head_dim": 16, "num_experts": 4, "num_local_experts": 4,
             "num_experts_per_tok": 2, "moe_intermediate_size": 32, "max_position_embeddings": 64}
    kw.update({k: v for k, v in small.items() if k in params})
    kw.update(over)
    return cls(**kw)


def build(model_type: str, head: str = "causal", seed: int = 0, constant_gains: bool = False):
    """A tiny random model of ``model_type`` with generic gains (or all gains 1) and random biases."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
    auto = {"causal": AutoModelForCausalLM, "base": AutoModel, "seq": AutoModelForSequenceClassification}[head]
    cfg = _config(model_type)
    torch.manual_seed(seed)
    try:
        model = auto.from_config(cfg).eval()
    except ValueError as e:          # this head is not implemented for this model type
        pytest.skip(f"{model_type}: {auto.__name__} unavailable ({str(e).splitlines()[0][:80]})")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                if n.endswith("weight"):
                    p.fill_(1.0) if constant_gains else p.normal_(1.0, 0.3)
                else:
                    p.normal_(0.0, 0.3)
    return model


def _out(model, head: str, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return (out.last_hidden_state if head == "base" else out.logits).double()


def _families(model) -> tuple[str, ...]:
    return tuple(dict.fromkeys(s.split(".")[0] for s in hf_gauge.gauge_spaces(model)))


IDS = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_battery_function_preserved_and_inverse_exact(model_type, head):
    m = build(model_type, head)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ref = _out(m, head, IDS)
    for spaces in (("residual",), _families(m)):
        g = random_gauge(m, seed=5, spaces=spaces)
        assert set(g.spaces) >= {"residual"} and (spaces == ("residual",) or len(g.spaces) > 1)
        apply_gauge(m, g)
        changed = [k for k in before if not torch.equal(m.state_dict()[k], before[k])]
        assert changed, "the gauge moved nothing"
        got = _out(m, head, IDS)
        want = g.residual.apply(ref.to(got.dtype)) if head == "base" else ref
        scale = want.abs().max()
        assert torch.allclose(got, want, atol=1e-5 * scale, rtol=1e-4), (model_type, head, spaces)
        apply_gauge(m, g.inverse())
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[k]), (model_type, head, spaces, k)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_battery_symmetry_group(model_type, head):
    spec = SPECS[model_type]
    generic = build(model_type, head)
    constant = build(model_type, head, constant_gains=True)
    if spec.norm == "layernorm":
        assert symmetry_group(generic) == symmetry_group(constant) == "S_d x {±1}"
    else:
        assert symmetry_group(generic) == "B_d"
        with pytest.warns(UserWarning, match="constant"):
            assert symmetry_group(constant) == "O(d)"


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_battery_base_model_names_and_fingerprint(model_type):
    """A bare base model and the CausalLM with the same weights share their chart: same fingerprint, and the same
    gauge moves the same tensors."""
    causal = build(model_type, "causal", seed=2)
    base = getattr(causal, causal.base_model_prefix)
    assert hf_gauge.fingerprint(causal) == hf_gauge.fingerprint(base)
    assert hf_gauge.gauge_spaces(base) == hf_gauge.gauge_spaces(causal)
    g = random_gauge(causal, seed=1, spaces=_families(causal))
    alone = build(model_type, "base", seed=2)
    alone.load_state_dict(base.state_dict())
    apply_gauge(causal, g)
    apply_gauge(alone, g)
    for k, v in alone.state_dict().items():
        assert torch.equal(v, base.state_dict()[k]), k
