"""verify(): gauge-equivalent models check out exactly; wrong gauges do not. apply_gauge's provenance checks."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import VOCAB, assert_state_equal, logits, state, tiny_model
from hf_gauge import GaugeError, apply_gauge, random_gauge, verify
from hf_gauge.verify import default_batch


@pytest.fixture
def pair():
    a = tiny_model("llama")
    g = random_gauge(a, seed=4, spaces=("residual", "mlp", "attn"))
    b = apply_gauge(copy.deepcopy(a), g)
    return a, b, g


def test_verify_exact_pair(pair) -> None:
    a, b, g = pair
    sa, sb = state(a), state(b)
    res = verify(a, b, g)
    assert res["weights_bit_exact"] and res["n_tensors_differ"] == 0 and res["max_abs_weight_diff"] == 0.0
    assert res["fingerprint_match"]
    assert res["max_abs_logit_diff"] < 1e-4 * max(1.0, res["max_abs_logit"])
    assert res["symmetry_logit_diff"] < 1e-4 * max(1.0, res["max_abs_logit"])
    assert res["relative_weight_diff"] == 0.0 and res["relative_weight_diff_without_gauge"] > 0.5
    assert res["tokens"] == default_batch(VOCAB).numel()
    assert_state_equal(state(a), sa) and assert_state_equal(state(b), sb)   # inputs untouched


def test_verify_wrong_gauge_fails(pair) -> None:
    a, b, g = pair
    wrong = random_gauge(a, seed=5, spaces=("residual", "mlp", "attn"))
    res = verify(a, b, wrong)
    assert not res["weights_bit_exact"] and res["n_tensors_differ"] > 0
    assert res["relative_weight_diff"] > 0.5 and not res["fingerprint_match"]
    # logits are gauge-invariant: a wrong gauge is still a symmetry, so only the weights expose it
    assert res["symmetry_logit_diff"] < 1e-4 * max(1.0, res["max_abs_logit"])
    # a fine-tune: B's weights differ slightly, logits close but weights not bit-exact
    with torch.no_grad():
        b.model.layers[0].mlp.up_proj.weight.add_(1e-3)
    res = verify(a, b, g)
    assert not res["weights_bit_exact"] and res["n_tensors_differ"] == 1
    assert 0 < res["max_abs_weight_diff"] < 2e-3
    assert 0 < res["relative_weight_diff"] < 0.01 < res["relative_weight_diff_without_gauge"]
    assert res["max_abs_logit_diff"] > 0 and abs(res["max_abs_logit_diff"] - res["max_abs_logit_diff_a_b"]) < 1e-4


def test_verify_data_forms(pair) -> None:
    a, b, g = pair
    ids = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))
    r1, r2, r3 = verify(a, b, g, data=ids), verify(a, b, g, data={"input_ids": ids}), verify(a, b, g, data=ids[0])
    assert r1["tokens"] == 21 and r2["tokens"] == 21 and r3["tokens"] == 7
    assert r1["max_abs_logit_diff"] == r2["max_abs_logit_diff"]
    for bad in (torch.rand(2, 3), torch.tensor([[VOCAB]]), torch.zeros(1, 2, 3, dtype=torch.long)):
        with pytest.raises(GaugeError, match="token ids"):
            verify(a, b, g, data=bad)
    with pytest.raises(GaugeError, match="one shape"):
        verify(a, tiny_model("llama", hidden_size=32), g)
    with pytest.raises(GaugeError, match="Gauge"):
        verify(a, b, g.residual)


def test_apply_fingerprint_mismatch_warns_or_refuses() -> None:
    a, other = tiny_model("llama"), tiny_model("llama", seed=9)
    g = random_gauge(a, seed=1)
    before = state(other)
    with pytest.raises(GaugeError, match="fingerprint"):
        apply_gauge(other, g, strict=True)
    assert_state_equal(state(other), before)                      # the refusal left the model untouched
    with pytest.warns(UserWarning, match="fingerprint"):
        apply_gauge(other, g)
    # the recorded source fingerprint matches: no warning at all, even strict
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_gauge(a, g, strict=True)


def test_apply_refuses_width_and_model_type() -> None:
    a = tiny_model("llama")
    with pytest.raises(GaugeError, match="width mismatch"):
        apply_gauge(a, random_gauge(tiny_model("llama", hidden_size=32), seed=0))
    with pytest.raises(GaugeError, match="model_type"):
        apply_gauge(a, random_gauge(tiny_model("qwen2"), seed=0))


def test_verify_takes_batches_like_the_activation_pipeline(pair) -> None:
    """``verify`` normalises ``data`` with ``activations.iter_batches``: batch dicts with padding masks (padding
    excluded from the counts and the logits), ids checked against the vocabulary in every batch, strings refused."""
    a, b, g = pair
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    r = verify(a, b, g, data=[{"input_ids": ids, "attention_mask": mask}, ids[0]])
    assert r["tokens"] == 10 + 6 and r["weights_bit_exact"]
    assert r["max_abs_logit_diff"] <= 1e-4
    with pytest.raises(GaugeError, match=r"token ids must lie in \[0, "):
        verify(a, b, g, data=[ids, torch.tensor([[VOCAB]])])
    with pytest.raises(GaugeError, match="tokenizer"):
        verify(a, b, g, data=["some text"])
    with pytest.raises(GaugeError, match="non-padding"):
        verify(a, b, g, data=[{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}])


@pytest.mark.parametrize("how, tie", [("device_map", False), ("disk_offload", False), ("device_map", True),
                                      ("disk_offload", True)])
def test_verify_an_offloaded_model_without_moving_its_weights(tmp_path, ids, how, tie):
    """An accelerate-offloaded A (weights on meta, values in the hooks' weights map) is verified tensor by tensor
    from where accelerate keeps its weights: bit-exact against its gauged copy, nothing of A modified; the data-free
    fit on it points to find_gauge(folder_a, folder_b)."""
    import hf_gauge
    from test_models import _disk_offloaded
    a = tiny_model("llama", seed=2, tie=tie)
    g = hf_gauge.random_gauge(a, seed=5, spaces=("residual", "mlp"))
    b = hf_gauge.apply_gauge(copy.deepcopy(a), g)
    off = _disk_offloaded(copy.deepcopy(a), tmp_path, how)
    before = {k: v.clone() for k, v in state(off).items() if v.device.type != "meta"}
    res = hf_gauge.verify(off, b, g)
    assert res["weights_bit_exact"] and res["n_tensors_differ"] == 0 and res["fingerprint_match"]
    assert res["relative_weight_diff_without_gauge"] > 0.1
    assert res["symmetry_logit_diff"] < 1e-4 and res["max_abs_logit_diff"] < 1e-4     # moved A ran, A unmoved
    assert res["max_abs_logit_diff_a_b"] < 1e-4 and res["relative_weight_diff"] == 0.0
    assert all(torch.equal(v, state(off)[k]) for k, v in before.items())
    assert torch.equal(logits(off, ids), logits(a, ids))                # the offload serves A's own weights again
    wrong = hf_gauge.verify(off, b, hf_gauge.random_gauge(a, seed=6, spaces=("residual", "mlp")))
    assert not wrong["weights_bit_exact"] and wrong["relative_weight_diff"] > 0.1
    with pytest.raises(GaugeError, match=r"meta device.*find_gauge\(folder_a, folder_b\)"):
        hf_gauge.find_gauge(off, b)
