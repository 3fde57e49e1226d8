"""Gauge file format: bit-exact round trip, atomic writes, and refusal of every kind of corrupt folder."""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import hf_gauge.hub as hub
from hf_gauge import Gauge, GaugeError, SignedPermutation, load_gauge, save_gauge
from hf_gauge.hub import CONFIG_NAME, WEIGHTS_NAME


def make_gauge(seed: int = 0) -> Gauge:
    gen = torch.Generator().manual_seed(seed)
    return Gauge(
        SignedPermutation.random(32, gen),
        mlp={0: SignedPermutation.random(48, gen), 1: SignedPermutation.random(48, gen)},
        attn={1: SignedPermutation(torch.tensor([2, 3, 0, 1]))},
        source={"model_id": "org/base", "revision": "abc123", "model_type": "llama", "hidden_size": 32,
                "num_hidden_layers": 2, "fingerprint": "00ff00ff00ff00ff"},
        target={"model_id": "org/ft", "revision": None, "model_type": "llama", "hidden_size": 32,
                "fingerprint": "11ee11ee11ee11ee"},
        method="signed",
        metrics={"mean_matched": np.float64(0.987654321), "n_low_confidence": np.int64(3), "per_layer": [0.5, 0.25]},
        confidence={"residual": torch.rand(32, generator=gen, dtype=torch.float64),
                    "mlp.0": np.linspace(0, 1, 48).astype(np.float32), "threshold": 0.05},
    )


def assert_same(a: Gauge, b: Gauge) -> None:
    assert list(a.spaces) == list(b.spaces)
    for name in a.spaces:
        assert torch.equal(a[name].perm, b[name].perm) and a[name].perm.dtype == b[name].perm.dtype
        assert torch.equal(a[name].sign, b[name].sign) and a[name].sign.dtype == b[name].sign.dtype
    assert a.source == b.source and a.target == b.target and a.method == b.method


def test_round_trip_bit_exact(tmp_path: Path) -> None:
    g = make_gauge()
    save_gauge(g, tmp_path / "gauges" / "g1")
    back = load_gauge(tmp_path / "gauges" / "g1")
    assert_same(g, back)
    assert back.metrics == {"mean_matched": 0.987654321, "n_low_confidence": 3, "per_layer": [0.5, 0.25]}
    r = back.confidence["residual"]
    assert isinstance(r, torch.Tensor) and r.dtype == torch.float64 and torch.equal(r, g.confidence["residual"])
    m = back.confidence["mlp.0"]
    assert isinstance(m, np.ndarray) and m.dtype == np.float32 and np.array_equal(m, g.confidence["mlp.0"])
    assert back.confidence["threshold"] == 0.05
    # the Gauge methods delegate here; a second save of the loaded gauge holds identical tensors
    back.save_pretrained(tmp_path / "again")
    t1, t2 = _tensors(tmp_path / "again"), _tensors(tmp_path / "gauges/g1")
    assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) and t1[k].dtype == t2[k].dtype for k in t1)
    assert_same(Gauge.from_pretrained(tmp_path / "again"), g)


def test_file_layout_and_metadata(tmp_path: Path) -> None:
    g = make_gauge()
    save_gauge(g, tmp_path / "g")
    assert sorted(os.listdir(tmp_path / "g")) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    raw = (tmp_path / "g" / WEIGHTS_NAME).read_bytes()
    tensors = st_load(raw)
    assert tensors["residual.perm"].dtype == torch.int64 and tensors["residual.sign"].dtype == torch.int8
    assert "residual.margin" in tensors and "mlp.0.margin" in tensors
    n = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8:8 + n])["__metadata__"]
    assert meta == {"format": "hf_gauge.gauge", "format_version": "1", "group": "B_d"}
    cfg = json.loads((tmp_path / "g" / CONFIG_NAME).read_text())
    assert cfg["format_version"] == 1 and cfg["library"] == "hf_gauge" and cfg["method"] == "signed"
    assert cfg["source"]["fingerprint"] == "00ff00ff00ff00ff" and cfg["spaces"]["mlp.1"]["size"] == 48
    assert cfg["weights_sha256"] == hashlib.sha256(raw).hexdigest()


def test_save_beside_checkpoint_never_touches_config(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "notes.txt").write_text("keep me")
    save_gauge(make_gauge(0), folder)           # even straight into an existing folder: only our two files
    save_gauge(make_gauge(1), folder)           # replacing an existing gauge
    assert (folder / "config.json").read_text() == '{"model_type": "llama"}'
    assert (folder / "notes.txt").read_text() == "keep me"
    assert sorted(os.listdir(folder)) == sorted(["config.json", CONFIG_NAME, WEIGHTS_NAME, "notes.txt"])
    assert_same(load_gauge(folder), make_gauge(1))


