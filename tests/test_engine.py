"""The engine's kernel: moves equal dense indexing bit for bit, in any block size, in place or not."""
from __future__ import annotations

import pytest
import torch

import hf_gauge
from hf_gauge import GaugeError, SignedPermutation
from hf_gauge import engine
from hf_gauge.engine import Move, Scratch, move_rows, move_tensor, move_tensor_
from hf_gauge.group import as_bits

from conftest import assert_state_equal, state, tiny_model

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _reference(x: torch.Tensor, moves: tuple[Move, ...]) -> torch.Tensor:
    """Dense advanced indexing and float negation, one move at a time (the definition the kernel must equal)."""
    y = x.clone()
    for m in moves:
        y = y.index_select(m.axis, m.index)
        if m.sign is not None:
            shape = [1] * y.dim()
            shape[m.axis] = -1
            y = torch.where(m.sign.view(shape) < 0, -y, y)
    return y


def _moves(kind: str, n: int, w: int, seed: int = 0) -> tuple[Move, ...]:
    r, c = SignedPermutation.random(n, seed), SignedPermutation.random(w, seed + 1)
    rows, cols = Move(0, r.perm, r.sign), Move(1, c.perm, c.sign)
    return {"rows": (rows,), "cols": (cols,), "both": (rows, cols), "unsigned": (Move(1, c.perm, None),)}[kind]


