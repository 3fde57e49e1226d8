"""A checkpoint's config.json is checked against its safetensors headers on every file path (issue 23, item 3)."""
from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

import pytest

from conftest import tiny_model
from hf_gauge import GaugeError, apply_gauge_to_checkpoint, find_gauge, random_gauge
from hf_gauge.cli import main
from hf_gauge.fileconfig import MAX_SIZE, checkpoint_config
from hf_gauge.fileverify import verify_files


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> tuple[Path, Path, object]:
    """A 2-layer tiny Llama checkpoint A (d=16, 2 heads, 1 KV head, ff=24), its gauged copy B and the gauge."""
    root = tmp_path_factory.mktemp("fileconfig")
    model = tiny_model("llama", hidden_size=16, layers=2, heads=2, kv_heads=1, intermediate=24)
    model.save_pretrained(root / "a")
    g = random_gauge(model, seed=1, spaces=("residual", "mlp", "attn"))
    apply_gauge_to_checkpoint(root / "a", g, root / "b", progress=False)
    return root / "a", root / "b", g


def lying(src: Path, dst: Path, field: str, value) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    if value is _MISSING:
        del cfg[field]
    else:
        cfg[field] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


_MISSING = object()
LIES = [
    ("num_hidden_layers", 10 ** 9), ("num_hidden_layers", 3), ("num_hidden_layers", 1), ("num_hidden_layers", 0),
    ("num_hidden_layers", 2 ** 80), ("num_attention_heads", 0), ("num_attention_heads", 4), ("hidden_size", "16"),
    ("hidden_size", 1e308), ("hidden_size", 16.0), ("hidden_size", True), ("hidden_size", -16),
    ("hidden_size", _MISSING), ("intermediate_size", 48), ("intermediate_size", MAX_SIZE + 1),
    ("intermediate_size", None), ("num_key_value_heads", 2),
]


@pytest.mark.parametrize("field,value", LIES, ids=[f"{f}={'missing' if v is _MISSING else v!r}"[:40] for f, v in LIES])
def test_a_lying_config_is_refused_on_every_file_path(ckpt, tmp_path, field, value) -> None:
    """apply, find and verify from files each answer within a second with one GaugeError naming config.json and
    the field (without the check: unbounded loops for 10**9 layers, ZeroDivisionError, transformers' validation
    errors, or a silently wrong apply of a 2-layer checkpoint described as 3 layers)."""
    a, b, g = ckpt
    bad = lying(a, tmp_path / "a", field, value)
    calls = {"apply": lambda: apply_gauge_to_checkpoint(bad, g, tmp_path / "out", progress=False),
             "find": lambda: find_gauge(str(bad), str(b)),
             "verify": lambda: verify_files(bad, b, g)}
    for what, call in calls.items():
        t0 = time.perf_counter()
        with pytest.raises(GaugeError) as err, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call()
        elapsed = time.perf_counter() - t0
        msg = str(err.value)
        assert "\n" not in msg and str(bad / "config.json") in msg, (what, msg)
        named = "num_key_value_heads" if field == "num_key_value_heads" else field
        assert named in msg, (what, msg)
        assert elapsed < 1.0, (what, elapsed)
    assert not (tmp_path / "out").exists()


def test_the_cli_reports_a_lying_config_in_one_line(ckpt, tmp_path, capsys) -> None:
    a, b, g = ckpt
    bad = lying(a, tmp_path / "a", "num_hidden_layers", 10 ** 9)
    g.save_pretrained(tmp_path / "g")
    for argv in (["apply", str(bad), "--gauge", str(tmp_path / "g"), "-o", str(tmp_path / "out")],
                 ["find", str(bad), str(b), "-o", str(tmp_path / "f")],
                 ["verify", str(bad), str(b), "--gauge", str(tmp_path / "g")]):
        assert main(argv) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "num_hidden_layers=1000000000" in lines[0] and "config.json" in lines[0], lines


def test_a_true_config_passes_and_its_view_is_transformers(ckpt) -> None:
    a, _, _ = ckpt
    from safetensors import safe_open
    with safe_open(str(a / "model.safetensors"), "pt") as f:
        tensors = {k: {"shape": list(f.get_slice(k).get_shape())} for k in f.keys()}
    config, spec = checkpoint_config(a, tensors)
    assert spec.name == "llama" and config.hidden_size == 16 and config.num_hidden_layers == 2
    del tensors["model.layers.1.mlp.up_proj.weight"]                  # layer 1 still present: fine
    checkpoint_config(a, tensors)
    gone = {k: v for k, v in tensors.items() if ".layers.1." not in k}
    with pytest.raises(GaugeError, match="num_hidden_layers=2.*hold 1"):
        checkpoint_config(a, gone)


def test_expert_counts_are_checked_against_names_and_stacked_axes(tmp_path) -> None:
    """The spec's placeholder ranges drive the check: per-expert names (``{e}`` in file rules) and fused tensors
    whose stacked axis runs over ``{e}`` must both hold exactly the configured number of experts."""
    from transformers import AutoConfig
    cfg = AutoConfig.for_model("mixtral", hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, vocab_size=32)
    cfg.save_pretrained(tmp_path)
    L = "model.layers.0."
    common = {"model.embed_tokens.weight": [32, 16], "model.norm.weight": [16], "lm_head.weight": [32, 16],
              L + "input_layernorm.weight": [16], L + "post_attention_layernorm.weight": [16],
              L + "self_attn.q_proj.weight": [16, 16], L + "self_attn.k_proj.weight": [8, 16],
              L + "self_attn.v_proj.weight": [8, 16], L + "self_attn.o_proj.weight": [16, 16]}

    def per_expert(n: int) -> dict:
        out = {L + "block_sparse_moe.gate.weight": [4, 16]}
        for e in range(n):
            for w, shape in (("w1", [8, 16]), ("w3", [8, 16]), ("w2", [16, 8])):
                out[f"{L}block_sparse_moe.experts.{e}.{w}.weight"] = shape
        return out

    def fused(n: int) -> dict:
        return {L + "mlp.gate.weight": [4, 16], L + "mlp.experts.gate_up_proj": [n, 16, 16],
                L + "mlp.experts.down_proj": [4, 16, 8]}

    def shapes(d: dict) -> dict:
        return {k: {"shape": v} for k, v in {**common, **d}.items()}

    checkpoint_config(tmp_path, shapes(per_expert(4)))
    checkpoint_config(tmp_path, shapes(fused(4)))
    for bad in (per_expert(3), per_expert(5)):
        with pytest.raises(GaugeError, match="num_local_experts=4"):
            checkpoint_config(tmp_path, shapes(bad))
    with pytest.raises(GaugeError, match="num_local_experts=4.*stacks 3"):
        checkpoint_config(tmp_path, shapes(fused(3)))
    with pytest.raises(GaugeError, match="index of 30 digits"):
        checkpoint_config(tmp_path, shapes({**per_expert(4), L + "block_sparse_moe.experts." + "9" * 30
                                            + ".w1.weight": [8, 16]}))
