"""Path-level transport (the CLI entry point): detection, atomic output, refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_gauge import Gauge, GaugeError, SignedPermutation
from hf_gauge.transport.files import detect, transport_path

D = 12


@pytest.fixture
def g():
    return Gauge(residual=SignedPermutation.random(D, 4), method="test", source={"model_type": "llama"})


def test_steering_safetensors(g, tmp_path):
    src = tmp_path / "vectors.safetensors"
    vecs = {"layer.3": torch.randn(D), "layer.7": torch.randn(2, D)}
    save_file(vecs, src, metadata={"note": "kept"})
    assert detect(src) == "vectors"
    out = transport_path(g, src, tmp_path / "out" / "vectors.safetensors")
    new = load_file(out)
    for k, v in vecs.items():
        assert torch.equal(new[k], g.residual.apply(v))
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["note"] == "kept" and json.loads(meta["hf_gauge"])["method"] == "test"
    assert torch.equal(load_file(src)["layer.3"], vecs["layer.3"])          # input untouched
    with pytest.raises(GaugeError, match="overwrite"):
        transport_path(g, src, src)
    with pytest.raises(GaugeError, match="not empty"):
        transport_path(g, src, out)
    save_file({"ok": torch.randn(D), "bad": torch.randn(D + 1)}, tmp_path / "bad.safetensors")
    with pytest.raises(GaugeError, match="bad"):
        transport_path(g, tmp_path / "bad.safetensors", tmp_path / "bad_out.safetensors")
    assert not (tmp_path / "bad_out.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_steering_torch_file(g, tmp_path):
    src = tmp_path / "sv.pt"
    vecs = {3: torch.randn(D), 5: torch.randn(D)}
    torch.save(vecs, src)
    assert detect(src) == "vectors-torch"
    out = g.transport(src, out=tmp_path / "sv_b.pt")
    new = torch.load(out, weights_only=True)
    assert set(new) == {3, 5} and torch.equal(new[5], g.residual.apply(vecs[5]))
    torch.save(torch.randn(4, D), tmp_path / "t.pt")
    assert torch.equal(torch.load(transport_path(g, tmp_path / "t.pt", tmp_path / "t2.pt"), weights_only=True),
                       g.residual.apply(torch.load(tmp_path / "t.pt", weights_only=True)))


class NotWeights:
    pass


def test_refusals(g, tmp_path):
    torch.save({"obj": NotWeights()}, tmp_path / "pickle.pt")
    with pytest.raises(GaugeError, match="weights_only"):
        transport_path(g, tmp_path / "pickle.pt", tmp_path / "o.pt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(GaugeError, match="neither"):
        transport_path(g, tmp_path / "folder", tmp_path / "o")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(GaugeError, match="don't know"):
        transport_path(g, tmp_path / "x.txt", tmp_path / "y.txt")
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, D)},
              tmp_path / "adapter_model.safetensors")
    with pytest.raises(GaugeError, match="adapter folder"):
        transport_path(g, tmp_path / "adapter_model.safetensors", tmp_path / "o.safetensors")
    with pytest.raises(GaugeError, match="does not exist"):
        transport_path(g, tmp_path / "missing", tmp_path / "o2")
    with pytest.raises(GaugeError, match="out="):
        g.transport(tmp_path / "x.txt")
    # an SAE folder holding a weight file hf_gauge does not understand is refused, not copied unmoved
    sae = tmp_path / "sae"
    sae.mkdir()
    (sae / "cfg.json").write_text(json.dumps({"d_in": D, "d_sae": 4, "architecture": "standard"}))
    save_file({"W_enc": torch.randn(D, 4), "W_dec": torch.randn(4, D), "b_enc": torch.zeros(4),
               "b_dec": torch.zeros(D)}, sae / "sae_weights.safetensors")
    save_file({"x": torch.randn(D)}, sae / "extra.safetensors")
    with pytest.raises(GaugeError, match="extra.safetensors"):
        transport_path(g, sae, tmp_path / "sae_out")
    assert not (tmp_path / "sae_out").exists()
    (sae / "extra.safetensors").unlink()
    out = transport_path(g, sae, tmp_path / "sae_out")
    assert torch.equal(load_file(out / "sae_weights.safetensors")["W_enc"],
                       g.residual.apply(load_file(sae / "sae_weights.safetensors")["W_enc"], dim=0))
    assert json.loads((out / "cfg.json").read_text())["hf_gauge"][0]["space"] == "residual"


def test_corrupt_safetensors_refused(g, tmp_path):
    """A corrupt or non-safetensors ``.safetensors`` file is a GaugeError naming the file, and writes nothing."""
    from safetensors.torch import save
    good = save({"v": torch.randn(D)})
    for name, data in {"text": b"not a safetensors file", "empty": b"", "truncated": good[:-5],
                       "extra": good + b"xx"}.items():
        src = tmp_path / f"{name}.safetensors"
        src.write_bytes(data)
        assert detect(src) == "vectors"
        with pytest.raises(GaugeError, match="not a valid safetensors file") as e:
            transport_path(g, src, tmp_path / f"{name}_out.safetensors")
        assert str(src) in str(e.value)
        assert not (tmp_path / f"{name}_out.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("kind", ["sae", "adapter"])
def test_corrupt_weights_in_a_folder_refused(g, tmp_path, kind):
    """A SAELens or PEFT folder whose weights file is corrupt is a GaugeError naming that file, and writes nothing."""
    src = tmp_path / kind
    src.mkdir()
    if kind == "sae":
        (src / "cfg.json").write_text(json.dumps({"d_in": D, "d_sae": 4, "metadata": {"hook_name": "blocks.1.hook_resid_pre"}}))
        weights = src / "sae_weights.safetensors"
    else:
        (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": ["q_proj"]}))
        weights = src / "adapter_model.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{truncated")
    with pytest.raises(GaugeError, match="not a valid safetensors file") as e:
        transport_path(g, src, tmp_path / "out")
    assert str(weights) in str(e.value)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ hostile JSON (item 8)
@pytest.mark.parametrize("kind", ["sae", "peft"])
@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b"[1, 2]", b'{"hook_name": 5}',
                                     b'{"peft_type": "LORA", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                                     b'{"n": ' + b"9" * 5000 + b"}", "loop"])
def test_hostile_sae_and_adapter_configs_are_gauge_errors(tmp_path, kind, content) -> None:
    """SAE cfg.json / adapter_config.json that are not valid JSON, not an object, wrongly typed, absurdly deep or a
    symlink loop: GaugeError (one line), never JSONDecodeError/TypeError/RecursionError; nothing written."""
    from safetensors.torch import save_file

    from hf_gauge import Gauge, GaugeError, SignedPermutation
    from hf_gauge.transport.files import transport_path
    g = Gauge(SignedPermutation.random(8, 0), source={"model_type": "llama"})
    src = tmp_path / kind
    src.mkdir()
    cfg_name, w_name = (("cfg.json", "sae_weights.safetensors") if kind == "sae"
                        else ("adapter_config.json", "adapter_model.safetensors"))
    save_file({"W_dec": torch.zeros(4, 8)}, str(src / w_name))
    if content == "loop":
        (src / cfg_name).symlink_to(src / cfg_name)
    else:
        (src / cfg_name).write_bytes(content)
    with pytest.raises(GaugeError) as e:
        transport_path(g, src, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [kind]


@pytest.mark.parametrize("arr", [np.array([object(), 1, 2, 3], dtype=object), np.array(["a", "b", "c", "d"])])
def test_numpy_object_and_string_arrays_refused(arr) -> None:
    from hf_gauge import Gauge, GaugeError, SignedPermutation
    g = Gauge(SignedPermutation.random(4, 0))
    for obj in (arr, {3: arr}):
        with pytest.raises(GaugeError, match="numpy dtype"):
            g.transport(obj)


# ------------------------------------------------------------------------------------------------ issue 23, item 6
def test_vectors_transported_twice_by_one_gauge_are_refused(g, tmp_path):
    """The gauge record in the output's metadata makes a second transport through the same gauge (or one that
    starts from another chart) a GaugeError, as an adapter folder's record does; the inverse gauge goes back."""
    v = torch.randn(3, g.residual.size)
    save_file({"v": v}, str(tmp_path / "v.safetensors"))
    once = transport_path(g, tmp_path / "v.safetensors", tmp_path / "v1.safetensors")
    with pytest.raises(GaugeError, match="already transported through this gauge.*hf_gauge metadata"):
        transport_path(g, once, tmp_path / "v2.safetensors")
    assert not (tmp_path / "v2.safetensors").exists()
    back = transport_path(g.inverse(), once, tmp_path / "v0.safetensors")
    assert torch.equal(load_file(str(back))["v"], v)
    fp = Gauge(g.residual, source={"fingerprint": "aa"}, target={"fingerprint": "bb"})
    other = Gauge(SignedPermutation.random(g.residual.size, 7), source={"fingerprint": "cc"})
    once = transport_path(fp, tmp_path / "v.safetensors", tmp_path / "w1.safetensors")
    with pytest.raises(GaugeError, match="chart with fingerprint bb"):
        transport_path(other, once, tmp_path / "w2.safetensors")
    save_file({"v": v}, str(tmp_path / "bad.safetensors"), metadata={"hf_gauge": "[1, 2"})
    with pytest.raises(GaugeError, match="hf_gauge metadata of"):
        transport_path(g, tmp_path / "bad.safetensors", tmp_path / "b1.safetensors")


def test_control_gguf_with_two_names_for_one_layer_is_refused(g, tmp_path):
    pytest.importorskip("gguf")
    from hf_gauge.transport.control_gguf import read_control_gguf, write_control_gguf
    d = g.residual.size
    write_control_gguf(tmp_path / "ok.gguf", "llama", {1: np.ones(d, np.float32), 2: np.zeros(d, np.float32)})
    assert sorted(read_control_gguf(tmp_path / "ok.gguf")[1]) == [1, 2]
    from gguf import GGUFWriter
    w = GGUFWriter(str(tmp_path / "dup.gguf"), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_uint32("controlvector.layer_count", 2)
    w.add_tensor("direction.1", np.ones(d, np.float32))
    w.add_tensor("direction.01", np.zeros(d, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GaugeError, match="'direction.1' and 'direction.01' both give layer 1"):
        transport_path(g, tmp_path / "dup.gguf", tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()
