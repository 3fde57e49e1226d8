"""Direct-I/O streaming apply (``hf_gauge.directio``): segments, the ring arena, the in-place pipeline against the
buffered writer byte for byte (misaligned tensors, tiny segments and arena, refused ``O_DIRECT``), failures, and
the ``io="auto"`` rule."""
from __future__ import annotations

import errno
import json
import os
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import hf_gauge.directio as dio
from conftest import tiny_model
from hf_gauge import GaugeError, apply_gauge_to_checkpoint, random_gauge
from hf_gauge.checkpoint import read_header
from test_checkpoint_stream import single_file


def _item(b: int, e: int) -> dio.Item:
    return dio.Item(b, e, f"t{b}", None, [e - b])


def test_segments_tile_the_file_in_order_and_group_small_tensors() -> None:
    items = [_item(100, 150), _item(150, 1150), _item(1150, 1160), _item(1160, 5000), _item(5000, 5001)]
    segs = dio.segments(list(reversed(items)), start=100, limit=1024)
    assert segs[0][0] == 0                                 # the header rides in the first segment
    assert [(a, b) for a, b, _ in segs] == [(0, 150), (150, 1160), (1160, 5000), (5000, 5001)]
    assert [it for _, _, g in segs for it in g] == items   # every tensor once, in file order
    assert all(b > a for a, b, _ in segs) and all(segs[k][1] == segs[k + 1][0] for k in range(len(segs) - 1))
    assert dio.segments([], start=40) == [(0, 40, [])]    # a shard without tensors: its header
    big = dio.arena_bytes(segs)
    assert big == dio._up(5000) - dio._down(1160) + dio.BLOCK + dio.WINDOW_BYTES


def test_arena_ring_reuses_memory_in_fifo_order() -> None:
    arena = dio.Arena(10 * dio.BLOCK)
    a = arena.take(4 * dio.BLOCK)
    b = arena.take(4 * dio.BLOCK)
    assert (a, b) == (0, 4 * dio.BLOCK)
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(arena.take(4 * dio.BLOCK)))
    waiter.start()                                         # 2 blocks left at the end, none before a: it waits
    waiter.join(0.2)
    assert waiter.is_alive() and not got
    arena.give(a)                                          # the oldest span returns: the ring wraps to 0
    waiter.join(5)
    assert got == [0]
    arena.give(b)
    assert arena.take(5 * dio.BLOCK) == 4 * dio.BLOCK      # after the live span at 0
    with pytest.raises(GaugeError, match="does not fit"):
        arena.take(11 * dio.BLOCK)
    stopper = threading.Thread(target=lambda: pytest.raises(dio._Stopped, arena.take, 8 * dio.BLOCK))
    stopper.start()
    arena.stop()
    stopper.join(5)
    assert not stopper.is_alive()
    arena.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernels", ["torch", "numba"])
@pytest.mark.parametrize("small", [False, True])
def test_direct_output_equals_buffered_byte_for_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     dtype: torch.dtype, kernels: str, small: bool) -> None:
    """The in-place pipeline writes the buffered writer's file exactly, with segments of one block and an arena
    of a few blocks beyond the largest tensor (every tensor its own segment, the ring wrapping constantly)."""
    monkeypatch.setenv("HF_GAUGE_KERNELS", kernels)
    if small:
        monkeypatch.setattr(dio, "SEGMENT_BYTES", dio.BLOCK)
        monkeypatch.setattr(dio, "WINDOW_BYTES", 3 * dio.BLOCK)
    src, model, _ = single_file(tmp_path, dtype)
    g = random_gauge(model, seed=5, spaces="all")
    a = apply_gauge_to_checkpoint(src, g, tmp_path / "a", progress=False, io="buffered")
    b = apply_gauge_to_checkpoint(src, g, tmp_path / "b", progress=False, io="direct")
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    for name in os.listdir(a):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _misaligned(tmp_path: Path) -> tuple[Path, object]:
    """A valid safetensors file whose data section starts at an odd offset (a header not padded to 8 bytes): no
    tensor is aligned to its dtype. safetensors reads it; hf_gauge moves such tensors through a copy."""
    model = tiny_model("llama", dtype=torch.float32, hidden_size=64, intermediate=192)
    src = tmp_path / "src"
    model.config.save_pretrained(src)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, tmp_path / "aligned.safetensors")
    raw, header, start = read_header(tmp_path / "aligned.safetensors")
    text = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":"))
    text += " " * ((8 - len(text) % 8 + 1) % 8)         # 8 + len(text) == 1 (mod 8)
    assert (8 + len(text)) % 4 == 1
    data = (tmp_path / "aligned.safetensors").read_bytes()[start:]
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text.encode() + data)
    return src, model


def test_misaligned_tensors_are_moved_through_a_copy(tmp_path: Path) -> None:
    src, model = _misaligned(tmp_path)
    g = random_gauge(model, seed=3, spaces="all")
    a = apply_gauge_to_checkpoint(src, g, tmp_path / "a", progress=False, io="buffered")
    b = apply_gauge_to_checkpoint(src, g, tmp_path / "b", progress=False, io="direct")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (src / "model.safetensors").read_bytes()


