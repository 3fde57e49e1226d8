"""Steering / control vectors: adding the transported vector to the gauged model reproduces the original
model's steered logits; the permutation-only transport does not."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import logits, tiny_model

from hf_gauge import GaugeError, apply_gauge, random_gauge
from hf_gauge.transport._io import permutation_only

LAYER = 1


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    """repeng 0.4 annotates with ``np.float_`` (removed in NumPy 2); only the annotation needs it, at import time.

    Skips the calling test when repeng is not installed (optional: the Makefile installs it, `.[test]` does not)."""
    try:
        return pytest.importorskip("repeng")
    except AttributeError as e:
        if "float_" not in str(e):
            raise
    import sys
    for k in [k for k in sys.modules if k == "repeng" or k.startswith("repeng.")]:
        del sys.modules[k]
    had = hasattr(np, "float_")
    np.float_ = np.float64          # temporary alias, removed right after the import
    try:
        import repeng
    finally:
        if not had:
            del np.float_
    return repeng


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
