"""Streaming apply on (sharded) safetensors checkpoints: bit-exact vs in-memory apply, safe and atomic output."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_gauge
import hf_gauge.checkpoint as ckpt
from conftest import assert_state_equal, state, tiny_model
from hf_gauge import GaugeError, apply_gauge, apply_gauge_to_checkpoint, random_gauge
from hf_gauge.checkpoint import INDEX_NAME, read_header
from hub_server import local_network_only  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("local_network_only")


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def sharded(tmp_path: Path, model, name: str = "src", shard: str = "20KB") -> Path:
    src = tmp_path / name
    model.save_pretrained(src, max_shard_size=shard)
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    (src / "extra").mkdir()
    (src / "extra" / "notes.md").write_text("other files travel too")
    return src


@pytest.mark.parametrize("model_type,tie,dtype,chunk", [("llama", False, torch.float32, None),
                                                         ("llama", True, torch.float32, 1000),
                                                         ("qwen2", False, torch.bfloat16, None),
                                                         ("qwen3", False, torch.float16, 777)])
def test_streaming_equals_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_type: str, tie: bool,
                                    dtype: torch.dtype, chunk: int | None) -> None:
    if chunk:   # tiny row chunks: every 2-D tensor is moved and written in several pieces, some of one row
        monkeypatch.setattr(ckpt, "_CHUNK_BYTES", chunk)
    model = tiny_model(model_type, tie=tie, dtype=dtype)
    src = sharded(tmp_path, model)
    before = digest(src)
    g = random_gauge(model, seed=3, spaces=("residual", "mlp", "attn"))
    out = apply_gauge_to_checkpoint(src, g, tmp_path / "out", progress=False)
    assert digest(src) == before                                 # the input is never modified
    src_shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(src_shards) > 3 and sorted(p.name for p in out.glob("*.safetensors")) == src_shards
    assert (out / INDEX_NAME).read_bytes() == (src / INDEX_NAME).read_bytes()
    for f in ("config.json", "generation_config.json", "tokenizer.json", "extra/notes.md"):
        assert (out / f).read_bytes() == (src / f).read_bytes()
    for s in src_shards:                                          # headers (names, dtypes, offsets, metadata) kept
        assert read_header(out / s)[0] == read_header(src / s)[0]
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    apply_gauge(model, g)
    assert_state_equal(state(loaded), state(model))
    # and back: the inverse gauge restores the original bytes exactly
    back = apply_gauge_to_checkpoint(out, g.inverse(), tmp_path / "back", progress=False)
    assert {k: v for k, v in digest(back).items()} == before


def test_single_file_checkpoint_and_untouched_shards_copied(tmp_path: Path) -> None:
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "one")
    g = random_gauge(model, seed=1, spaces=("mlp.1",))              # touches layer 1's MLP only
    out = apply_gauge_to_checkpoint(tmp_path / "one", g, tmp_path / "out", progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    apply_gauge(model, g)
    assert_state_equal(state(loaded), state(model))


def test_refuses_unsafe_outputs(tmp_path: Path) -> None:
    model = tiny_model("llama")
    src = sharded(tmp_path, model)
    g = random_gauge(model, seed=1)
    for bad in (src, src / "sub", src / "sub" / "deeper"):
        with pytest.raises(GaugeError, match="source checkpoint"):
            apply_gauge_to_checkpoint(src, g, bad, progress=False)
    with pytest.raises(GaugeError, match="source checkpoint"):        # the same folder through a symlink
        os.symlink(src, tmp_path / "link")
        apply_gauge_to_checkpoint(src, g, tmp_path / "link", progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "precious.txt").write_text("x")
    with pytest.raises(GaugeError, match="not empty"):
        apply_gauge_to_checkpoint(src, g, tmp_path / "busy", progress=False)
    assert (tmp_path / "busy" / "precious.txt").read_text() == "x"
    with pytest.raises(GaugeError, match="source checkpoint .* lies inside it"):
        apply_gauge_to_checkpoint(src, g, tmp_path, progress=False, overwrite=True)
    out = apply_gauge_to_checkpoint(src, g, tmp_path / "busy", progress=False, overwrite=True)
    assert not (out / "precious.txt").exists() and (out / "config.json").exists()
    (tmp_path / "empty").mkdir()
    apply_gauge_to_checkpoint(src, g, tmp_path / "empty", progress=False)   # an empty folder is fine
    assert not list(tmp_path.glob(".*partial")) and not list(tmp_path.glob(".*old"))


def test_failure_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model("llama")
    src = sharded(tmp_path, model)
    before = digest(src)
    g = random_gauge(model, seed=1, spaces=("residual", "mlp"))
    calls = {"n": 0}
    real = ckpt.move_tensor

    def flaky(t, moves, out=None, scratch=None):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("injected failure mid-checkpoint")
        return real(t, moves, out, scratch)

    monkeypatch.setattr(ckpt, "move_tensor", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        apply_gauge_to_checkpoint(src, g, tmp_path / "out", progress=False)
    assert calls["n"] == 7
    assert not (tmp_path / "out").exists()
    assert sorted(os.listdir(tmp_path)) == [".out.hf_gauge.lock", "src"]   # no temp folder left behind (the lock
    assert digest(src) == before                                              # file stays, unlocked)
    # an existing output is kept intact when an overwrite fails
    monkeypatch.setattr(ckpt, "move_tensor", real)
    apply_gauge_to_checkpoint(src, g, tmp_path / "out", progress=False)
    kept = digest(tmp_path / "out")
    calls["n"] = 0
    monkeypatch.setattr(ckpt, "move_tensor", flaky)
    with pytest.raises(RuntimeError):
        apply_gauge_to_checkpoint(src, g.inverse(), tmp_path / "out", progress=False, overwrite=True)
    assert digest(tmp_path / "out") == kept and sorted(os.listdir(tmp_path)) == [".out.hf_gauge.lock", "out", "src"]


def test_output_appearing_meanwhile_is_refused_at_publish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 23.5: without overwrite, an output that another writer finished while this run was streaming is never
    replaced (the publishing rename refuses a non-empty folder); a held lock refuses a second writer at once."""
    from hf_gauge.atomic import output_lock
    model = tiny_model("llama")
    src = sharded(tmp_path, model)
    g = random_gauge(model, seed=1, spaces=("residual",))
    out = tmp_path / "out"
    real = ckpt.move_tensor

    def other_writer_finishes(*a, **k):
        if not out.exists():
            out.mkdir()
            (out / "theirs.txt").write_text("finished first")
        return real(*a, **k)

    monkeypatch.setattr(ckpt, "move_tensor", other_writer_finishes)
    with pytest.raises(GaugeError, match="appeared while this run was writing it"):
        apply_gauge_to_checkpoint(src, g, out, progress=False)
    assert os.listdir(out) == ["theirs.txt"] and (out / "theirs.txt").read_text() == "finished first"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".partial")]
    monkeypatch.setattr(ckpt, "move_tensor", real)
    lock = output_lock(tmp_path / "new")                           # another writer holds the output
    try:
        with pytest.raises(GaugeError, match="another process is writing .*new"):
            apply_gauge_to_checkpoint(src, g, tmp_path / "new", progress=False)
    finally:
        lock.release()
    assert not (tmp_path / "new").exists()
    apply_gauge_to_checkpoint(src, g, tmp_path / "new", progress=False)     # released: it goes through


