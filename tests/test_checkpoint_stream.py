"""The streaming writer's hot path: the output file sized up front and filled by worker threads (row chunks moved
from the mapped input and written at their offsets), untouched runs copied by ``copy_file_range`` or its fallback,
and ``config.json`` read without transformers' config classes where it holds every value the checks read."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import hf_gauge.checkpoint as ckpt
from conftest import tiny_model
from hf_gauge import GaugeError, apply_gauge_to_checkpoint, random_gauge
from hf_gauge.checkpoint import read_header
from hf_gauge.specs import SPECS
from hf_gauge.view import ConfigAbsent, JsonConfig
from test_architectures import build


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8) if t.numel() else t.reshape(-1).to(torch.uint8)


def single_file(tmp_path: Path, dtype: torch.dtype) -> tuple[Path, object, dict[str, torch.Tensor]]:
    """A one-file llama checkpoint written by ``save_file`` with ``__metadata__``, an empty (zero-size, untouched)
    ``lm_head.bias`` that sorts first and so starts at offset 0 beside a moved tensor at offset 0."""
    model = tiny_model("llama", dtype=dtype, hidden_size=64, intermediate=192)
    src = tmp_path / "src"
    model.config.save_pretrained(src)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    tensors["lm_head.bias"] = torch.empty(0, dtype=dtype)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt", "note": "kept verbatim"})
    return src, model, tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernels", ["torch", "numba"])
@pytest.mark.parametrize("parallel", [False, True])
def test_preallocated_writer_matches_in_memory_moves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     dtype: torch.dtype, kernels: str, parallel: bool) -> None:
    """Every tensor of the output equals the engine's in-memory move of the input tensor bit for bit, the header
    (offsets, ``__metadata__``) is the input's byte for byte, with one worker or several (tiny chunks, a tiny
    in-flight window: many chunks of a tensor written out of order, tensors released while others run)."""
    monkeypatch.setenv("HF_GAUGE_KERNELS", kernels)
    if parallel:
        monkeypatch.setattr(ckpt, "_PARALLEL_BYTES", 0)
        monkeypatch.setattr(ckpt, "_CHUNK_BYTES", 1000)
        monkeypatch.setattr(ckpt, "_WINDOW_BYTES", 4096)
    src, model, tensors = single_file(tmp_path, dtype)
    raw, header, start = read_header(src / "model.safetensors")
    assert min(i["data_offsets"][0] for i in header.values()) == 0 and header["lm_head.bias"]["data_offsets"] == [0, 0]
    g = random_gauge(model, seed=5, spaces="all")
    out = apply_gauge_to_checkpoint(src, g, tmp_path / "out", progress=False)
    assert read_header(out / "model.safetensors")[0] == raw
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "kept verbatim"}
        got = {k: f.get_tensor(k) for k in f.keys()}
    from hf_gauge.engine import move_tensor, moves_for
    from hf_gauge.specs import get_spec
    monkeypatch.setenv("HF_GAUGE_KERNELS", "torch")        # the reference: torch's gathers, whole tensors
    moves = moves_for(get_spec("llama"), model.config, g, list(tensors), strict=True, files=True)
    assert any(moves.values()) and not moves["lm_head.bias"]
    for k, t in tensors.items():
        want = move_tensor(t, moves[k])
        assert got[k].dtype == t.dtype and got[k].shape == t.shape
        assert torch.equal(_bits(got[k]), _bits(want)), k


def test_parallel_failure_stops_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk failing on a worker aborts the job: the error reaches the caller, no output or staging folder stays."""
    monkeypatch.setattr(ckpt, "_PARALLEL_BYTES", 0)
    monkeypatch.setattr(ckpt, "_CHUNK_BYTES", 1000)
    src, model, _ = single_file(tmp_path, torch.float32)
    real, calls = ckpt.row_mover, {"n": 0}

    def flaky_mover(*a, **k):
        move = real(*a, **k)

        def flaky(*b):
            calls["n"] += 1
            if calls["n"] == 5:
                raise RuntimeError("injected worker failure")
            return move(*b)
        return flaky
    monkeypatch.setattr(ckpt, "row_mover", flaky_mover)
    with pytest.raises(RuntimeError, match="injected worker failure"):
        apply_gauge_to_checkpoint(src, random_gauge(model, seed=1, spaces="all"), tmp_path / "out", progress=False)
    assert sorted(n for n in os.listdir(tmp_path) if not n.endswith(".hf_gauge.lock")) == ["src"]   # the lock stays


