"""Gauge-sweep audits: raw index claims disagree across charts, transported ones agree exactly."""
from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
import torch

from conftest import VOCAB, assert_state_equal, state, tiny_model
from hf_gauge import GaugeError
from hf_gauge.audit import ClaimResult, add_subparser, audit, topk_residual_claim


def _data(n=4, t=24, seed=0):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def test_topk_claim_is_a_chart_artefact_raw_and_exact_transported(tmp_path):
    model = tiny_model("llama", hidden_size=128, intermediate=192)
    before = state(model)
    data = _data()
    rep = audit(model, topk_residual_claim(data, k=10), n_gauges=4, data=data)
    assert_state_equal(state(model), before)                 # the audited model is never modified
    assert len(rep.rows) == 4 and rep.kind == "indices" and rep.space == "residual"
    assert rep.transported_agreement == 1.0
    assert all(r.transported_rank == 1.0 for r in rep.rows)  # same order too
    assert rep.raw_agreement < 0.5
    assert rep.max_logits_diff < 1e-5
    assert all(r.score_max_diff < 1e-4 for r in rep.rows)
    assert rep.passed()
    table = rep.table()
    assert "transported" in table and len(table.splitlines()) == 2 + 4 + 1
    fig = tmp_path / "audit.png"
    rep.plot(str(fig))
    assert fig.stat().st_size > 5000
    assert rep.to_dict()["transported_agreement"] == 1.0


def test_chart_bound_claim_fails_the_audit():
    """'The first five coordinates' ignores the model: identical raw, wrong once transported."""
    model = tiny_model("qwen3")
    rep = audit(model, lambda m: torch.arange(5), n_gauges=3)
    assert rep.raw_agreement == 1.0
    assert rep.transported_agreement < 1.0
    assert not rep.passed()
    assert "FAILED" in rep.table()


def test_vector_and_duck_typed_claims():
    model = tiny_model("mistral")
    data = _data()

    def mean_activation(m):          # a signed vector in the residual chart (transported with signs)
        out = m(input_ids=data, output_hidden_states=True).hidden_states[1]
        return out.mean((0, 1)).detach()

    rep = audit(model, mean_activation, n_gauges=3, data=data)
    assert rep.kind == "vector"
    assert rep.transported_agreement > 1 - 1e-6
    assert max(r.score_max_diff for r in rep.rows) < 1e-5
    assert rep.raw_agreement < 0.5

    def as_object(m):                # anything with .indices / .scores / .space (e.g. objects.IndexSet)
        r = topk_residual_claim(data, k=6, layer=0)(m)
        return SimpleNamespace(indices=r.indices.tolist(), scores=r.scores, space="residual")

    assert audit(model, as_object, n_gauges=2, data=data).transported_agreement == 1.0


def test_mlp_space_claim_under_mlp_gauges():
    model = tiny_model("llama")
    data = _data()

    def top_units(m):
        acts = []
        h = m.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda mod, a: acts.append(a[0]))
        with torch.no_grad():
            m(input_ids=data)
        h.remove()
        return ClaimResult(torch.topk(acts[0].abs().mean((0, 1)), 8).indices, space="mlp.1")

    rep = audit(model, top_units, n_gauges=3, data=data, spaces=("residual", "mlp", "attn"))
    assert rep.space == "mlp.1" and rep.width == model.config.intermediate_size
    assert rep.transported_agreement == 1.0 and rep.raw_agreement < 0.6
    # gauging only the residual leaves MLP indices where they were
    same = audit(model, top_units, n_gauges=2, data=data, spaces=("residual",))
    assert same.raw_agreement == 1.0 and same.transported_agreement == 1.0


def test_smollm2_topk_residual_audit(smollm2, smollm2_ids, tmp_path):
    data = smollm2_ids[:2, :48]
    rep = audit(smollm2, topk_residual_claim(data, k=20, layer=15), n_gauges=3, data=data, seed=0)
    assert rep.transported_agreement == 1.0
    assert all(r.transported_rank == 1.0 for r in rep.rows)
    assert rep.raw_agreement < 0.2                            # measured: ~0.0-0.03 (chance ~0.018)
    assert rep.max_logits_rel_diff <= 1e-5
    assert rep.passed()
    rep.plot(str(tmp_path / "smollm2_audit.png"))


def test_cli_subparser(tmp_path, capsys):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    parser = argparse.ArgumentParser(prog="hf-gauge")
    sub = parser.add_subparsers(dest="command")
    add_subparser(sub)
    fig = tmp_path / "out.png"
    args = parser.parse_args(["audit", str(tmp_path / "m"), "--claim", "topk-resid", "--k", "5", "--n-gauges", "2",
                              "--tokens", "64", "--seq", "16", "--figure", str(fig)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "transported" in out and fig.exists()


def test_refusals():
    model = tiny_model("llama")
    with pytest.raises(GaugeError, match="n_gauges"):
        audit(model, lambda m: torch.arange(3), n_gauges=0)
    with pytest.raises(GaugeError, match="claim must return"):
        audit(model, lambda m: "top coordinates", n_gauges=1)
    with pytest.raises(GaugeError, match="one value per coordinate"):
        audit(model, lambda m: torch.zeros(7), n_gauges=1)
    with pytest.raises(GaugeError, match="lie in"):
        audit(model, lambda m: torch.tensor([0, 999]), n_gauges=1)
    with pytest.raises(GaugeError, match="layer"):
        topk_residual_claim(_data(), layer=9)(model)