def _cli_apply(go: str, src: str, gauge: str, out: str, log: str) -> None:
    """A forked ``hf-gauge apply`` process (no interpreter start-up): its stderr goes to ``log``, its exit status is
    the CLI's; its first tensor move waits 1 s so the output's lock is held while the other process gets to it."""
    import sys
    import time
    from hf_gauge.cli import main
    f = open(log, "w")
    os.dup2(f.fileno(), 2)
    sys.stderr = f
    real, first = ckpt.move_tensor, [True]

    def slow(*a, **k):
        if first and first.pop():
            time.sleep(1.0)
        return real(*a, **k)

    ckpt.move_tensor = slow
    while not os.path.exists(go):
        time.sleep(0.005)
    code = main(["apply", src, "--gauge", gauge, "-o", out, "--no-progress"])
    f.flush()
    os._exit(code)


def test_two_apply_processes_into_one_output(tmp_path: Path) -> None:
    """Issue 23.5: two real (forked) ``hf-gauge apply`` processes into one new output, started together without --overwrite:
    one writes it, the other exits 2 with one line saying another process is writing it (before: both exited 0 and
    the later silently replaced the earlier's output)."""
    model = tiny_model("llama")
    src = sharded(tmp_path, model)
    random_gauge(model, seed=1).save_pretrained(tmp_path / "g")
    import multiprocessing as mp
    go = tmp_path / "go"
    procs = [mp.get_context("fork").Process(target=_cli_apply, args=(str(go), str(src), str(tmp_path / "g"),
                                                                     str(tmp_path / "out"), str(tmp_path / f"log{i}")))
             for i in range(2)]
    for p in procs:
        p.start()
    go.write_text("")
    for p in procs:
        p.join(timeout=300)
    results = [(p.exitcode, (tmp_path / f"log{i}").read_text()) for i, p in enumerate(procs)]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    err = next(e for rc, e in results if rc == 2).strip().splitlines()
    assert len(err) == 1 and "another process is writing" in err[0] and "out" in err[0], err
    ref = apply_gauge_to_checkpoint(src, tmp_path / "g", tmp_path / "ref", progress=False)
    assert digest(tmp_path / "out") == digest(ref)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".partial")]