def test_untouched_runs_copied_without_copy_file_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the file system refuses ``copy_file_range`` (EXDEV, ENOSYS...), untouched runs are written from the
    mapping: the same bytes."""
    src, model, _ = single_file(tmp_path, torch.float32)
    g = random_gauge(model, seed=2, spaces=("mlp.1",))          # most tensors untouched: long raw runs
    a = apply_gauge_to_checkpoint(src, g, tmp_path / "a", progress=False)
    used = {"n": 0}

    def refuse(*args):
        used["n"] += 1
        raise OSError(errno.EXDEV, "cross-device")
    monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    monkeypatch.setattr(ckpt, "_COPY_CHUNK", 1000)
    b = apply_gauge_to_checkpoint(src, g, tmp_path / "b", progress=False)
    assert used["n"] > 0
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def _canon(moves: tuple) -> list:
    return [(m.axis, m.index.tolist(), None if m.sign is None else m.sign.tolist(), m.permutes,
             None if m.slices is None else [_canon(s) for s in m.slices]) for m in moves]


@pytest.mark.parametrize("model_type", sorted(SPECS))
def test_json_config_agrees_with_autoconfig(tmp_path: Path, model_type: str) -> None:
    """For every architecture, ``config.json`` read as stored gives the plans ``AutoConfig`` gives (or defers to it
    by ``ConfigAbsent``): the same spec and the same moves for every tensor of the checkpoint."""
    model = build(model_type)
    model.save_pretrained(tmp_path / "src")
    src = tmp_path / "src"
    g = random_gauge(model, seed=0, spaces="all")
    shards = ckpt._shards(src)
    headers = {s: read_header(src / s) for s in shards}
    config, spec, *want = ckpt._config_and_plans(src, g, headers, stored=False)
    try:
        jconfig, jspec, *got = ckpt._config_and_plans(src, g, headers, stored=True)
    except ConfigAbsent:
        pytest.skip(f"{model_type}: config.json lacks a value the checks read (AutoConfig is used)")
    assert jspec is spec and got[1] == want[1]
    assert {s: {n: _canon(m) for n, m in p.items()} for s, p in got[0].items()} == \
           {s: {n: _canon(m) for n, m in p.items()} for s, p in want[0].items()}


def test_json_config_defers_to_autoconfig_for_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A config.json without a value transformers would default (``num_key_value_heads``) is read by AutoConfig;
    a complete one never touches it; an unreadable one is refused as before."""
    model = tiny_model("llama", kv_heads=4, heads=4)
    src = tmp_path / "src"
    model.save_pretrained(src)
    g = random_gauge(model, seed=0, spaces="all")
    from transformers import AutoConfig
    real, calls = AutoConfig.from_pretrained, []

    def counted(*a, **k):
        calls.append(a)
        return real(*a, **k)
    monkeypatch.setattr(AutoConfig, "from_pretrained", counted)
    apply_gauge_to_checkpoint(src, g, tmp_path / "a", progress=False)
    assert calls == []
    doc = json.loads((src / "config.json").read_text())
    del doc["num_key_value_heads"]
    (src / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigAbsent):
        JsonConfig.read(src / "config.json").num_key_value_heads
    apply_gauge_to_checkpoint(src, g, tmp_path / "b", progress=False)
    assert len(calls) == 1
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    (src / "config.json").write_text("[1, 2]")
    with pytest.raises(GaugeError, match="config.json"):
        apply_gauge_to_checkpoint(src, g, tmp_path / "c", progress=False)


def test_cli_apply_imports_no_transformers_config_or_scipy(tmp_path: Path) -> None:
    """``hf-gauge apply`` of a checkpoint whose config.json is complete imports neither transformers nor scipy
    (about 1.5 s of a fresh process)."""
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "src")
    random_gauge(model, seed=0, spaces="all").save_pretrained(tmp_path / "g")
    code = ("import sys\nfrom hf_gauge.cli import main\n"
            f"rc = main(['apply', {str(tmp_path / 'src')!r}, '--gauge', {str(tmp_path / 'g')!r}, "
            f"'-o', {str(tmp_path / 'out')!r}, '--no-progress'])\n"
            "print(rc, sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'scipy', 'peft', 'sae_lens'}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "0 []"
    assert (tmp_path / "out" / "model.safetensors").is_file()