def test_failed_save_leaves_nothing_or_the_old_gauge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_replace = os.replace

    def boom(a, b):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(hub.os, "replace", boom)
    with pytest.raises(OSError):
        save_gauge(make_gauge(), tmp_path / "new")
    assert os.listdir(tmp_path) == []           # no folder, no temp folder
    monkeypatch.setattr(hub.os, "replace", real_replace)
    save_gauge(make_gauge(0), tmp_path / "old")
    monkeypatch.setattr(hub.os, "replace", boom)
    with pytest.raises(OSError):
        save_gauge(make_gauge(1), tmp_path / "old")
    assert sorted(os.listdir(tmp_path / "old")) == sorted([CONFIG_NAME, WEIGHTS_NAME])   # temp files cleaned up
    monkeypatch.setattr(hub.os, "replace", real_replace)
    assert_same(load_gauge(tmp_path / "old"), make_gauge(0))


def test_save_refuses_file_path_and_non_gauge(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(GaugeError, match="not a folder"):
        save_gauge(make_gauge(), tmp_path / "f")
    with pytest.raises(GaugeError, match="expects a hf_gauge.Gauge"):
        save_gauge(SignedPermutation.identity(4), tmp_path / "g")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ corruption
def _rewrite(folder: Path, tensors: dict | None = None, config: dict | None = None,
             metadata: dict | None = None) -> None:
    """Rewrite the folder with altered tensors/config and a CONSISTENT checksum (so the specific check fires)."""
    raw = (folder / WEIGHTS_NAME).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8:8 + n])["__metadata__"]
    t = st_load(raw) if tensors is None else tensors
    new = st_save(t, metadata=metadata or meta)
    cfg = json.loads((folder / CONFIG_NAME).read_text()) if config is None else config
    cfg["weights_sha256"] = hashlib.sha256(new).hexdigest()
    (folder / WEIGHTS_NAME).write_bytes(new)
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    g = Gauge(SignedPermutation.random(8, 3), mlp={0: SignedPermutation.random(6, 4)}, method="random")
    return save_gauge(g, tmp_path / "g")


def _tensors(folder: Path) -> dict:
    return st_load((folder / WEIGHTS_NAME).read_bytes())


def _config(folder: Path) -> dict:
    return json.loads((folder / CONFIG_NAME).read_text())


def test_refuses_missing_files(saved: Path) -> None:
    (saved / CONFIG_NAME).unlink()
    with pytest.raises(GaugeError, match=CONFIG_NAME):
        load_gauge(saved)
    (saved / WEIGHTS_NAME).unlink()
    with pytest.raises(GaugeError, match=WEIGHTS_NAME):
        load_gauge(saved)
    with pytest.raises(GaugeError, match="no gauge folder"):
        load_gauge(saved / "nowhere" / "x")
    with pytest.raises(GaugeError, match="is a file"):
        (saved / "afile").write_text("")
        load_gauge(saved / "afile")


def test_refuses_corrupt_bytes(saved: Path) -> None:
    raw = bytearray((saved / WEIGHTS_NAME).read_bytes())
    raw[-3] ^= 0xFF
    (saved / WEIGHTS_NAME).write_bytes(bytes(raw))
    with pytest.raises(GaugeError, match="corrupt or half-written"):
        load_gauge(saved)


