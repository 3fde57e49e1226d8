"""The compiled kernels equal torch's gathers bit for bit: every dtype, in place along row cycles, split over
threads at any boundary; the engine falls back to torch where they do not apply."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import hf_gauge
from hf_gauge import SignedPermutation, engine, kernels
from hf_gauge.engine import Move, move_rows, move_tensor, move_tensor_
from hf_gauge.group import as_bits

from conftest import tiny_model, torch_threads

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn]


@pytest.fixture(autouse=True)
def numba_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels wherever they apply (the default, ``auto``, waits for a large tensor before loading numba)."""
    monkeypatch.setenv("HF_GAUGE_KERNELS", "numba")


def _torch(x: torch.Tensor, moves: tuple[Move, ...], monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    with monkeypatch.context() as mp:
        mp.setenv("HF_GAUGE_KERNELS", "torch")
        return move_tensor(x, moves)


def _perm(kind: str, n: int, seed: int) -> SignedPermutation:
    g = SignedPermutation.random(n, seed)
    perm = {"random": g.perm, "identity": torch.arange(n), "one cycle": torch.arange(n).roll(1),
            "swaps": torch.arange(n).view(-1, 2).flip(1).reshape(-1) if n % 2 == 0 else torch.arange(n).flip(0)}[kind]
    return SignedPermutation(perm, g.sign)


@pytest.fixture
def two_threads():
    with torch_threads(2):
        yield


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axes", ["rows", "cols", "both"])
@pytest.mark.parametrize("signed", [True, False])
def test_compiled_moves_equal_torch_moves(dtype, axes, signed, monkeypatch, two_threads):
    n, w = 1024, 1100                                # above MIN_PARALLEL: with two threads the spans run in parallel
    x = (torch.randn(n, w, dtype=torch.float64) * 50).to(dtype)
    r, c = SignedPermutation.random(n, 1), SignedPermutation.random(w, 2)
    moves = tuple(Move(a, p.perm, p.sign if signed else None) for a, p in ((0, r), (1, c)) if axes in ("both", ("rows", "cols")[a]))
    assert n * w >= kernels.MIN_PARALLEL
    want = as_bits(_torch(x, moves, monkeypatch))
    assert torch.equal(as_bits(move_tensor(x, moves)), want)
    y = x.clone()
    assert move_tensor_(y, moves) is y and torch.equal(as_bits(y), want)
    out = torch.empty(20, w, dtype=dtype)
    assert torch.equal(as_bits(move_rows(x, moves, 7, 27, out)), want[7:27])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spans", [1, 2, 3])
@pytest.mark.parametrize("axes", ["rows", "cols", "both", "none"])
def test_compare_rows_in_one_pass(dtype, spans, axes, monkeypatch):
    """``engine.compare_rows`` (``kernels.take_equal``): moved rows ``r0:r1`` against another tensor, bit for bit,
    and the other tensor's largest magnitude bits, split over any number of spans; one changed bit is found."""
    monkeypatch.setattr(kernels, "_threads", lambda rows, m: spans)
    n, w = 256, 300
    x = (torch.randn(n, w, dtype=torch.float64) * 50).to(dtype)
    r, c = SignedPermutation.random(n, 3), SignedPermutation.random(w, 4)
    moves = tuple(Move(a, p.perm, p.sign) for a, p in ((0, r), (1, c)) if axes in ("both", ("rows", "cols")[a]))
    want = as_bits(_torch(x, moves, monkeypatch))
    mag = torch.iinfo(want.dtype).max
    for r0, r1 in ((0, n), (5, 37), (9, 9)):
        other = want[r0:r1].clone()
        top = int((other & mag).max()) if r1 > r0 else 0
        assert engine.compare_rows(x, moves, r0, r1, other.view(dtype)) == (True, top)
        if r1 > r0:
            other[(r1 - r0) // 2, 7] ^= 1                                    # one bit
            assert engine.compare_rows(x, moves, r0, r1, other.view(dtype)) == (False, int((other & mag).max()))
    with monkeypatch.context() as mp:
        mp.setenv("HF_GAUGE_KERNELS", "torch")
        assert engine.compare_rows(x, moves, 0, n, want.view(dtype)) is None      # the caller compares itself


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("axis", [0, 1])
def test_square_sums_in_float64(dtype, axis):
    """``kernels.square_sums`` adds the float64 sums of squares along ``axis`` (bf16 widened exactly from its bits);
    other dtypes and non-contiguous tensors are left to the caller."""
    x = (torch.randn(37, 300, dtype=torch.float64) * 3).to(dtype)
    x[5, 7] = 0.0
    out = torch.full((x.shape[1 - axis],), 0.5, dtype=torch.float64)
    assert kernels.square_sums(x, axis, out)
    want = 0.5 + (x.double() ** 2).sum(axis)
    assert torch.allclose(out, want, rtol=1e-14, atol=0)
    assert not kernels.square_sums(x.half(), axis, out) and not kernels.square_sums(x.T, axis, out)


@pytest.mark.parametrize("kind", ["random", "identity", "one cycle", "swaps"])
@pytest.mark.parametrize("spans", [1, 2, 3, 7])
@pytest.mark.parametrize("cols", [False, True])
def test_in_place_row_cycles_split_over_any_number_of_spans(kind, spans, cols, monkeypatch):
    """Each span reads rows another span may already have written only through the saved copies."""
    monkeypatch.setattr(kernels, "_threads", lambda rows, m: spans)
    n, w = 50, 9
    rows = _perm(kind, n, 3)
    x = torch.randint(-2**15, 2**15 - 1, (n, w), dtype=torch.int16)
    colp = SignedPermutation.random(w, 4)
    want = x[rows.perm][:, colp.perm] if cols else x[rows.perm]
    mask = torch.where(rows.sign < 0, torch.iinfo(torch.int16).min, 0).to(torch.int16)
    want = want ^ mask[:, None]
    op_c = kernels.Operand(colp.perm.numpy(), None) if cols else None
    y = x.clone()
    assert kernels.take_(y, kernels.Operand(rows.perm.numpy(), mask.numpy()), op_c) is y
    assert torch.equal(y, want)
    z = torch.empty(n - 10, w, dtype=torch.int16)                 # out of place, rows 4:44, in spans too
    kernels.take(x, z, kernels.Operand(rows.perm.numpy(), mask.numpy()), op_c, 4, n - 6)
    assert torch.equal(z, want[4:n - 6])


@pytest.mark.parametrize("seed", range(5))
def test_cycles_visit_every_row_once_along_its_gather(seed):
    r = torch.randperm(200, generator=torch.Generator().manual_seed(seed)).numpy().astype(np.uint32)
    order, head, last = kernels.cycles(r)
    assert sorted(order.tolist()) == list(range(200))
    for p in range(200):
        nxt = order[head[p]] if last[p] else order[p + 1]
        assert r[order[p]] == nxt                    # the row written at step p reads the row written next
        assert head[p] <= p and (p == head[p] or not last[p - 1])


def test_engine_falls_back_to_torch(monkeypatch, ids):
    """No numba (or HF_GAUGE_KERNELS=torch), a non-contiguous tensor, signs on integers: torch gathers, same bits."""
    monkeypatch.setattr(engine, "KERNEL_MIN_ELEMENTS", 0)
    m = tiny_model("llama")
    g = hf_gauge.random_gauge(m, seed=1, spaces="all")
    ref = m(ids).logits
    m2 = tiny_model("llama")
    with monkeypatch.context() as mp:
        mp.setattr(engine, "_compiled", lambda: None)
        m2.apply_gauge(g)
    m.apply_gauge(g)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), m2.parameters()))
    assert (m.apply_gauge(g.inverse())(ids).logits - ref).abs().max() < 1e-5
    x = torch.randn(30, 40).t()                       # a transposed view: not contiguous
    mv = (Move(1, torch.randperm(30), SignedPermutation.random(30, 0).sign),)
    assert not engine._compiled_fits(x, mv)
    assert torch.equal(move_tensor(x, mv), x[:, mv[0].index] * mv[0].sign)
    xi = torch.arange(12, dtype=torch.int32).view(3, 4)
    mi = (Move(0, torch.tensor([2, 0, 1]), torch.tensor([1, -1, 1], dtype=torch.int8)),)
    assert not engine._compiled_fits(xi, mi)
    assert torch.equal(move_tensor(xi, mi), xi[[2, 0, 1]] * torch.tensor([1, -1, 1], dtype=torch.int32)[:, None])


