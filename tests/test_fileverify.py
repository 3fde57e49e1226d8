"""Verify from checkpoint files: A's tensors moved on the fly equal B's for the right gauge, per-group report."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_model
from hf_gauge import GaugeError, apply_gauge, random_gauge
from hf_gauge.cli import main
from hf_gauge.fileverify import max_abs, tensor_group, verify_files


@pytest.fixture
def pair(tmp_path: Path):
    a = tiny_model("llama", tie=True, dtype=torch.bfloat16)
    g = random_gauge(a, seed=2, spaces=("residual", "mlp", "attn"))
    b = apply_gauge(copy.deepcopy(a), g)
    a.save_pretrained(tmp_path / "A", max_shard_size="20KB")
    b.save_pretrained(tmp_path / "B")
    g.save_pretrained(tmp_path / "G")
    random_gauge(a, seed=9, spaces=("residual",)).save_pretrained(tmp_path / "W")
    return tmp_path, a, b, g


def test_right_gauge_bit_exact(pair) -> None:
    tmp, a, b, g = pair
    rep = verify_files(tmp / "A", tmp / "B", g)
    assert rep["ok"] and rep["weights_bit_exact"] and rep["fingerprint_match"] and rep["max_abs_diff"] == 0
    assert rep["n_tensors"] == len(a.state_dict()) - 1 and rep["bytes"] > 0      # the tied lm_head is not stored
    grp = rep["groups"]["model.layers.{i}.mlp.up_proj.weight"]
    assert grp["tensors"] == 2 and grp["bit_exact"] == 2 and grp["max_abs_b"] > 0


def test_wrong_gauge_and_small_change(pair) -> None:
    tmp, a, b, g = pair
    from hf_gauge import load_gauge
    rep = verify_files(tmp / "A", tmp / "B", load_gauge(tmp / "W"))
    assert not rep["ok"] and not rep["weights_bit_exact"] and rep["max_abs_diff"] > 0.01
    # one entry of one tensor of B changed: only its group reports a difference, within a tolerance it passes
    shard = tmp / "B" / "model.safetensors"
    t = load_file(shard)
    name = "model.layers.1.self_attn.o_proj.weight"
    t[name][3, 4] += 0.125
    save_file(t, shard, metadata={"format": "pt"})
    rep = verify_files(tmp / "A", tmp / "B", g)
    bad = {k for k, v in rep["groups"].items() if v["max_abs_diff"] > 0}
    assert bad == {tensor_group(name)} and not rep["ok"] and rep["groups"][tensor_group(name)]["bit_exact"] == 1
    assert verify_files(tmp / "A", tmp / "B", g, atol=0.2)["ok"]
    del t["model.norm.weight"]
    save_file(t, shard, metadata={"format": "pt"})
    rep = verify_files(tmp / "A", tmp / "B", g, atol=1.0)
    assert not rep["ok"] and rep["missing_in_b"] == ["model.norm.weight"]


def test_cli_exit_codes(pair, capsys: pytest.CaptureFixture) -> None:
    tmp, *_ = pair
    assert main(["verify", str(tmp / "A"), str(tmp / "B"), "--gauge", str(tmp / "G")]) == 0
    out = capsys.readouterr().out
    assert "model.layers.{i}.self_attn.q_proj.weight" in out and out.strip().endswith("OK (weight atol 0.0)")
    assert main(["verify", str(tmp / "A"), str(tmp / "B"), "--gauge", str(tmp / "W"), "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert not rep["ok"] and rep["groups"]
    assert main(["verify", str(tmp / "A"), str(tmp / "nope"), "--gauge", str(tmp / "G")]) == 2
    tiny_model("llama", hidden_size=32).save_pretrained(tmp / "narrow")
    assert main(["verify", str(tmp / "A"), str(tmp / "narrow"), "--gauge", str(tmp / "G")]) == 2
    # with data: the in-memory check (loads both models, compares logits too)
    (tmp / "ids.json").write_text(json.dumps([[1, 2, 3, 4]]))
    assert main(["verify", str(tmp / "A"), str(tmp / "B"), "--gauge", str(tmp / "G"), "--data", str(tmp / "ids.json"),
                 "--dtype", "bfloat16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["symmetry_logit_diff"] == 0.0


def test_refuses_non_gauge(pair) -> None:
    tmp, *_ = pair
    with pytest.raises(GaugeError, match="Gauge"):
        verify_files(tmp / "A", tmp / "B", "not a gauge")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_max_abs_from_bits(dtype: torch.dtype) -> None:
    """B's largest |value| from the bits without the sign bit: the float maximum, -inf and -0.0 included; NaN sticks."""
    x = torch.tensor([0.5, -3.25, 2.0, -0.0], dtype=dtype)
    assert max_abs(x) == 3.25
    assert max_abs(-x) == 3.25 and max_abs(x[3:]) == 0.0 and max_abs(x[:0]) == 0.0
    assert max_abs(torch.tensor([1.0, float("-inf")], dtype=dtype)) == float("inf")
    nan = max_abs(torch.tensor([1.0, float("nan")], dtype=dtype))
    assert nan != nan
    assert max_abs(torch.tensor([3, -7, 5], dtype=torch.int32)) == 7.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kernels", ["numba", "torch"])
