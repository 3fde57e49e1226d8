"""The activation pipeline: one moment accumulator (with head blocks), position ids from the padding mask."""
from __future__ import annotations

import pytest
import torch

from hf_gauge import GaugeError
from hf_gauge.activations import PairStats, capture_inputs, iter_batches, token_batches

from conftest import tiny_model


def _corr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = x - x.mean(0), y - y.mean(0)
    return (x * y).sum(0) / (x.norm(dim=0) * y.norm(dim=0))


def test_block_correlation_is_the_mean_per_dimension_correlation():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 12, generator=g, dtype=torch.float64)
    b = a[:, [4, 5, 6, 7, 0, 1, 2, 3, 8, 9, 10, 11]] + 0.5 * torch.randn(500, 12, generator=g, dtype=torch.float64)
    st = PairStats(sites=["x"], d=12, blocks=3)
    st.update(0, a[:200], b[:200])
    st.update(0, a[200:], b[200:])
    C = st.site_correlation(0)
    assert C.shape == (3, 3)
    for i in range(3):
        for j in range(3):
            want = _corr(a[:, 4 * i:4 * i + 4], b[:, 4 * j:4 * j + 4]).mean()
            assert torch.allclose(C[i, j], want, atol=1e-10)
    assert C.argmax(1).tolist() == [1, 0, 2]
    with pytest.raises(GaugeError, match="blocks"):
        PairStats(sites=["x"], d=10, blocks=3)


def test_left_padding_is_exact_through_the_pipeline():
    """Position ids follow the padding mask: a left-padded row gives the same activations as the unpadded row."""
    m = tiny_model("llama")
    ids = torch.randint(1, 100, (1, 6), generator=torch.Generator().manual_seed(1))
    padded = {"input_ids": torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1),
              "attention_mask": torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)}
    site = {"x": "model.layers.1.mlp.down_proj"}
    (i0, m0), = token_batches(ids)
    (i1, m1), = token_batches([padded])
    seen = []
    h = m.model.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw.get("position_ids")), with_kwargs=True)
    try:
        plain = capture_inputs(m, site, i0, m0)["x"]
        left = capture_inputs(m, site, i1, m1)["x"]
    finally:
        h.remove()
    assert seen[1].tolist() == [[0, 0, 0, 0, 1, 2, 3, 4, 5]]          # from the mask, not 0..8
    assert plain.shape == left.shape == (6, 96)
    assert torch.allclose(plain, left, atol=1e-5)


def test_iter_batches_checks_ids_against_the_vocabulary() -> None:
    ok = torch.tensor([[0, 4, 9]])
    it, n = iter_batches(ok, vocab_size=10)
    assert n == 1 and torch.equal(next(it)[0], ok)
    for bad in (torch.tensor([[0, 10]]), [{"input_ids": torch.tensor([[3, -1]])}]):
        it, _ = iter_batches(bad, vocab_size=10)
        with pytest.raises(GaugeError, match=r"token ids must lie in \[0, 10\)"):
            next(it)
    it, _ = iter_batches(torch.tensor([[0, 10]]))          # no vocab_size: ids are not range-checked
    assert int(next(it)[0].max()) == 10