def test_small_tensors_stay_on_torch():
    n = int(engine.KERNEL_MIN_ELEMENTS ** 0.5)
    mv = (Move(1, torch.randperm(n), None),)
    assert not engine._compiled_fits(torch.randn(n - 1, n), mv)
    assert engine._compiled_fits(torch.randn(n, n), mv)


def test_auto_mode_loads_numba_only_for_a_large_job(monkeypatch):
    """``auto``: a fresh process gauging a small model never imports numba (0.7 s it would not win back); a job of
    moving KERNEL_IMPORT_ELEMENTS loads the kernels, then every tensor they fit uses them. Bad values are refused."""
    code = ("import sys, torch, hf_gauge\n"
            "from transformers import LlamaConfig, LlamaForCausalLM\n"
            "m = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1, "
            "num_attention_heads=4, num_key_value_heads=2, vocab_size=512))\n"
            "m.apply_gauge(hf_gauge.random_gauge(m, seed=0, spaces='all'))\n"
            "print('numba' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "HF_GAUGE_KERNELS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
    monkeypatch.setenv("HF_GAUGE_KERNELS", "auto")
    engine._compiled.cache_clear()
    mv = (Move(1, torch.randperm(300), None),)
    x = torch.randn(300, 300)
    assert not engine.prepare_kernels(engine.KERNEL_IMPORT_ELEMENTS - 1) and not engine._compiled_fits(x, mv)
    assert engine.prepare_kernels(engine.KERNEL_IMPORT_ELEMENTS)                # a large job loads them
    assert engine._compiled_fits(x, mv) and engine.prepare_kernels(0)       # loaded: every job uses them
    monkeypatch.setenv("HF_GAUGE_KERNELS", "torch")
    assert not engine._compiled_fits(x, mv) and not engine.prepare_kernels(1 << 40)
    monkeypatch.setenv("HF_GAUGE_KERNELS", "fast")
    with pytest.raises(hf_gauge.GaugeError, match="HF_GAUGE_KERNELS='fast'"):
        move_tensor(x, mv)
