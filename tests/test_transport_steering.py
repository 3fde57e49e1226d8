"""Steering / control vectors: adding the transported vector to the gauged model reproduces the original
model's steered logits; the permutation-only transport does not."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import logits, tiny_model, permutation_only

from hf_gauge import GaugeError, apply_gauge, random_gauge

LAYER = 1


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair():
    a = tiny_model("llama", seed=5, layers=3)
    g = random_gauge(a, seed=8, spaces=("residual", "mlp", "attn"))
    return a, apply_gauge(copy.deepcopy(a), g), g


def steered(model, ids, vecs: dict[int, torch.Tensor]):
    """Logits with ``vecs[L]`` added to the output hidden states of block L (a forward hook)."""
    hooks = []
    for layer, v in vecs.items():
        def hook(mod, inp, out, v=v):
            if isinstance(out, tuple):
                return (out[0] + v,) + tuple(out[1:])
            return out + v
        hooks.append(model.model.layers[layer].register_forward_hook(hook))
    try:
        return logits(model, ids)
    finally:
        for h in hooks:
            h.remove()


def test_layer_dict_steering(pair, ids):
    a, b, g = pair
    gen = torch.Generator().manual_seed(0)
    vecs = {0: 4 * torch.randn(64, generator=gen), LAYER: 4 * torch.randn(64, generator=gen)}
    ref = steered(a, ids, vecs)
    assert (ref - logits(a, ids)).abs().max() > 0.1                 # the steering does something
    orig = {k: v.clone() for k, v in vecs.items()}
    moved = g.transport(vecs)
    # the input dict is never mutated: same keys, same values, and the outputs are new tensors
    assert moved is not vecs and set(vecs) == set(orig) == set(moved)
    for k in orig:
        assert torch.equal(vecs[k], orig[k]), k
        assert moved[k] is not vecs[k] and moved[k].data_ptr() != vecs[k].data_ptr(), k
    assert (steered(b, ids, moved) - ref).abs().max().item() < 1e-5
    bad = (steered(b, ids, permutation_only(g).transport(vecs)) - ref).abs().max().item()
    assert bad > 0.05, bad
    assert torch.equal(g.inverse().transport(moved)[LAYER], vecs[LAYER])   # exact round trip


def test_steering_vectors_package(pair, ids):
    sv_mod = pytest.importorskip("steering_vectors")    # optional: the Makefile installs it, `.[test]` does not
    a, b, g = pair
    v = 4 * torch.randn(64, generator=torch.Generator().manual_seed(1))
    sv = sv_mod.SteeringVector(layer_activations={LAYER: v}, layer_type="decoder_block")
    with sv.apply(a):
        ref = logits(a, ids)
    assert (ref - logits(a, ids)).abs().max() > 0.1
    sv_b = g.transport(sv)
    assert type(sv_b) is type(sv) and sv_b.layer_type == "decoder_block" and sv_b is not sv
    assert torch.equal(sv.layer_activations[LAYER], v)               # input untouched
    with sv_b.apply(b):
        got = logits(b, ids)
    assert (got - ref).abs().max().item() < 1e-5
    # the package's hooks and ours agree
    assert (steered(b, ids, sv_b.layer_activations) - ref).abs().max().item() < 1e-5
    with pytest.raises(GaugeError, match=f"layer {LAYER}"):
        g.transport(sv_mod.SteeringVector(layer_activations={LAYER: torch.randn(63)}))


def _import_repeng():
    """repeng through hf_gauge's compatibility layer (repeng 0.4 names ``np.float_``, removed in NumPy 2).

    Skips the calling test when repeng is not installed (optional: the Makefile installs it, `.[test]` does not)."""
    from hf_gauge.compat import import_repeng
    try:
        return import_repeng()
    except GaugeError as e:
        pytest.skip(str(e))


def test_repeng_imports_under_numpy2_without_a_user_shim():
    """``hf_gauge.compat.import_repeng`` imports repeng 0.4 under NumPy 2 and leaves NumPy as it was."""
    had = hasattr(np, "float_")
    repeng = _import_repeng()
    assert hasattr(repeng, "ControlVector") and hasattr(np, "float_") == had
    if int(np.__version__.split(".")[0]) >= 2:
        import sys
        saved = {k: sys.modules.pop(k) for k in [k for k in sys.modules if k.split(".")[0] == "repeng"]}
        try:
            with pytest.raises(AttributeError, match="float_"):      # what users hit without the layer
                import repeng  # noqa: F401
        finally:
            for k in [k for k in sys.modules if k.split(".")[0] == "repeng"]:
                del sys.modules[k]
            sys.modules.update(saved)


def test_repeng_gguf_control_vector_file(pair, ids, tmp_path):
    """repeng's own ``.gguf`` export through ``hf-gauge transport``: back as ``.gguf`` (repeng reads it) and as
    ``.safetensors``; the moved directions steer the gauged model like the originals steer the source."""
    from hf_gauge.cli import main
    repeng = _import_repeng()
    a, b, g = pair
    rng = np.random.default_rng(1)
    cv = repeng.ControlVector(model_type="llama", directions={
        L: (2 * rng.standard_normal(64)).astype(np.float32) for L in (0, LAYER)})
    cv.export_gguf(str(tmp_path / "cv.gguf"))
    g.save_pretrained(tmp_path / "G")
    assert main(["transport", str(tmp_path / "cv.gguf"), "--gauge", str(tmp_path / "G"), "-o",
                 str(tmp_path / "cv_b.gguf")]) == 0
    cv_b = repeng.ControlVector.import_gguf(str(tmp_path / "cv_b.gguf"))
    assert cv_b.model_type == "llama" and set(cv_b.directions) == {0, LAYER}
    for L, v in cv.directions.items():
        assert np.array_equal(cv_b.directions[L], g.residual(torch.from_numpy(v)).numpy())
    ref = steered(a, ids, {k: torch.from_numpy(v) for k, v in cv.directions.items()})
    got = steered(b, ids, {k: torch.from_numpy(np.array(v)) for k, v in cv_b.directions.items()})
    assert (got - ref).abs().max().item() < 1e-5
    assert main(["transport", str(tmp_path / "cv.gguf"), "--gauge", str(tmp_path / "G"), "-o",
                 str(tmp_path / "cv_b.safetensors")]) == 0
    from safetensors.numpy import load_file
    st = load_file(tmp_path / "cv_b.safetensors")
    assert np.array_equal(st[f"direction.{LAYER}"], cv_b.directions[LAYER])
    # a GGUF that is not a control vector (model weights) is refused, nothing written
    from gguf import GGUFWriter
    w = GGUFWriter(str(tmp_path / "model.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 64), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    assert main(["transport", str(tmp_path / "model.gguf"), "--gauge", str(tmp_path / "G"), "-o",
                 str(tmp_path / "m_b.gguf")]) == 2
    assert not (tmp_path / "m_b.gguf").exists()


def test_repeng_control_vector(pair, ids):
    repeng = _import_repeng()
    a, b, g = pair
    d = {LAYER: (3 * np.random.default_rng(0).standard_normal(64)).astype(np.float32)}
    cv = repeng.ControlVector(model_type="llama", directions=d)
    orig = {k: v.copy() for k, v in cv.directions.items()}
    cv_b = g.transport(cv)
    # the input ControlVector is never mutated, and the output's arrays are new
    assert cv_b is not cv and cv.directions is d and set(cv.directions) == set(orig)
    for k in orig:
        assert np.array_equal(cv.directions[k], orig[k]) and cv.directions[k].dtype == orig[k].dtype, k
        assert not np.shares_memory(cv_b.directions[k], cv.directions[k]), k
    assert isinstance(cv_b, repeng.ControlVector) and cv_b.model_type == "llama"
    assert cv_b.directions[LAYER].dtype == np.float32
    ref = steered(a, ids, {k: torch.from_numpy(v) for k, v in cv.directions.items()})
    got = steered(b, ids, {k: torch.from_numpy(v) for k, v in cv_b.directions.items()})
    assert (got - ref).abs().max().item() < 1e-5
    assert (2 * cv_b).directions[LAYER].shape == (64,)               # still a working repeng object
    with pytest.raises(GaugeError, match="width mismatch"):
        g.transport(repeng.ControlVector(model_type="llama", directions={0: np.zeros(10, np.float32)}))


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.bool, torch.int16, torch.int32, torch.int64])
def test_integer_and_bool_vectors_refused(dtype):
    """A sign flip wraps int8 -128 and is lost in uint8/bool: integer vectors are refused with a hint to cast."""
    from hf_gauge import Gauge, SignedPermutation
    g = Gauge(SignedPermutation(torch.arange(4).flip(0), torch.tensor([-1, 1, -1, 1])))
    v = torch.tensor([-128, 1, 2, 3]).to(dtype)
    for obj in (v, v.numpy(), {0: v}, {2: v.numpy()}):
        with pytest.raises(GaugeError, match="floating point.*cast it to float"):
            g.transport(obj)
    x = torch.tensor([-128.0, 1.0, 2.0, 3.0])
    assert torch.equal(g.transport(x), torch.tensor([-3.0, 2.0, -1.0, -128.0]))   # y[j] = sign[j] * x[perm[j]]


def test_tensor_transport_honours_space(pair):
    """``g.transport(t, space="mlp.1")`` moves ``t`` over layer 1's MLP units (as ``g.mlp[1].apply`` does); a space
    the gauge does not hold is the identity; a width that is not the space's size is refused naming the space."""
    from hf_gauge import Gauge
    g = random_gauge(tiny_model("llama"), seed=3, spaces=("residual", "mlp"))
    v = torch.randn(3, g.mlp[1].size)
    assert torch.equal(g.transport(v, space="mlp.1"), g.mlp[1].apply(v))
    assert np.array_equal(g.transport(v.numpy(), space="mlp.1"), g["mlp.1"].apply(v).numpy())
    assert torch.equal(g.transport({0: v}, space="mlp.1")[0], g.mlp[1].apply(v))
    assert torch.equal(g.restrict("residual").transport(v, space="mlp.1"), v)
    assert isinstance(g, Gauge) and torch.equal(g.transport(v[0, :64]), g.residual.apply(v[0, :64]))
    with pytest.raises(GaugeError, match=r"mlp\.1 space has size 96"):
        g.transport(torch.randn(64), space="mlp.1")
    with pytest.raises(GaugeError, match="unknown gauge space"):
        g.transport(v, space="mlp.x")
