"""Property-based fuzzing of every file hf_gauge reads from the Hub (issue 11).

Valid gauge folders, checkpoint shards and shard indexes are mutated (bytes, JSON fields, value types, tensor and
shard names, with and without a matching checksum) and loaded or applied. Every call must either succeed correctly
(a loaded gauge re-saves and reloads equal; an applied checkpoint keeps every shard header and size) or raise
``GaugeError``: never another exception, and never a write outside the output folder. Tiny models are built once
per module; the whole file runs in well under a minute.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_model
from hf_gauge import Gauge, GaugeError, SignedPermutation, apply_gauge_to_checkpoint, load_gauge, random_gauge, \
    save_gauge
from hf_gauge.checkpoint import INDEX_NAME, read_header
from hf_gauge.hub import CONFIG_NAME, WEIGHTS_NAME

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

HOSTILE_NAMES = ["../escape.safetensors", "/etc/passwd", "..", ".", "", "a/b.safetensors", "a\\b", "nul\0",
                 "C:x", "mlp.01", "attn.+1", "residual ", "x" * 300, "model.safetensors", "\u202e.safetensors"]
names = st.sampled_from(HOSTILE_NAMES) | st.text(max_size=12)
scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | names
           | st.sampled_from(["F32", "I8", "I64", "BOOL", "F8_E4M3", "Q7", "torch", "numpy", "hf_gauge.gauge"]))
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(names, c, max_size=3),
                           max_leaves=6)


# ------------------------------------------------------------------------------------------------ mutators
def _paths(doc: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, path + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, path + (i,))
    return out


def mutate_json(data: st.DataObject, doc: Any) -> Any:
    """Replace, delete or rename one node anywhere in ``doc`` (a copy), or replace the whole document."""
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(doc)
        shallow = [q for q in paths if len(q) <= 2]                   # top-level fields and their entries: often
        path = data.draw(st.sampled_from(shallow if shallow and data.draw(st.booleans()) else paths))
        if not path:
            doc = data.draw(json_values)
            continue
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        op = data.draw(st.sampled_from(["replace", "delete", "rename"]))
        if op == "replace":
            parent[key] = data.draw(json_values)
        elif op == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[data.draw(names)] = parent.pop(key)
    return doc


def mutate_bytes(data: st.DataObject, raw: bytes) -> bytes:
    op = data.draw(st.sampled_from(["flip", "truncate", "append", "splice"]))
    b = bytearray(raw)
    if op == "flip" and b:
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(b) - 1))
            b[i] ^= data.draw(st.integers(1, 255))
    elif op == "truncate":
        del b[data.draw(st.integers(0, len(b))):]
    elif op == "append":
        b += data.draw(st.binary(min_size=1, max_size=16))
    elif b:
        i = data.draw(st.integers(0, len(b) - 1))
        b[i:i + 8] = data.draw(st.binary(max_size=8))
    return bytes(b)


def split_st(raw: bytes) -> tuple[Any, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join_st(header: Any, body: bytes) -> bytes:
    h = json.dumps(header, allow_nan=True).encode()
    return len(h).to_bytes(8, "little") + h + body


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*")) if not p.is_symlink()}


# ------------------------------------------------------------------------------------------------ gauge folders
@pytest.fixture(scope="module")
def gauge_files() -> tuple[bytes, bytes]:
    gen = torch.Generator().manual_seed(0)
    g = Gauge(SignedPermutation.random(8, gen), mlp={0: SignedPermutation.random(6, gen)},
              attn={1: SignedPermutation.random(4, gen, signed=False)},
              source={"model_type": "llama", "model_id": "org/a"}, method="signed",
              metrics={"mean_matched": 0.9, "n_tokens": 100}, confidence={"residual": torch.rand(8, generator=gen),
                                                                          "threshold": 0.05})
    with tempfile.TemporaryDirectory() as tmp:
        save_gauge(g, Path(tmp) / "g")
        return (Path(tmp) / "g" / WEIGHTS_NAME).read_bytes(), (Path(tmp) / "g" / CONFIG_NAME).read_bytes()


def _load_checked(weights: bytes, config: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "g"
        folder.mkdir()
        (folder / WEIGHTS_NAME).write_bytes(weights)
        (folder / CONFIG_NAME).write_bytes(config)
        before = tree(root)
        try:
            g = load_gauge(folder)
        except GaugeError as e:
            assert "\n" not in str(e)
            g = None
        assert tree(root) == before                               # loading never writes
        if g is not None:                                         # succeeded: a valid gauge that round-trips
            assert load_gauge(save_gauge(g, root / "again")) == g


@FUZZ
@given(data=st.data())
def test_fuzz_gauge_folder_bytes(gauge_files, data) -> None:
    weights, config = gauge_files
    which = data.draw(st.sampled_from(["weights", "config", "both"]))
    if which in ("weights", "both"):
        weights = mutate_bytes(data, weights)
    if which in ("config", "both"):
        config = mutate_bytes(data, config)
    _load_checked(weights, config)


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_fuzz_gauge_config_fields_with_valid_checksum(gauge_files, data) -> None:
    weights, config = gauge_files
    cfg = mutate_json(data, json.loads(config))
    if isinstance(cfg, dict):
        cfg["weights_sha256"] = hashlib.sha256(weights).hexdigest()      # past the checksum: the deeper checks
    _load_checked(weights, json.dumps(cfg, allow_nan=True).encode())


@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_fuzz_gauge_weights_header_with_valid_checksum(gauge_files, data) -> None:
    weights, config = gauge_files
    header, body = split_st(weights)
    if data.draw(st.booleans()):
        header = mutate_json(data, header)
    else:
        body = mutate_bytes(data, body)
    new = join_st(header, body)
    cfg = json.loads(config)
    cfg["weights_sha256"] = hashlib.sha256(new).hexdigest()
    if data.draw(st.booleans()):                                          # keep config and weights in step
        cfg = mutate_json(data, cfg)
    _load_checked(new, json.dumps(cfg, allow_nan=True).encode())


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def checkpoint() -> tuple[dict[str, bytes], Any]:
    model = tiny_model("llama", hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate=24)
    gauge = random_gauge(model, seed=3, spaces=("residual", "mlp", "attn"))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "m", max_shard_size="4KB")
        files = {p.name: p.read_bytes() for p in (Path(tmp) / "m").iterdir() if p.is_file()}
    assert INDEX_NAME in files and sum(n.endswith(".safetensors") for n in files) > 2
    return files, gauge


def _apply_checked(files: dict[str, bytes], gauge) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = root / "work" / "src"
        src.mkdir(parents=True)
        for name, raw in files.items():
            (src / name).write_bytes(raw)
        (root / "escape.safetensors").write_bytes(b"victim")           # what ../ names would reach
        before = tree(root)
        out = root / "work" / "out"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                apply_gauge_to_checkpoint(src, gauge, out, progress=False)
            ok = True
        except GaugeError as e:
            assert "\n" not in str(e)
            ok = False
        after = tree(root)
        assert {k: v for k, v in after.items()                    # nothing else written (but the output's lock file)
                if not k.startswith("work/out") and k != "work/.out.hf_gauge.lock"} == before
        if ok:            # succeeded: every shard kept its header and size, and safetensors loads the output
            from safetensors import safe_open
            for p in src.glob("*.safetensors"):
                assert read_header(out / p.name)[0] == read_header(p)[0]
                assert (out / p.name).stat().st_size == p.stat().st_size
                with safe_open(str(out / p.name), framework="pt") as f:
                    for k in f.keys():
                        f.get_tensor(k)
        else:
            assert not out.exists()


@settings(FUZZ, max_examples=30)
@given(data=st.data())
def test_fuzz_checkpoint_shard_headers(checkpoint, data) -> None:
    files, gauge = checkpoint
    files = dict(files)
    shard = data.draw(st.sampled_from(sorted(n for n in files if n.endswith(".safetensors"))))
    header, body = split_st(files[shard])
    if data.draw(st.booleans()):
        files[shard] = join_st(mutate_json(data, header), body)
    else:
        files[shard] = mutate_bytes(data, files[shard])
    _apply_checked(files, gauge)


@settings(FUZZ, max_examples=30)
@given(data=st.data())
def test_fuzz_checkpoint_index(checkpoint, data) -> None:
    files, gauge = checkpoint
    files = dict(files)
    if data.draw(st.booleans()):
        files[INDEX_NAME] = json.dumps(mutate_json(data, json.loads(files[INDEX_NAME])), allow_nan=True).encode()
    else:
        files[INDEX_NAME] = mutate_bytes(data, files[INDEX_NAME])
    _apply_checked(files, gauge)


def test_fuzz_inputs_are_valid_before_mutation(gauge_files, checkpoint) -> None:
    """The unmutated files load and apply (so refusals above come from the mutations)."""
    _load_checked(*gauge_files)
    assert load_gauge is not None
    files, gauge = checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name, raw in files.items():
            (src / name).write_bytes(raw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = apply_gauge_to_checkpoint(src, gauge, Path(tmp) / "out", progress=False)
        assert sorted(os.listdir(out)) == sorted(files)
        shutil.rmtree(out)
