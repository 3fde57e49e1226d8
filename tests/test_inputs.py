"""Hostile input folders: links that leave the folder, loops, FIFOs and devices are refused before anything is read;
links inside the folder (and a Hub-cache snapshot's links into its blobs) are read and copied as regular files."""
from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_gauge
from conftest import tiny_model
from hf_gauge import Gauge, GaugeError, SignedPermutation, apply_gauge_to_checkpoint, random_gauge
from hf_gauge.cli import main
from hf_gauge.inputs import audit_folder
from hf_gauge.transport.files import transport_path

D = 12
SECRET = b"-----BEGIN OPENSSH PRIVATE KEY-----\nnot really\n"


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    p = tmp_path / "home" / ".ssh" / "id_rsa"
    p.parent.mkdir(parents=True)
    p.write_bytes(SECRET)
    return p


def _hostile(folder: Path, case: str, secret: Path) -> str:
    """Put one hostile entry into ``folder``; returns the phrase the refusal must contain."""
    p = folder / "notes.txt"
    if case == "link_out":
        p.symlink_to(os.path.relpath(secret, folder))
        return "outside what hf_gauge reads"
    if case == "link_out_nested":                          # a folder inside, a link out of it
        (folder / "docs").mkdir()
        (folder / "docs" / "key").symlink_to(secret)
        return "outside what hf_gauge reads"
    if case == "link_into_git":                            # .git/config may hold a token in a remote URL
        (folder / ".git").mkdir()
        (folder / ".git" / "config").write_text("[remote] url = https://user:token@host/x")
        p.symlink_to(".git/config")
        return "outside what hf_gauge reads"
    if case == "loop":
        (folder / "a").symlink_to("b")
        (folder / "b").symlink_to("a")
        return "loop"
    if case == "dangling":
        p.symlink_to("nowhere.txt")
        return "dangling"
    if case == "link_to_folder":
        (folder / "sub").mkdir()
        (folder / "subdir").symlink_to("sub")
        return "links to folders"
    if case == "fifo":
        os.mkfifo(p)
        return "FIFO"
    if case == "fifo_behind_link":
        os.mkfifo(folder / "pipe")
        p.symlink_to("pipe")
        return "FIFO"
    raise AssertionError(case)


CASES = ["link_out", "link_out_nested", "link_into_git", "loop", "dangling", "link_to_folder", "fifo",
         "fifo_behind_link"]