def test_refused_o_direct_runs_the_same_pipeline_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system that refuses ``O_DIRECT`` at open (tmpfs) or at the first transfer (a device with larger
    sectors): the pipeline goes on with ordinary descriptors and writes the same bytes."""
    src, model, _ = single_file(tmp_path, torch.bfloat16)
    g = random_gauge(model, seed=6, spaces="all")
    want = (apply_gauge_to_checkpoint(src, g, tmp_path / "a", progress=False, io="buffered")
            / "model.safetensors").read_bytes()
    real_open = os.open

    def refuse_open(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)
    monkeypatch.setattr(dio.os, "open", refuse_open)
    seen: list[bool] = []
    real_stream = dio.stream_shard
    monkeypatch.setattr(dio, "stream_shard", lambda *a, **k: seen.append(real_stream(*a, **k)) or seen[-1])
    b = apply_gauge_to_checkpoint(src, g, tmp_path / "b", progress=False, io="direct")
    assert seen == [False] and (b / "model.safetensors").read_bytes() == want
    monkeypatch.setattr(dio.os, "open", real_open)

    if not hasattr(os, "O_DIRECT"):
        return
    calls = {"n": 0}
    real_pread = dio._pread

    def refuse_direct_transfer(fd, view, offset):
        if dio.fcntl.fcntl(fd, dio.fcntl.F_GETFL) & os.O_DIRECT:
            calls["n"] += 1
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pread(fd, view, offset)
    monkeypatch.setattr(dio, "_pread", refuse_direct_transfer)
    c = apply_gauge_to_checkpoint(src, g, tmp_path / "c", progress=False, io="direct")
    assert (c / "model.safetensors").read_bytes() == want
    assert calls["n"] in (0, 1)          # 1 where the file system took O_DIRECT at open, then dropped on EINVAL


def test_failure_in_the_pipeline_stops_it_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error on the reader, the mover or the writer reaches the caller; no output or staging folder stays."""
    src, model, _ = single_file(tmp_path, torch.float32)
    g = random_gauge(model, seed=1, spaces="all")
    monkeypatch.setattr(dio, "SEGMENT_BYTES", dio.BLOCK)
    monkeypatch.setattr(dio, "WINDOW_BYTES", 2 * dio.BLOCK)
    for target in ("_pread", "_pwrite", "_move_segment"):
        real, calls = getattr(dio, target), {"n": 0}

        def flaky(*a, real=real, calls=calls, target=target):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError(f"injected failure in {target}")
            return real(*a)
        monkeypatch.setattr(dio, target, flaky)
        with pytest.raises(RuntimeError, match=f"injected failure in {target}"):
            apply_gauge_to_checkpoint(src, g, tmp_path / "out", progress=False, io="direct")
        monkeypatch.setattr(dio, target, real)
        assert sorted(n for n in os.listdir(tmp_path) if not n.endswith(".hf_gauge.lock")) == ["src"]


def test_shard_changed_after_validation_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, model, _ = single_file(tmp_path, torch.float32)
    g = random_gauge(model, seed=1, spaces="all")
    real = dio.stream_shard

    def truncate_first(path, *a, **k):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 8)
        return real(path, *a, **k)
    monkeypatch.setattr(dio, "stream_shard", truncate_first)
    with pytest.raises(GaugeError, match="changed after it was validated"):
        apply_gauge_to_checkpoint(src, g, tmp_path / "out", progress=False, io="direct")


def test_auto_takes_direct_io_only_when_input_and_output_exceed_available_memory(tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch
                                                                                 ) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683772 kB\nMemAvailable:   1000 kB\n")
    assert dio.available_memory(str(meminfo)) == 1_024_000
    assert dio.available_memory(str(tmp_path / "absent")) is None
    assert dio.direct_wanted(600_000, 1_024_000) == hasattr(os, "O_DIRECT")
    assert not dio.direct_wanted(400_000, 1_024_000)
    src, model, _ = single_file(tmp_path, torch.float32)
    g = random_gauge(model, seed=1, spaces="all")
    used: list[int] = []
    real = dio.stream_shard
    monkeypatch.setattr(dio, "stream_shard", lambda *a, **k: used.append(1) or real(*a, **k))
    monkeypatch.setattr(dio, "available_memory", lambda: 1 << 40)
    apply_gauge_to_checkpoint(src, g, tmp_path / "a", progress=False)
    assert used == []
    monkeypatch.setattr(dio, "available_memory", lambda: 1 << 10)
    apply_gauge_to_checkpoint(src, g, tmp_path / "b", progress=False)
    assert used == ([1] if hasattr(os, "O_DIRECT") else [])
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    with pytest.raises(GaugeError, match="io='fast' is not one of"):
        apply_gauge_to_checkpoint(src, g, tmp_path / "c", progress=False, io="fast")
