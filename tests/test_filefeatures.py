"""Reading features from checkpoint files: the same similarity as the in-memory features, block by block."""
from __future__ import annotations

import copy
import gc
import os
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from hf_gauge import GaugeError, apply_gauge, random_gauge
from hf_gauge.features import feature_correlation, paired_weight_features
from hf_gauge.filefeatures import CheckpointFiles, layer_tensors, residual_correlation


@pytest.fixture
def pair(tmp_path: Path):
    a = tiny_model("qwen2", tie=False)
    b = apply_gauge(copy.deepcopy(a), random_gauge(a, seed=5, spaces=("residual", "mlp", "attn")))
    a.save_pretrained(tmp_path / "A", max_shard_size="30KB")
    b.save_pretrained(tmp_path / "B")
    return tmp_path, a, b


@pytest.mark.parametrize("block_bytes", [1, 300, 1 << 20])
@pytest.mark.parametrize("max_rows", [None, 50])
@pytest.mark.parametrize("kernels", ["numba", "torch"])
def test_correlation_matches_in_memory(pair, block_bytes: int, max_rows, kernels: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The same similarity as the in-memory features, with the compiled sums of squares and with numpy's."""
    monkeypatch.setenv("HF_GAUGE_KERNELS", kernels)
    tmp, a, b = pair
    # float64 copies of the saved float32 weights: the in-memory features then accumulate in float64 as the reader does
    want = feature_correlation(*paired_weight_features(copy.deepcopy(a).double(), copy.deepcopy(b).double(),
                                                       max_rows=max_rows))
    with CheckpointFiles(tmp / "A", block_bytes=block_bytes) as fa, CheckpointFiles(tmp / "B", block_bytes=block_bytes) as fb:
        got, counts = residual_correlation(fa, fb, max_rows=max_rows)
    assert counts["n_signed"] == 2                          # embedding and lm_head (no writer biases in qwen2)
    assert torch.allclose(got, want, atol=1e-13, rtol=0)


def test_bf16_correlation_sums_in_float32(tmp_path: Path) -> None:
    """bf16 shards: block products may take bf16 operands (on CPUs with bf16 dot products), but every product is
    exact and the sums stay float32, so the similarity is the float64 one to float32 precision (bf16 sums would be
    off by about 1e-3); the process's matmul precision setting is left as it was."""
    a = tiny_model("qwen2", tie=False, dtype=torch.bfloat16, hidden_size=128, intermediate=192)
    b = apply_gauge(copy.deepcopy(a), random_gauge(a, seed=5, spaces=("residual",)))
    a.save_pretrained(tmp_path / "A")
    b.save_pretrained(tmp_path / "B")
    want = feature_correlation(*paired_weight_features(copy.deepcopy(a).double(), copy.deepcopy(b).double()))
    before = torch.backends.mkldnn.matmul.fp32_precision
    with CheckpointFiles(tmp_path / "A") as fa, CheckpointFiles(tmp_path / "B") as fb:
        got, _ = residual_correlation(fa, fb)
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    assert (got - want).abs().max() < 1e-6


def test_row_blocks_and_selected_rows(pair) -> None:
    tmp, a, _ = pair
    emb = a.model.embed_tokens.weight.detach()
    with CheckpointFiles(tmp / "A", block_bytes=5 * 64 * 4) as f:
        blocks = [x.clone() for x in f.row_blocks("model.embed_tokens.weight")]
        assert {x.shape[0] for x in blocks[:-1]} == {5}       # blocks of the requested size
        assert torch.equal(torch.cat(blocks), emb)
        rows = torch.tensor([0, 1, 2, 7, 9, 10, 50, 127])
        got = torch.cat([x.clone() for x in f.row_blocks("model.embed_tokens.weight", rows)])
        assert torch.equal(got, emb[rows])
        layer = layer_tensors(f, {"mlp.1"})
        assert set(layer) == {f"model.layers.1.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}


def test_mapped_blocks_are_the_rows_and_release_their_pages(pair) -> None:
    """Memory-mapped blocks hold the same rows as positional reads, in blocks of the requested size or whole; a
    closed iterator and a reader closed while a view is alive are fine (the mapping goes with the last view)."""
    tmp, a, _ = pair
    emb = a.model.embed_tokens.weight.detach()
    with CheckpointFiles(tmp / "A", block_bytes=5 * emb.shape[1] * 4) as f:
        blocks = [x.clone() for x in f.mapped_blocks("model.embed_tokens.weight")]
        assert {x.shape[0] for x in blocks[:-1]} == {5} and torch.equal(torch.cat(blocks), emb)
        (whole,) = [x.clone() for x in f.mapped_blocks("model.embed_tokens.weight", whole=True)]
        assert torch.equal(whole, emb)
        it = f.mapped_blocks("model.embed_tokens.weight")
        held = next(it)
        it.close()                                   # its pages are released; the view reads the file again
        assert torch.equal(held, emb[:5])
    gc.collect()
    assert torch.equal(held, emb[:5])                # the reader is closed, the mapping lives on with the view
    with CheckpointFiles(tmp / "A") as f:
        gain = next(f.mapped_blocks("model.norm.weight"))
        assert torch.equal(gain, a.model.norm.weight.detach())


def test_corrupt_shards_refused(pair) -> None:
    tmp, *_ = pair
    shard = tmp / "B" / "model.safetensors"
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) // 2])                  # truncated
    with pytest.raises(GaugeError, match="truncated"):
        CheckpointFiles(tmp / "B")
    (tmp / "B" / "model.safetensors").unlink()
    with pytest.raises(GaugeError, match="holds no model.safetensors"):
        CheckpointFiles(tmp / "B")


def test_prefetched_blocks_in_turn(pair) -> None:
    """Read-ahead blocks come in order, each in its own slot while the next ones are read; errors reach the consumer."""
    from hf_gauge.filefeatures import prefetched

    tmp, a, _ = pair
    emb = a.model.embed_tokens.weight.detach()
    with CheckpointFiles(tmp / "A", block_bytes=5 * emb.shape[1] * 4) as fa:
        held = list(prefetched(fa.row_blocks("model.embed_tokens.weight", slots=3)))
        assert len(held) > 3
        assert all(torch.equal(x, emb[5 * i:5 * i + 5]) for i, x in enumerate(held[-3:], len(held) - 3))
        blocks = [x.clone() for x in prefetched(fa.row_blocks("model.embed_tokens.weight", slots=3))]
        assert torch.equal(torch.cat(blocks), emb)
        it = prefetched(fa.row_blocks("model.embed_tokens.weight", slots=3))
        assert torch.equal(next(it), emb[:5])
        it.close()                                          # the reader stops; the files can be used again
        assert torch.equal(fa.read("model.embed_tokens.weight"), emb)

    def failing():
        yield 1
        raise GaugeError("truncated shard")

    with pytest.raises(GaugeError, match="truncated"):
        list(prefetched(failing()))


# ------------------------------------------------------------------------------------------------ issue 23, item 6
@pytest.mark.parametrize("how", ["truncate", "delete"])
@pytest.mark.parametrize("what", ["find", "verify"])
def test_shard_changed_after_validation_is_a_gauge_error(pair, monkeypatch, how, what) -> None:
    """find and verify from files: a shard truncated or deleted after its header was validated is one GaugeError
    naming the shard and saying to re-download (before: a raw ValueError from a short mapping, or SIGBUS)."""
    import hf_gauge.filefeatures as ff
    import hf_gauge.fileverify as fv
    from hf_gauge import find_gauge
    from hf_gauge.fileverify import verify_files
    tmp, a, b = pair
    g = random_gauge(a, seed=5, spaces=("residual", "mlp", "attn"))
    shard = sorted((tmp / "A").glob("*.safetensors"))[0]
    mod = ff if what == "find" else fv
    real = mod.prepare_kernels

    def change(n_bytes):                          # after validation, before any tensor is read
        if how == "delete":
            shard.unlink()
        else:
            os.truncate(shard, shard.stat().st_size - 64)
        return real(n_bytes)

    monkeypatch.setattr(mod, "prepare_kernels", change)
    with pytest.raises(GaugeError, match=f"{shard.name}.*re-download") as err:
        if what == "find":
            find_gauge(str(tmp / "A"), str(tmp / "B"))
        else:
            verify_files(tmp / "A", tmp / "B", g)
    assert "\n" not in str(err.value)