def test_refuses_bad_inputs(tmp_path: Path) -> None:
    model = tiny_model("llama")
    src = sharded(tmp_path, model)
    wide = random_gauge(tiny_model("llama", hidden_size=32), seed=0)
    with pytest.raises(GaugeError, match="width mismatch"):
        apply_gauge_to_checkpoint(src, wide, tmp_path / "out1", progress=False)
    neox = random_gauge(tiny_model("gpt_neox"), seed=0)
    with pytest.raises(GaugeError, match="model_type"):
        apply_gauge_to_checkpoint(src, neox, tmp_path / "out2", progress=False)
    # an unknown tensor in the checkpoint: refuse rather than guess how it moves
    from safetensors.torch import save_file
    odd = tmp_path / "odd"
    model.save_pretrained(odd)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd["model.mystery.weight"] = torch.zeros(3)
    save_file(sd, odd / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(GaugeError, match="mystery"):
        apply_gauge_to_checkpoint(odd, random_gauge(model), tmp_path / "out3", progress=False)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((src / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(GaugeError, match="never pickle"):
        apply_gauge_to_checkpoint(pickled, random_gauge(model), tmp_path / "out4", progress=False)
    with pytest.raises(GaugeError, match="no checkpoint folder"):
        apply_gauge_to_checkpoint(tmp_path / "nope", random_gauge(model), tmp_path / "out5", progress=False)
    trunc = tmp_path / "trunc"
    model.save_pretrained(trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(GaugeError, match="truncated"):
        apply_gauge_to_checkpoint(trunc, random_gauge(model), tmp_path / "out6", progress=False)
    assert not any(p.name.startswith(("out", ".out")) for p in tmp_path.iterdir())


def test_fingerprint_mismatch_warns_or_refuses(tmp_path: Path) -> None:
    model = tiny_model("llama")
    other = tiny_model("llama", seed=5)
    src = sharded(tmp_path, other)
    g = random_gauge(model, seed=1)                      # recorded source fingerprint is `model`'s, not `other`'s
    with pytest.raises(GaugeError, match="fingerprint.*strict=True"):
        apply_gauge_to_checkpoint(src, g, tmp_path / "o", progress=False, strict=True)
    assert not (tmp_path / "o").exists()
    with pytest.warns(UserWarning, match="fingerprint"):
        apply_gauge_to_checkpoint(src, g, tmp_path / "o", progress=False)
    assert (tmp_path / "o" / "config.json").exists()


def test_gauge_given_as_folder_and_hub_source(tmp_path: Path) -> None:
    from hub_server import HubServer
    model = tiny_model("llama", tie=True)
    src = sharded(tmp_path, model)
    g = random_gauge(model, seed=2, spaces=("residual", "mlp"))
    g.save_pretrained(tmp_path / "gauges" / "g")
    with HubServer() as hub:
        from huggingface_hub import HfApi
        HfApi(endpoint=hub.url).create_repo("org/tiny")
        hub.commit("org/tiny", {str(p.relative_to(src)): p.read_bytes() for p in src.rglob("*") if p.is_file()})
        hf_gauge.push_gauge(g, "org/tiny", path_in_repo="gauges/other", endpoint=hub.url)   # the source's own gauge
        hub.commit("org/tiny", {"README.md": b"---\nlicense: mit\n---\n# tiny source card\n"})
        out = apply_gauge_to_checkpoint("org/tiny", tmp_path / "gauges" / "g", tmp_path / "out", progress=False,
                                        cache_dir=tmp_path / "cache", endpoint=hub.url)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    apply_gauge(model, g)
    assert_state_equal(state(loaded), state(model))
    assert (out / "extra" / "notes.md").exists() and (out / ".gitattributes").exists()
    # the source's gauges and card describe the source's chart: not copied; the output's card says what it is
    assert not (out / "gauges").exists()
    from huggingface_hub import ModelCard
    card = ModelCard.load(out / "README.md")
    assert "tiny source card" not in card.text and "same function" in card.text
    assert card.data.base_model == "org/tiny" and card.data.license == "mit"
    assert card.data.base_model_relation == "finetune" and card.data.library_name == "transformers"


@pytest.mark.slow
def test_real_smollm2_sharded_100mb(smollm2, smollm2_dir, tmp_path: Path) -> None:
    """Real SmolLM2-135M saved in 100 MB shards: streaming output == in-memory apply, bit for bit."""
    src = tmp_path / "src"
    smollm2.save_pretrained(src, max_shard_size="100MB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (src / f).write_bytes((Path(smollm2_dir) / f).read_bytes())
    n_shards = len(json.loads((src / INDEX_NAME).read_text())["weight_map"] and list(src.glob("*.safetensors")))
    assert n_shards >= 5
    g = random_gauge(smollm2, seed=11, spaces=("residual", "mlp", "attn"))
    out = apply_gauge_to_checkpoint(src, g, tmp_path / "out", progress=False, strict=True)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    apply_gauge(smollm2, g)
    assert_state_equal(state(loaded), state(smollm2))
    assert hf_gauge.fingerprint(loaded) == g.target["fingerprint"]


@pytest.mark.parametrize("bad", ["../escaped.safetensors", "sub/../../escaped.safetensors", "ABS", "..", ".",
                                 "sub/model.safetensors", "a\\b.safetensors", "nul\0.safetensors", "C:x", "", 7,
                                 None, ["model.safetensors"]])
def test_hostile_shard_names_refused_before_any_write(tmp_path: Path, bad) -> None:
    """Issue 11 item 1: an index naming a shard outside its folder is a GaugeError before any file is opened for
    writing; nothing appears outside the output folder and a file named by an absolute path is left untouched."""
    model = tiny_model("llama")
    root = tmp_path / "work"
    src = sharded(root, model)
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes((src / sorted(p.name for p in src.glob("*.safetensors"))[0]).read_bytes())
    victim_bytes = victim.read_bytes()
    if bad == "ABS":
        bad = str(victim)
    index = json.loads((src / INDEX_NAME).read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = bad
    (src / INDEX_NAME).write_text(json.dumps(index))
    if isinstance(bad, str) and "/" in bad and not bad.startswith("/"):   # make the escaping path resolvable
        (src / "sub").mkdir(exist_ok=True)
        (root / "escaped.safetensors").write_bytes(victim_bytes)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(GaugeError, match="not a plain file name"):
        apply_gauge_to_checkpoint(src, random_gauge(model, seed=1), root / "out", progress=False)
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before and victim.read_bytes() == victim_bytes
    assert not (root / "out").exists() and not list(root.glob(".out*"))


def test_hostile_shard_name_through_cli(tmp_path: Path) -> None:
    """The same refusal from ``hf-gauge apply``: exit 2 with one line, nothing written outside the output."""
    from hf_gauge.cli import main
    model = tiny_model("llama")
    src = sharded(tmp_path, model)
    index = json.loads((src / INDEX_NAME).read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = "../../pwned.safetensors"
    (src / INDEX_NAME).write_text(json.dumps(index))
    random_gauge(model, seed=2).save_pretrained(tmp_path / "g")
    assert main(["apply", str(src), "--gauge", str(tmp_path / "g"), "-o", str(tmp_path / "out")]) == 2
    assert not list(tmp_path.parent.glob("pwned*")) and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ header validation
def _st_file(header: dict, data: bytes, pad: str = "") -> bytes:
    raw = (json.dumps(header) + pad).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def _raw_header(text: str, data: bytes) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(8, "little") + raw + data


def _valid_parts() -> tuple[dict, bytes]:
    from safetensors.torch import save
    blob = save({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.int8),
                 "c": torch.zeros(2, dtype=torch.float16)}, metadata={"format": "pt"})
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _mutations() -> dict[str, bytes]:
    h, data = _valid_parts()

    def with_(name: str, key: str, value) -> dict:
        g = json.loads(json.dumps(h))
        g[name][key] = value
        return g
    a0, a1 = h["a"]["data_offsets"]
    b0, b1 = h["b"]["data_offsets"]
    c0, c1 = h["c"]["data_offsets"]
    gap = json.loads(json.dumps(h))
    for k in "abc":
        if gap[k]["data_offsets"][0] >= b0:
            gap[k]["data_offsets"] = [x + 4 for x in gap[k]["data_offsets"]]
    first = sorted("abc", key=lambda k: h[k]["data_offsets"][0])
    return {
        "valid": _st_file(h, data),
        "valid padded": _st_file(h, data, pad="    "),
        "gap": _st_file(gap, data[:b0] + b"\0" * 4 + data[b0:]),
        "overlap": _st_file(with_("b", "data_offsets", [b0 - 2, b1 - 2]), data),
        "shape disagrees with bytes": _st_file(with_("a", "shape", [3, 3]), data),
        "dtype disagrees with bytes": _st_file(with_("a", "dtype", "F16"), data),
        "unknown dtype": _st_file(with_("a", "dtype", "Q7"), data),
        "dtype not a string": _st_file(with_("a", "dtype", 5), data),
        "float offsets": _st_file(with_(first[0], "data_offsets", [0.0, h[first[0]]["data_offsets"][1]]), data),
        "string offsets": _st_file(with_("a", "data_offsets", [str(a0), str(a1)]), data),
        "bool offsets": _st_file(with_(first[0], "data_offsets", [False, h[first[0]]["data_offsets"][1]]), data),
        "three offsets": _st_file(with_("a", "data_offsets", [a0, a1, a1]), data),
        "negative shape": _st_file(with_("a", "shape", [-2, -3]), data),
        "float shape": _st_file(with_("a", "shape", [2.0, 3]), data),
        "entry not an object": _st_file({**h, "a": [1, 2]}, data),
        "header a list": _st_file([1, 2], b""),           # type: ignore[arg-type]
        "metadata not strings": _st_file({**h, "__metadata__": {"format": 1}}, data),
        "trailing bytes": _st_file(h, data + b"\0" * 8),
        "truncated": _st_file(h, data[:-1]),
        "not starting at 0": _st_file({k: {**v, "data_offsets": [x + 2 for x in v["data_offsets"]]}
                                       if k != "__metadata__" else v for k, v in h.items()}, b"\0\0" + data),
        "header length beyond file": (10 ** 6).to_bytes(8, "little") + b"{}",
        "not utf-8": (4).to_bytes(8, "little") + b"{\xff\xfe}",
        "NaN": _raw_header(json.dumps(h).replace('"dtype"', '"x": NaN, "dtype"', 1), data),
        "valid with an extra field": _raw_header(json.dumps(h).replace('"dtype"', '"x": 1, "dtype"', 1), data),
        "empty": b"",
        "last tensor missing": _st_file({k: v for k, v in h.items() if k != first[-1]}, data),
    } | {"c end": _st_file(with_("c", "data_offsets", [c0, c1 + 1]), data + b"\0")}


@pytest.mark.parametrize("case", list(_mutations()))
def test_header_validation_agrees_with_safetensors(tmp_path: Path, case: str) -> None:
    """Issue 11 item 7: for every mutated shard, safetensors' own loader refuses it <=> read_header refuses it
    (with GaugeError, never another exception)."""
    from safetensors import safe_open
    path = tmp_path / "m.safetensors"
    path.write_bytes(_mutations()[case])
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                f.get_tensor(k)
        safe_ok = True
    except Exception:
        safe_ok = False
    try:
        read_header(path)
        ours_ok = True
    except GaugeError:
        ours_ok = False
    assert ours_ok == safe_ok, (case, safe_ok)
    assert safe_ok == case.startswith("valid"), case


@pytest.mark.parametrize("case", ["gap", "overlap", "shape disagrees with bytes", "trailing bytes"])
def test_invalid_shard_refused_before_any_write(tmp_path: Path, case: str) -> None:
    """A shard safetensors would refuse is a GaugeError before the output or a staging folder is created."""
    model = tiny_model("llama")
    src = tmp_path / "src"
    model.save_pretrained(src)
    from safetensors.torch import load_file
    raw = (src / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    h, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    order = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    k = order[1]
    b, e = h[k]["data_offsets"]
    if case == "gap":
        for name in order[1:]:
            h[name]["data_offsets"] = [x + 4 for x in h[name]["data_offsets"]]
        data = data[:b] + b"\0" * 4 + data[b:]
    elif case == "overlap":
        h[k]["data_offsets"] = [b - 4, e - 4]
    elif case == "shape disagrees with bytes":
        h[k]["shape"] = [h[k]["shape"][0] + 1] + h[k]["shape"][1:]
    else:
        data = data + b"\0" * 16
    (src / "model.safetensors").write_bytes(_st_file(h, data))
    with pytest.raises(Exception):
        load_file(src / "model.safetensors")                          # safetensors refuses it too
    with pytest.raises(GaugeError, match="not a valid safetensors file"):
        apply_gauge_to_checkpoint(src, random_gauge(model, seed=1), tmp_path / "out", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_killed_apply_staging_cleaned_next_time_and_umask(tmp_path: Path) -> None:
    """Hygiene (issue 11): a streaming apply killed mid-run leaves its hidden staging folder; the next apply into the
    same parent removes it (its marker names a dead process) and nothing else; outputs honour the umask."""
    import subprocess
    import sys
    model = tiny_model("llama")
    src = sharded(tmp_path, model)
    random_gauge(model, seed=1).save_pretrained(tmp_path / "g")
    code = ("import os, sys, hf_gauge, hf_gauge.checkpoint as c\n"
            "real = c.move_tensor\n"
            "def die(*a, **k):\n    os._exit(9)\n"
            "c.move_tensor = die\n"
            "hf_gauge.apply_gauge_to_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)\n")
    r = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "g"), str(tmp_path / "out")],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 9, r.stderr
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".out.") and p.name.endswith(".partial")]
    assert len(left) == 1 and any(left[0].glob("*.safetensors"))
    (tmp_path / ".out.notours.partial").mkdir()                       # similar names are never touched
    (tmp_path / "out.partial").write_text("a user's file")
    old = os.umask(0o027)
    try:
        out = apply_gauge_to_checkpoint(src, tmp_path / "g", tmp_path / "out", progress=False)
    finally:
        os.umask(old)
    assert not left[0].exists()
    assert (tmp_path / ".out.notours.partial").is_dir() and (tmp_path / "out.partial").read_text() == "a user's file"
    assert out.stat().st_mode & 0o777 == 0o750
    assert all(p.stat().st_mode & 0o777 == 0o640 for p in out.glob("*.safetensors"))
    assert not list(out.rglob(".hf_gauge-staging*"))                # the marker is not published


# ------------------------------------------------------------------------------------------------ issue 23, item 6
@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_shard_changed_after_validation_is_a_gauge_error(tmp_path, monkeypatch, how) -> None:
    """A shard truncated or deleted between validation and streaming: one GaugeError naming the shard and saying to
    re-download (not an OSError, a ValueError from a short mapping, or SIGBUS), and no output."""
    m = tiny_model("llama", hidden_size=16, layers=2, heads=2, kv_heads=1, intermediate=24)
    m.save_pretrained(tmp_path / "src", max_shard_size="8KB")
    g = random_gauge(m, seed=1)
    shard = sorted((tmp_path / "src").glob("*.safetensors"))[-1]
    real = ckpt.prepare_kernels

    def change(n_bytes):                          # runs after every header is validated, before any shard is read
        if how == "delete":
            shard.unlink()
        else:
            os.truncate(shard, shard.stat().st_size - 64)
        return real(n_bytes)

    monkeypatch.setattr(ckpt, "prepare_kernels", change)
    with pytest.raises(GaugeError, match=f"{shard.name}.*re-download") as err:
        apply_gauge_to_checkpoint(tmp_path / "src", g, tmp_path / "out", progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()
