"""Property-based fuzzing of every file hf_gauge reads from the Hub (issue 11).

Valid gauge folders, checkpoint shards and shard indexes are mutated (bytes, JSON fields, value types, tensor and
shard names, with and without a matching checksum) and loaded or applied. Every call must either succeed correctly
(a loaded gauge re-saves and reloads equal; an applied checkpoint keeps every shard header and size) or raise
``GaugeError``: never another exception, and never a write outside the output folder. Tiny models are built once
per module; the whole file runs in well under a minute.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import signal
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import tiny_model
from hf_gauge import Gauge, GaugeError, SignedPermutation, apply_gauge_to_checkpoint, find_gauge, load_gauge, \
    random_gauge, save_gauge
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


# ------------------------------------------------------------------------------------------------ config.json and
# folder contents on every file path (issue 23): apply, find and verify answer fast, correctly or with a GaugeError
@contextlib.contextmanager
def deadline(seconds: float):
    """A hang becomes a test failure (SIGALRM interrupts a blocking open or read; main thread, POSIX only)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def fire(*_):
        raise TimeoutError(f"no answer within {seconds} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def pair_files(checkpoint) -> dict[str, Any]:
    """Checkpoint A's files, its gauged copy B's, the gauge, and the reference results on the true files."""
    from hf_gauge.fileverify import verify_files
    files, gauge = checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "a", Path(tmp) / "b"
        a.mkdir()
        for name, raw in files.items():
            (a / name).write_bytes(raw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            apply_gauge_to_checkpoint(a, gauge, b, progress=False)
        found = find_gauge(str(a), str(b), spaces="all")
        assert found == gauge and verify_files(a, b, gauge)["ok"]
        files_b = {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()}
    return {"a": files, "b": files_b, "gauge": gauge}


def _run_path(what: str, a: Path, b: Path, gauge, out: Path) -> Any:
    from hf_gauge.fileverify import verify_files
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if what == "apply":
            return apply_gauge_to_checkpoint(a, gauge, out, progress=False)
        if what == "find":
            return find_gauge(str(a), str(b), spaces="all")
        return verify_files(a, b, gauge)


def _checked_outcome(what: str, ref: dict[str, Any], a: Path, b: Path, out: Path, limit: float = 1.0,
                     hang: float = 10.0) -> bool:
    """Run ``what`` on folder ``a``: a GaugeError (one line, within ``limit`` seconds, nothing written) or a result
    equal to the reference on the true files. Returns whether it succeeded."""
    t0 = time.perf_counter()
    try:
        with deadline(hang):
            got = _run_path(what, a, b, ref["gauge"], out)
    except GaugeError as e:
        assert "\n" not in str(e)
        assert time.perf_counter() - t0 < limit, (what, time.perf_counter() - t0, str(e))
        assert not out.exists()
        return False
    if what == "apply":                      # the same shards as B's, bit for bit
        for name, raw in ref["b"].items():
            if name.endswith(".safetensors"):
                assert (out / name).read_bytes() == raw, name
    elif what == "find":
        assert got == ref["gauge"]
    else:
        assert got["ok"] and got["weights_bit_exact"]
    return True


SIZE_FIELDS = ["num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
               "head_dim", "vocab_size", "model_type", "max_position_embeddings", "tie_word_embeddings"]
LIES = st.sampled_from([10 ** 9, 2 ** 31, 2 ** 63, 2 ** 80, 0, -1, -2 ** 31, 1, 2, 3, 16, 17, 32, "16", "llama", 16.0,
                        1e308, float("inf"), True, False, None, [], {}, "missing"])


@pytest.mark.parametrize("what", ["apply", "find", "verify"])
@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_fuzz_checkpoint_config_fields(pair_files, what, data) -> None:
    """config.json sizes as huge ints, 0, negative, strings, floats, bools, null or missing (one to three fields)
    on apply, find and verify: the right result or a one-line GaugeError within a second, never another exception
    or a hang."""
    cfg = json.loads(pair_files["a"]["config.json"])
    for _ in range(data.draw(st.integers(1, 3))):
        field = data.draw(st.sampled_from(SIZE_FIELDS) | st.sampled_from(sorted(cfg)))
        value = data.draw(LIES)
        if value == "missing":
            cfg.pop(field, None)
        else:
            cfg[field] = value
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "a", Path(tmp) / "b"
        for folder, files in ((a, pair_files["a"]), (b, pair_files["b"])):
            folder.mkdir()
            for name, raw in files.items():
                (folder / name).write_bytes(raw)
        (a / "config.json").write_text(json.dumps(cfg, allow_nan=True))
        ok = _checked_outcome(what, pair_files, a, b, Path(tmp) / "out")
    event(f"{what} {'succeeded' if ok else 'refused'}")          # --hypothesis-show-statistics shows the mix


ENTRIES = ["config.json", INDEX_NAME, "shard", "notes.txt"]
KINDS = ["fifo", "link-outside", "link-inside", "link-dangling", "link-loop"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs and symlinks")
@pytest.mark.parametrize("what", ["apply", "find", "verify"])
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("kind", KINDS)
def test_fuzz_checkpoint_folder_links_and_fifos(pair_files, tmp_path, what, entry, kind) -> None:
    """A checkpoint entry replaced by a FIFO or a symlink (out of the folder, inside it, dangling, a loop): the
    right result (and no secret from outside the folder in an output) or a GaugeError, never a hang."""
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    for folder, files in ((a, pair_files["a"]), (b, pair_files["b"])):
        folder.mkdir()
        for name, raw in files.items():
            (folder / name).write_bytes(raw)
    name = sorted(n for n in pair_files["a"] if n.endswith(".safetensors"))[0] if entry == "shard" else entry
    target = a / name
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"SECRET " + (pair_files["a"].get(name) or b""))
    if target.exists():
        os.replace(target, tmp_path / "moved")
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "link-outside":
        target.symlink_to(secret)
    elif kind == "link-inside":
        if (tmp_path / "moved").exists():
            os.replace(tmp_path / "moved", a / ".real")
        else:
            (a / ".real").write_bytes(b"notes")
        target.symlink_to(".real")
    elif kind == "link-dangling":
        target.symlink_to(a / "nowhere")
    else:
        target.symlink_to(target.name + ".loop")
        (a / (target.name + ".loop")).symlink_to(target.name)
    ok = _checked_outcome(what, pair_files, a, b, out, hang=10.0)
    if ok and what == "apply":
        for p in out.rglob("*"):
            assert not p.is_symlink() and not (p.is_file() and p.read_bytes().startswith(b"SECRET")), p