def test_chunked_compare_reports_like_the_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  dtype: torch.dtype, kernels: str) -> None:
    """Moved A and B compared block by block, read ahead in small blocks and chunks here: streamed readers (column
    moves), writers (row and inner column moves, A whole beside B's blocks) and gains; with the compiled one-pass
    comparison and with torch's chunked moves. A one-ulp change is found in its group only, with its exact size, and
    every group's max |B| is the tensors' own."""
    import hf_gauge.fileverify as fv
    from hf_gauge import engine, filefeatures

    monkeypatch.setattr(fv, "CHUNK_BYTES", 200)
    monkeypatch.setattr(filefeatures, "BLOCK_BYTES", 700)
    monkeypatch.setattr(engine, "KERNEL_MIN_ELEMENTS", 0)
    monkeypatch.setenv("HF_GAUGE_KERNELS", kernels)
    a = tiny_model("llama", tie=False, dtype=dtype)
    g = random_gauge(a, seed=4, spaces=("residual", "mlp", "attn"))
    b = apply_gauge(copy.deepcopy(a), g)
    a.save_pretrained(tmp_path / "A")
    t = {k: v.clone() for k, v in b.state_dict().items()}
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        x = t[name].view(torch.int16 if dtype.itemsize == 2 else torch.int32)
        x[2, 3] ^= 1                                               # one ulp
    save_file(t, tmp_path / "B.safetensors")
    b.save_pretrained(tmp_path / "B")
    (tmp_path / "B.safetensors").replace(tmp_path / "B" / "model.safetensors")
    rep = verify_files(tmp_path / "A", tmp_path / "B", g)
    bad = {k: v for k, v in rep["groups"].items() if v["max_abs_diff"] > 0}
    assert set(bad) == {"model.layers.{i}.mlp.up_proj.weight", "model.layers.{i}.mlp.down_proj.weight"}
    clean = dict(b.state_dict())
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        want = float((t[name][2, 3].double() - clean[name][2, 3].double()).abs())
        assert want > 0 and bad[tensor_group(name)]["max_abs_diff"] == pytest.approx(want, rel=1e-6)
        assert bad[tensor_group(name)]["bit_exact"] == 1
    for grp, v in rep["groups"].items():
        want = max(float(x.double().abs().max()) for k, x in t.items() if tensor_group(k) == grp)
        assert v["max_abs_b"] == want, grp
    assert not rep["ok"] and rep["n_tensors"] == len(t)


def test_tensor_of_the_wrong_width_refused(tmp_path: Path) -> None:
    """A (hostile) checkpoint whose reader has fewer residual columns than hidden_size: GaugeError, no clipped gather."""
    a = tiny_model("llama", tie=False)
    g = random_gauge(a, seed=1)
    a.save_pretrained(tmp_path / "A")
    t = load_file(tmp_path / "A" / "model.safetensors")
    t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:, :-1].contiguous()
    for name in ("A", "B"):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "config.json").write_text((tmp_path / "A" / "config.json").read_text())
        save_file(t, tmp_path / name / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(GaugeError, match="width mismatch"):
        verify_files(tmp_path / "A", tmp_path / "B", g)