def test_refuses_garbage_safetensors_with_matching_checksum(saved: Path) -> None:
    junk = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}"
    cfg = _config(saved)
    cfg["weights_sha256"] = hashlib.sha256(junk).hexdigest()
    (saved / WEIGHTS_NAME).write_bytes(junk)
    (saved / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(GaugeError, match="not a valid safetensors"):
        load_gauge(saved)


def test_refuses_corrupt_config(saved: Path) -> None:
    (saved / CONFIG_NAME).write_text('{"format": "hf_gauge.gauge", "format_ver')
    with pytest.raises(GaugeError, match="not valid JSON"):
        load_gauge(saved)
    (saved / CONFIG_NAME).write_text('{"format": "something-else", "format_version": 1}')
    with pytest.raises(GaugeError, match="not an hf_gauge gauge config"):
        load_gauge(saved)


@pytest.mark.parametrize("version", [2, 0, "1", None, True])
def test_refuses_unknown_format_version(saved: Path, version) -> None:
    cfg = _config(saved)
    cfg["format_version"] = version
    (saved / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(GaugeError, match="unknown gauge format version"):
        load_gauge(saved)


def test_refuses_metadata_version_disagreeing_with_config(saved: Path) -> None:
    _rewrite(saved, metadata={"format": "hf_gauge.gauge", "format_version": "7"})
    with pytest.raises(GaugeError, match="metadata says"):
        load_gauge(saved)


@pytest.mark.parametrize("which,dtype", [("perm", torch.int32), ("perm", torch.float32), ("sign", torch.int64),
                                         ("sign", torch.float32)])
def test_refuses_wrong_dtype(saved: Path, which: str, dtype: torch.dtype) -> None:
    t = _tensors(saved)
    t[f"residual.{which}"] = t[f"residual.{which}"].to(dtype)
    _rewrite(saved, tensors=t)
    with pytest.raises(GaugeError, match="dtype"):
        load_gauge(saved)


def test_refuses_not_a_permutation(saved: Path) -> None:
    t = _tensors(saved)
    p = t["residual.perm"].clone()
    p[1] = p[0]
    t["residual.perm"] = p
    _rewrite(saved, tensors=t)
    with pytest.raises(GaugeError, match="'residual'.*not a permutation"):
        load_gauge(saved)
    t["residual.perm"] = torch.arange(8) + 1          # out of range
    _rewrite(saved, tensors=t)
    with pytest.raises(GaugeError, match="not a permutation"):
        load_gauge(saved)


@pytest.mark.parametrize("bad", [0, 2, -2])
def test_refuses_signs_not_pm1(saved: Path, bad: int) -> None:
    t = _tensors(saved)
    s = t["mlp.0.sign"].clone()
    s[3] = bad
    t["mlp.0.sign"] = s
    _rewrite(saved, tensors=t)
    with pytest.raises(GaugeError, match="'mlp.0'.*exactly \\+1 or -1"):
        load_gauge(saved)


def test_refuses_mismatched_lengths(saved: Path) -> None:
    t = _tensors(saved)
    t["residual.sign"] = t["residual.sign"][:7].clone()
    _rewrite(saved, tensors=t)
    with pytest.raises(GaugeError, match="size 8"):
        load_gauge(saved)
    t = _tensors(saved)
    t["residual.sign"] = torch.ones(8, dtype=torch.int8)
    cfg = _config(saved)
    cfg["spaces"]["residual"]["size"] = 9
    _rewrite(saved, tensors=t, config=cfg)
    with pytest.raises(GaugeError, match="size 9"):
        load_gauge(saved)


def test_refuses_missing_and_extra_tensors(saved: Path) -> None:
    t = _tensors(saved)
    del t["mlp.0.perm"]
    _rewrite(saved, tensors=t)
    with pytest.raises(GaugeError, match="missing its perm"):
        load_gauge(saved)
    t = _tensors(saved)
    t["mlp.0.perm"] = torch.arange(6)
    t["stowaway"] = torch.zeros(3)
    _rewrite(saved, tensors=t)
    with pytest.raises(GaugeError, match="unexpected tensors"):
        load_gauge(saved)


def test_refuses_bad_space_name_and_pairs_from_two_gauges(saved: Path, tmp_path: Path) -> None:
    other = save_gauge(Gauge(SignedPermutation.random(8, 9)), tmp_path / "other")
    (saved / WEIGHTS_NAME).write_bytes((other / WEIGHTS_NAME).read_bytes())   # torn pair
    with pytest.raises(GaugeError, match="sha256"):
        load_gauge(saved)
    t = {"resid.perm": torch.arange(4), "resid.sign": torch.ones(4, dtype=torch.int8)}
    cfg = _config(other)
    cfg["spaces"] = {"resid": {"size": 4}}
    _rewrite(other, tensors=t, config=cfg)
    with pytest.raises(GaugeError, match="unknown gauge space 'resid'"):
        load_gauge(other)


@pytest.mark.parametrize("name", ["mlp.01", "attn.+0", "mlp. 0", "mlp.0 "])
def test_load_refuses_non_canonical_space_name(saved: Path, name: str) -> None:
    t = _tensors(saved)
    t[f"{name}.perm"], t[f"{name}.sign"] = t.pop("mlp.0.perm"), t.pop("mlp.0.sign")
    cfg = _config(saved)
    cfg["spaces"][name] = cfg["spaces"].pop("mlp.0")
    _rewrite(saved, tensors=t, config=cfg)
    with pytest.raises(GaugeError, match="unknown gauge space"):
        load_gauge(saved)


def test_hub_module_never_unpickles() -> None:
    src = Path(hub.__file__).read_text() + Path(hub.__file__).with_name("checkpoint.py").read_text()
    assert "pickle" not in src.replace("never pickle", "").replace("pickled weights", "").replace("(never pickle)", "")
    assert "torch.load" not in src


# ------------------------------------------------------------------------------------------------ concurrent saves
def _writer(folder: str, seed: int, n: int) -> None:
    g = make_gauge(seed)
    for _ in range(n):
        save_gauge(g, folder)


def test_concurrent_saves_and_loads_see_whole_pairs(tmp_path: Path) -> None:
    """Issue 11 item 6: 2 writer processes x 60 saves of different gauges into one existing folder (which also holds
    a README card) and a reader loading all the while: every load returns one of the two gauges (never a mixed
    pair), the final pair is consistent and the card is kept."""
    import multiprocessing as mp

    folder = tmp_path / "g"
    save_gauge(make_gauge(5), folder)
    (folder / "README.md").write_text("card")
    ctx = mp.get_context("fork")
    writers = [ctx.Process(target=_writer, args=(str(folder), seed, 60)) for seed in (5, 6)]
    for w in writers:
        w.start()
    want = {5: make_gauge(5), 6: make_gauge(6)}
    loads, errors = 0, []
    while any(w.is_alive() for w in writers) or loads < 20:
        try:
            g = load_gauge(folder)
            assert any(g == w for w in want.values())
        except GaugeError as e:
            errors.append(str(e))
        loads += 1
    for w in writers:
        w.join()
        assert w.exitcode == 0
    assert not errors, (len(errors), loads, errors[:1])
    final = load_gauge(folder)
    assert final == want[5] or final == want[6]
    assert (folder / "README.md").read_text() == "card"
    assert sorted(os.listdir(folder)) == sorted([CONFIG_NAME, WEIGHTS_NAME, "README.md"])   # no temp files left


def _resaver(folder: str) -> None:
    a, b = make_gauge(5), make_gauge(6)
    while True:
        a.save_pretrained(folder)
        b.save_pretrained(folder)


def test_sigkill_during_resave_leaves_the_old_or_the_new_gauge(tmp_path: Path) -> None:
    """Issue 23.5: a process re-saving gauges into an existing folder, SIGKILLed at 25 seeded random moments: after
    every kill the folder loads as one of the two gauges (before: a torn weights/config pair in ~4 of 10 kills),
    and the next save finishes cleanly, leaving no pending or staging folder behind."""
    import multiprocessing as mp
    import random

    folder = tmp_path / "g"
    make_gauge(5).save_pretrained(folder)
    want = (make_gauge(5), make_gauge(6))
    rng, ctx = random.Random(23), mp.get_context("fork")
    torn, journals = [], 0
    for i in range(25):
        p = ctx.Process(target=_resaver, args=(str(folder),))
        p.start()
        time.sleep(rng.uniform(0.002, 0.06))
        p.kill()
        p.join()
        journals += any(os.path.lexists(folder / (hub.PENDING_NAME + x)) for x in ("", ".new", ".old"))
        try:
            g = load_gauge(folder)
            assert g == want[0] or g == want[1]
        except GaugeError as e:
            torn.append((i, str(e)))
    assert not torn, f"{len(torn)} of 25 kills left a folder that does not load: {torn[:2]}"
    assert journals > 0                             # some kills did land inside a replacement (journal on disk)
    make_gauge(7).save_pretrained(folder)
    assert load_gauge(folder) == make_gauge(7)
    assert sorted(os.listdir(folder)) == sorted([CONFIG_NAME, WEIGHTS_NAME, "README.md"])


def test_save_interrupted_between_its_renames_loads_new_and_is_finished_next(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The journal's middle state, made deterministic: the weights were renamed into place, the config rename failed.
    The folder's own pair is torn; loads read the journal's (the new gauge), and the next save completes it first."""
    folder = tmp_path / "g"
    save_gauge(make_gauge(0), folder)
    real_replace, calls = os.replace, []

    def second_fails(a, b):
        calls.append(Path(b).name)
        if len(calls) == 2:
            raise OSError("injected")
        return real_replace(a, b)

    monkeypatch.setattr(hub.os, "replace", second_fails)
    with pytest.raises(OSError, match="injected"):
        save_gauge(make_gauge(1), folder)
    monkeypatch.setattr(hub.os, "replace", real_replace)
    assert calls == [WEIGHTS_NAME, CONFIG_NAME]
    assert load_gauge(folder) == make_gauge(1) and (folder / hub.PENDING_NAME).is_dir()
    save_gauge(make_gauge(2), folder)
    assert load_gauge(folder) == make_gauge(2)
    assert sorted(os.listdir(folder)) == sorted([CONFIG_NAME, WEIGHTS_NAME])


def test_saved_files_honour_umask(tmp_path: Path) -> None:
    """mkdtemp/mkstemp create 0700/0600; published gauge folders and files get 0777/0666 minus the umask."""
    old = os.umask(0o027)
    try:
        save_gauge(make_gauge(), tmp_path / "new")
        save_gauge(make_gauge(1), tmp_path / "new")          # replacement in an existing folder
    finally:
        os.umask(old)
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o750
    for f in (WEIGHTS_NAME, CONFIG_NAME):
        assert (tmp_path / "new" / f).stat().st_mode & 0o777 == 0o640


# ------------------------------------------------------------------------------------------------ field types (item 8)
def _deep(n: int):
    v: object = 1
    for _ in range(n):
        v = [v]
    return v


@pytest.mark.parametrize("key,value", [
    ("source", "org/model"), ("target", 7), ("metrics", [0.5]), ("method", {"x": 1}), ("confidence", "high"),
    ("confidence_arrays", ["residual"]), ("spaces", ["residual"]), ("metrics", {"deep": _deep(200)}),
    ("source", {"deep": _deep(5000)}), ("spaces", {"residual": {"size": "8"}}), ("spaces", {"residual": {"size": True}}),
    ("spaces", {"residual": 8}), ("confidence_arrays", {"residual": "pickle"}),
])
def test_config_fields_type_checked_after_checksum(saved: Path, key: str, value) -> None:
    """Issue 11 item 8: a config whose checksum matches but whose fields have the wrong JSON type (or nest absurdly
    deep) is a one-line GaugeError, never TypeError/ValueError/RecursionError."""
    cfg = _config(saved)
    if key == "spaces" and isinstance(value, dict) and "residual" in value:
        cfg["spaces"] = {**cfg["spaces"], **value}
    else:
        cfg[key] = value
    cfg["weights_sha256"] = hashlib.sha256((saved / WEIGHTS_NAME).read_bytes()).hexdigest()
    import sys
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 20000))       # json.dumps of the hostile file needs it; json.loads may not
    try:
        (saved / CONFIG_NAME).write_text(json.dumps(cfg))
    finally:
        sys.setrecursionlimit(old)
    with pytest.raises(GaugeError) as e:
        load_gauge(saved)
    assert "\n" not in str(e.value)


def test_config_huge_integer_and_non_utf8(saved: Path) -> None:
    digest = hashlib.sha256((saved / WEIGHTS_NAME).read_bytes()).hexdigest()
    text = (saved / CONFIG_NAME).read_text()
    huge = text.replace('"weights_sha256"', '"n": ' + "9" * 5000 + ', "weights_sha256"', 1)
    (saved / CONFIG_NAME).write_text(huge)
    with pytest.raises(GaugeError, match="not valid JSON"):
        load_gauge(saved)
    (saved / CONFIG_NAME).write_bytes(b'{"format": "\xff"}')
    with pytest.raises(GaugeError, match="not valid JSON"):
        load_gauge(saved)
    assert digest


# ------------------------------------------------------------------------------------------------ issue 23, item 6
def test_load_gauge_bounds_gauge_config_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """gauge_config.json goes through the one bounded reader (before: load_gauge read and parsed any size, 114 MB
    in the sweep): a file over the limit is refused before it is read, and a FIFO is refused without blocking."""
    import hf_gauge.jsonio as jsonio
    g = Gauge(SignedPermutation.random(8, 0), metrics={"note": "x" * 4000})
    save_gauge(g, tmp_path / "g")
    assert load_gauge(tmp_path / "g") == g
    monkeypatch.setattr(jsonio, "MAX_JSON_BYTES", 2000)        # the limit, scaled down to this small file
    with pytest.raises(GaugeError, match=f"{CONFIG_NAME} is larger than"):
        load_gauge(tmp_path / "g")
    with pytest.raises(GaugeError, match="larger than"):
        jsonio.read_json(b" " * 2001 + b"{}", "bytes")
    monkeypatch.undo()
    if hasattr(os, "mkfifo"):
        os.replace(tmp_path / "g" / CONFIG_NAME, tmp_path / "moved.json")
        os.mkfifo(tmp_path / "g" / CONFIG_NAME)
        with pytest.raises(GaugeError, match=CONFIG_NAME):
            load_gauge(tmp_path / "g")
        with pytest.raises(GaugeError, match="not a regular file"):
            jsonio.read_json(tmp_path / "g" / CONFIG_NAME, CONFIG_NAME)