def _no_hang(fn, *args, **kw):
    """Run ``fn``; a FIFO that got opened would block forever, so fail after 60 s instead of hanging the suite."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args, **kw)
        except BaseException as e:            # noqa: BLE001 - handed back to the test
            box["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "blocked on a special file"
    if "error" in box:
        raise box["error"]
    return box["value"]


# ---------------------------------------------------------------------------------------------- the audit itself
def test_audit_lists_files_and_resolves_inner_links(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("b")
    (tmp_path / "alias.txt").symlink_to("sub/b.txt")
    (tmp_path / ".git").mkdir()
    os.mkfifo(tmp_path / ".git" / "fifo")                  # never read: .git is skipped
    files = audit_folder(tmp_path)
    assert list(files) == ["a.txt", "alias.txt", "sub/b.txt"]
    assert files["alias.txt"] == (tmp_path / "sub" / "b.txt").resolve()
    with pytest.raises(GaugeError, match="FIFO"):
        audit_folder(tmp_path, skip_dirs=frozenset())


@pytest.mark.parametrize("case", CASES)
def test_audit_refuses(tmp_path: Path, secret: Path, case: str) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    phrase = _hostile(folder, case, secret)
    with pytest.raises(GaugeError, match=phrase) as e:
        _no_hang(audit_folder, folder)
    assert "\n" not in str(e.value) and str(folder) in str(e.value)


def test_audit_refuses_devices(tmp_path: Path) -> None:
    try:
        os.mknod(tmp_path / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device node needs root")
    with pytest.raises(GaugeError, match="character device"):
        audit_folder(tmp_path)
    (tmp_path / "null").unlink()
    (tmp_path / "dev").symlink_to("/dev/null")             # a link out to a device: outside the folder
    with pytest.raises(GaugeError, match="outside"):
        audit_folder(tmp_path)


def test_hub_cache_snapshot_links_into_its_blobs(tmp_path: Path, secret: Path) -> None:
    """huggingface_hub's cache keeps files in ``blobs/`` and links them from ``snapshots/<rev>/``: admitted; a link
    from the snapshot to anywhere else is still refused."""
    repo = tmp_path / "hub" / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "blobs" / "f00d").write_text("{}")
    (snap / "config.json").symlink_to("../../blobs/f00d")
    assert audit_folder(snap) == {"config.json": (repo / "blobs" / "f00d").resolve()}
    (snap / "blocks.1").mkdir()                            # a subfolder of a snapshot (an SAE release): the same
    (snap / "blocks.1" / "cfg.json").symlink_to("../../../blobs/f00d")
    assert audit_folder(snap / "blocks.1") == {"cfg.json": (repo / "blobs" / "f00d").resolve()}
    (snap / "blocks.1" / "cfg.json").unlink()
    (snap / "notes.txt").symlink_to(secret)
    with pytest.raises(GaugeError, match="outside"):
        audit_folder(snap)
    (snap / "notes.txt").unlink()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (snap / "ref").symlink_to("../../refs/main")           # inside the repo folder, but not in blobs/
    with pytest.raises(GaugeError, match="outside"):
        audit_folder(snap)


# ------------------------------------------------------------------------------------------------ streaming apply
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    model = tiny_model("llama")
    src = tmp_path_factory.mktemp("ckpt") / "src"
    model.save_pretrained(src)
    return src, random_gauge(model, seed=1)


def _copy_ckpt(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


@pytest.mark.parametrize("case", CASES)
def test_streaming_apply_refuses_hostile_folders(tmp_path: Path, tiny_ckpt, secret: Path, case: str) -> None:
    src, g = tiny_ckpt
    folder = _copy_ckpt(src, tmp_path / "in")
    phrase = _hostile(folder, case, secret)
    with pytest.raises(GaugeError, match=phrase):
        _no_hang(apply_gauge_to_checkpoint, folder, g, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not any(SECRET in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()
                   and p != secret)


def test_streaming_apply_copies_inner_links_as_files(tmp_path: Path, tiny_ckpt) -> None:
    src, g = tiny_ckpt
    folder = _copy_ckpt(src, tmp_path / "in")
    (folder / "docs").mkdir()
    (folder / "docs" / "notes.md").write_text("kept")
    (folder / "notes.md").symlink_to("docs/notes.md")
    os.chmod(folder / "docs" / "notes.md", 0o4755)         # mode bits of an input never reach the output
    out = apply_gauge_to_checkpoint(folder, g, tmp_path / "out", progress=False)
    for rel in ("notes.md", "docs/notes.md"):
        assert not (out / rel).is_symlink() and (out / rel).read_text() == "kept"
        assert not (out / rel).stat().st_mode & (stat.S_ISUID | stat.S_IXUSR)


def test_cli_apply_and_find_refuse_a_link_out(tmp_path: Path, tiny_ckpt, secret: Path, capsys) -> None:
    src, g = tiny_ckpt
    folder = _copy_ckpt(src, tmp_path / "in")
    _hostile(folder, "link_out", secret)
    g.save_pretrained(tmp_path / "g")
    assert main(["apply", str(folder), "--gauge", str(tmp_path / "g"), "-o", str(tmp_path / "out")]) == 2
    assert "outside what hf_gauge reads" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(GaugeError, match="outside"):                   # find from files reads nothing either
        hf_gauge.find_gauge(folder, src)


# ----------------------------------------------------------------------------------------- adapter and SAE folders
def _sae_folder(path: Path) -> Path:
    path.mkdir()
    (path / "cfg.json").write_text(json.dumps({"d_in": D, "d_sae": 4, "metadata": {"hook_name": "blocks.1.hook_resid_pre"}}))
    save_file({"W_enc": torch.randn(D, 4), "W_dec": torch.randn(4, D), "b_enc": torch.zeros(4),
               "b_dec": torch.zeros(D)}, path / "sae_weights.safetensors")
    return path


def _adapter_folder(path: Path) -> Path:
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": ["q_proj"],
                                                          "base_model_name_or_path": "org/a"}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, D)},
              path / "adapter_model.safetensors")
    return path


@pytest.mark.parametrize("kind", ["sae", "adapter"])
@pytest.mark.parametrize("case", ["link_out", "link_into_git", "loop", "fifo", "fifo_behind_link"])
def test_transport_folders_refuse_hostile_entries(tmp_path: Path, secret: Path, kind: str, case: str) -> None:
    g = Gauge(residual=SignedPermutation.random(D, 4), method="test", source={"model_type": "llama"},
              target={"model_id": "org/b"})
    src = (_sae_folder if kind == "sae" else _adapter_folder)(tmp_path / kind)
    phrase = _hostile(src, case, secret)
    with pytest.raises(GaugeError, match=phrase):
        _no_hang(transport_path, g, src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sae_folder_inner_link_copied_as_file(tmp_path: Path) -> None:
    g = Gauge(residual=SignedPermutation.random(D, 4), method="test", source={"model_type": "llama"})
    src = _sae_folder(tmp_path / "sae")
    (src / "README.md").write_text("my SAE")
    (src / "card.md").symlink_to("README.md")
    out = transport_path(g, src, tmp_path / "out")
    assert not (out / "card.md").is_symlink() and (out / "card.md").read_text() == "my SAE"
    assert torch.equal(load_file(out / "sae_weights.safetensors")["b_dec"], torch.zeros(D))


def test_load_gauge_refuses_a_gauge_folder_linking_out(tmp_path: Path) -> None:
    g = Gauge(residual=SignedPermutation.random(D, 4), method="test")
    g.save_pretrained(tmp_path / "elsewhere")
    folder = tmp_path / "g"
    folder.mkdir()
    for name in ("gauge.safetensors", "gauge_config.json"):
        (folder / name).symlink_to(tmp_path / "elsewhere" / name)
    with pytest.raises(GaugeError, match="outside"):
        hf_gauge.load_gauge(folder)
    assert hf_gauge.load_gauge(tmp_path / "elsewhere") == g
