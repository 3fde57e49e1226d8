"""find_gauge from checkpoint files: the same gauge as the in-memory data-free matcher, and the hidden true gauge."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import hf_gauge
from conftest import tiny_model
from hf_gauge import Gauge, GaugeError, apply_gauge, random_gauge
from hf_gauge.filefind import find_gauge_from_files
from hf_gauge.match import find_gauge as find_in_memory
from hub_server import local_network_only  # noqa: F401  (fixture)


def _pair(tmp: Path, model_type: str, spaces, seed: int = 3, dtype=torch.float32, **kw):
    a = tiny_model(model_type, dtype=dtype, **kw)
    g = random_gauge(a, seed=seed, spaces=spaces)
    b = apply_gauge(copy.deepcopy(a), g)
    a.save_pretrained(tmp / "A", max_shard_size="20KB")        # many shards + index json
    b.save_pretrained(tmp / "B")                                # one file
    return a, b, g


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "gpt_neox"])
@pytest.mark.parametrize("spaces", ["residual", "all"])
def test_files_equal_in_memory_equal_truth(tmp_path: Path, model_type: str, spaces: str) -> None:
    hidden = ("residual", "mlp", "attn") if spaces == "all" else ("residual",)
    a, b, g = _pair(tmp_path, model_type, hidden)
    from_files = hf_gauge.find_gauge(str(tmp_path / "A"), tmp_path / "B", spaces=spaces)
    in_memory = find_in_memory(a, b, spaces=spaces)
    assert from_files == in_memory == g
    assert set(from_files.spaces) == set(in_memory.spaces)
    assert from_files.source["fingerprint"] == in_memory.source["fingerprint"]
    assert from_files.target["fingerprint"] == in_memory.target["fingerprint"]
    assert from_files.metrics["from_files"] and from_files.metrics["min_margin"] > 0
    # the gauge found from files applies to the checkpoint without a fingerprint warning
    hf_gauge.apply_gauge_to_checkpoint(tmp_path / "A", from_files, tmp_path / "A2B", progress=False, strict=True)


def test_bf16_tied_and_row_cap(tmp_path: Path) -> None:
    """bf16 weights (float32 block products), a tied embedding, and a vocabulary row cap below the vocabulary."""
    a, b, g = _pair(tmp_path, "llama", ("residual", "mlp", "attn"), dtype=torch.bfloat16, tie=True)
    assert "lm_head.weight" not in json.loads((tmp_path / "A" / "model.safetensors.index.json").read_text())["weight_map"]
    for rows in (None, 40):
        ff = find_gauge_from_files(tmp_path / "A", tmp_path / "B", spaces="all", max_rows=rows)
        assert ff == find_in_memory(a, b, spaces="all", max_rows=rows) == g


def test_real_smollm2_streamed_copy(smollm2, smollm2_dir, tmp_path: Path) -> None:
    """Real SmolLM2-135M (vocab 49152 > the default row cap of 2048): the gauged copy written by the streaming apply."""
    g = random_gauge(smollm2, seed=11)
    hf_gauge.apply_gauge_to_checkpoint(smollm2_dir, g, tmp_path / "B", progress=False)
    ff = hf_gauge.find_gauge(str(smollm2_dir), str(tmp_path / "B"))
    b = apply_gauge(copy.deepcopy(smollm2), g)
    assert ff == find_in_memory(smollm2, b) == g
    assert ff.source["fingerprint"] == hf_gauge.fingerprint(smollm2)


def test_hub_ids(tmp_path: Path, local_network_only) -> None:
    from huggingface_hub import HfApi
    from hub_server import HubServer

    _, _, g = _pair(tmp_path, "llama", ("residual",))
    with HubServer() as hub:
        for name in ("A", "B"):
            HfApi(endpoint=hub.url).create_repo(f"org/{name}")
            hub.commit(f"org/{name}", {p.name: p.read_bytes() for p in (tmp_path / name).iterdir()})
        ff = find_gauge_from_files("org/A", "org/B", hub={"endpoint": hub.url, "cache_dir": tmp_path / "cache"})
    assert ff == g and ff.source["model_id"] == "org/A"


def test_refusals(tmp_path: Path) -> None:
    a, b, g = _pair(tmp_path, "llama", ("residual",))
    with pytest.raises(GaugeError, match="both"):
        hf_gauge.find_gauge(str(tmp_path / "A"), b)
    with pytest.raises(GaugeError, match="live models"):
        hf_gauge.find_gauge(str(tmp_path / "A"), str(tmp_path / "B"), data=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(GaugeError, match="only apply to live models"):
        hf_gauge.find_gauge(str(tmp_path / "A"), str(tmp_path / "B"), batch_size=4)
    with pytest.raises(GaugeError, match="procrustes"):
        hf_gauge.find_gauge(str(tmp_path / "A"), str(tmp_path / "B"), method="procrustes")
    with pytest.raises(GaugeError, match="no checkpoint folder"):
        hf_gauge.find_gauge(str(tmp_path / "A"), str(tmp_path / "nope"))
    tiny_model("llama", hidden_size=32).save_pretrained(tmp_path / "narrow")
    with pytest.raises(GaugeError, match="widths"):
        hf_gauge.find_gauge(str(tmp_path / "A"), str(tmp_path / "narrow"))
    tiny_model("gpt_neox").save_pretrained(tmp_path / "neox")
    with pytest.raises(GaugeError, match="architectures"):
        hf_gauge.find_gauge(str(tmp_path / "A"), str(tmp_path / "neox"))
    # a hostile index: a shard name that climbs out of the folder is refused before any file is read
    index = tmp_path / "A" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = "../B/model.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(GaugeError, match="plain file name"):
        hf_gauge.find_gauge(str(tmp_path / "A"), str(tmp_path / "B"))


def test_live_models_still_dispatch_to_match() -> None:
    a = tiny_model("llama")
    g = random_gauge(a, seed=1)
    b = apply_gauge(copy.deepcopy(a), g)
    assert isinstance(hf_gauge.find_gauge(a, b), Gauge) and hf_gauge.find_gauge(a, b) == g


# ------------------------------------------------------------------------------------------------ issue 23, item 6
def test_fp32_folder_against_bf16_folder_is_compared(tmp_path: Path) -> None:
    """An fp32 checkpoint against a bf16 copy of its gauged model: compared in float64 (the Gram of both widened
    exactly), not refused; the hidden gauge is found, residual and inner spaces, in both directions."""
    a, b, g = _pair(tmp_path, "llama", ("residual", "mlp", "attn"))
    b.to(torch.bfloat16).save_pretrained(tmp_path / "B16")
    assert find_gauge_from_files(tmp_path / "A", tmp_path / "B16", spaces="all") == g
    assert find_gauge_from_files(tmp_path / "B16", tmp_path / "A", spaces="all") == g.inverse()


@pytest.mark.parametrize("rows", [0, -5, 2.5, True])
def test_max_rows_must_be_positive(tmp_path: Path, rows) -> None:
    a, b, _ = _pair(tmp_path, "llama", ("residual",))
    with pytest.raises(GaugeError, match="max_rows="):
        find_gauge_from_files(tmp_path / "A", tmp_path / "B", max_rows=rows)
    with pytest.raises(GaugeError, match="max_rows="):
        find_in_memory(a, b, max_rows=rows)