@pytest.fixture
def tiny_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the multi-block CPU path on small tensors (blocks of a few rows)."""
    monkeypatch.setattr(engine, "_BLOCK_BYTES", 64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["rows", "cols", "both", "unsigned"])
@pytest.mark.parametrize("path", ["compiled", "torch-one-block", "torch-many-blocks"])
def test_move_tensor_equals_dense_indexing(dtype, kind, path, monkeypatch):
    if path == "compiled":
        monkeypatch.setattr(engine, "KERNEL_MIN_ELEMENTS", 0)
        monkeypatch.setenv("HF_GAUGE_KERNELS", "numba")
    else:
        monkeypatch.setenv("HF_GAUGE_KERNELS", "torch")
    if path == "torch-many-blocks":
        monkeypatch.setattr(engine, "_BLOCK_BYTES", 64)
    x = (torch.randn(37, 23, dtype=torch.float64) * 100).to(dtype)
    moves = _moves(kind, 37, 23)
    want = _reference(x, moves)
    before = x.clone()
    got = move_tensor(x, moves)
    assert torch.equal(as_bits(got), as_bits(want))
    assert torch.equal(as_bits(x), as_bits(before))                      # out of place: input untouched
    ptr = x.data_ptr()
    assert move_tensor_(x, moves, Scratch()) is x and x.data_ptr() == ptr  # in place: same storage
    assert torch.equal(as_bits(x), as_bits(want))
    out = torch.empty(10, 23, dtype=dtype)
    assert torch.equal(as_bits(move_rows(before, moves, 5, 15, out)), as_bits(want[5:15]))
    assert torch.equal(as_bits(move_rows(before, (), 5, 15, out)), as_bits(before[5:15]))   # no moves: a copy


def test_sign_flip_is_ieee_negation_for_special_values():
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, -3.5])
    x = special.repeat(4, 1)
    el = SignedPermutation(torch.arange(7), -torch.ones(7, dtype=torch.int64))
    got = move_tensor(x, (Move(1, el.perm, el.sign),))
    assert torch.equal(as_bits(got), as_bits(torch.neg(x)))             # sign bit flipped, NaN included
    assert torch.equal(as_bits(el(el(special))), as_bits(special))       # the group action uses the same rule


def test_one_dim_and_higher_rank_tensors(tiny_blocks):
    el = SignedPermutation.random(6, 4)
    m = Move(0, el.perm, el.sign)
    v = torch.randn(6, dtype=torch.bfloat16)
    assert torch.equal(move_tensor(v, (m,)), _reference(v, (m,)))
    t3 = torch.randn(6, 3, 2)
    assert torch.equal(move_tensor_(t3.clone(), (m,)), _reference(t3, (m,)))


def test_integer_tensors_multiply_and_unsigned_refuse_signs():
    el = SignedPermutation([1, 0, 2], [-1, 1, -1])
    m = Move(0, el.perm, el.sign)
    assert move_tensor(torch.tensor([5, 6, 7]), (m,)).tolist() == [-6, 5, -7]
    with pytest.raises(GaugeError, match="cannot apply signs"):
        move_tensor(torch.tensor([5, 6, 7], dtype=torch.uint8), (m,))
    with pytest.raises(GaugeError, match="width mismatch"):
        move_tensor(torch.zeros(4), (m,))


def test_scratch_reuses_and_grows():
    s = Scratch()
    a = s.bytes(100, "k")
    assert s.bytes(50, "k").data_ptr() == a.data_ptr()
    b = s.like(torch.zeros(3, 4, dtype=torch.bfloat16), key="k")
    assert b.shape == (3, 4) and b.dtype == torch.bfloat16
    assert s.bytes(10_000, "k").numel() == 10_000


@pytest.mark.parametrize("path", ["compiled", "torch"])
def test_apply_gauge_keeps_parameter_storage_and_views(tiny_blocks, ids, path, monkeypatch):
    if path == "torch":
        monkeypatch.setenv("HF_GAUGE_KERNELS", "torch")
    else:
        monkeypatch.setattr(engine, "KERNEL_MIN_ELEMENTS", 0)
        monkeypatch.setenv("HF_GAUGE_KERNELS", "numba")
    m = tiny_model("llama", tie=True)
    emb = m.get_input_embeddings().weight
    ptrs = {n: p.data_ptr() for n, p in m.named_parameters()}
    view = emb.data[:3]                                              # a view someone holds
    g = hf_gauge.random_gauge(m, seed=3, spaces=("residual", "mlp", "attn"))
    ref = m(ids).logits
    m.apply_gauge(g)
    assert {n: p.data_ptr() for n, p in m.named_parameters()} == ptrs
    assert m.lm_head.weight is emb and torch.equal(view, emb.data[:3])
    assert (m(ids).logits - ref).abs().max() < 1e-5


def test_refused_tensor_leaves_the_model_untouched():
    """A tensor that does not fit the gauge is found before anything moves: never a half-gauged model."""
    m = tiny_model("llama", layers=2)
    bad = m.model.layers[1].mlp.down_proj
    bad.weight = torch.nn.Parameter(torch.randn(bad.weight.shape[0], bad.weight.shape[1] + 1))
    before = state(m)
    g = hf_gauge.random_gauge(m, seed=0, spaces=("residual", "mlp"))
    with pytest.raises(GaugeError, match=r"layers\.1\.mlp\.down_proj\.weight.*width mismatch"):
        m.apply_gauge(g)
    assert_state_equal(before, state(m))


@pytest.mark.parametrize("kernels", ["torch", "numba"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_mover_equals_move_rows(monkeypatch: pytest.MonkeyPatch, kernels: str, dtype: torch.dtype) -> None:
    """``row_mover`` (checks and operands made once per tensor) gives ``move_rows``'s rows bit for bit, chunk by
    chunk, on both kernel paths; a move that does not fit is refused when the mover is made."""
    monkeypatch.setenv("HF_GAUGE_KERNELS", kernels)
    n, m = 300, 260
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, m, generator=gen).to(dtype)
    rs, cs = SignedPermutation.random(n, 1), SignedPermutation.random(m, 2)
    mv = (Move(0, rs.perm, rs.sign), Move(1, cs.perm, cs.sign))
    want = move_tensor(x, mv, out=torch.empty_like(x))
    got = torch.empty_like(x)
    f = engine.row_mover(x, mv)
    for r0 in range(0, n, 37):
        r1 = min(n, r0 + 37)
        f(r0, r1, got[r0:r1], Scratch())
    assert torch.equal(as_bits(got), as_bits(want))
    with pytest.raises(GaugeError, match="width mismatch"):
        engine.row_mover(x[:, :-1].contiguous(), mv)
