"""compose_path: local gauges along saved checkpoints compose into the end-to-end gauge (g2 @ g1)."""
from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

from conftest import tiny_model
import hf_gauge
from hf_gauge import GaugeError, compose_path
import hf_gauge.path as path_mod


def _drift(model, seed, scale=0.01):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=gen))


@pytest.fixture
def chain(tmp_path):
    """Three saved checkpoints: c1 = g1(c0) + drift, c2 = g2(c1) + drift."""
    c0 = tiny_model("llama", seed=2)
    c1 = copy.deepcopy(c0)
    g1 = hf_gauge.random_gauge(c1, seed=1)
    c1.apply_gauge(g1)
    _drift(c1, 1)
    c2 = copy.deepcopy(c1)
    g2 = hf_gauge.random_gauge(c2, seed=2)
    c2.apply_gauge(g2)
    _drift(c2, 2)
    paths = []
    for k, m in enumerate((c0, c1, c2)):
        m.save_pretrained(tmp_path / f"ckpt{k}")
        paths.append(str(tmp_path / f"ckpt{k}"))
    return paths, (c0, c1, c2), g2 @ g1


def test_compose_paths_and_models(chain, ids):
    paths, models, truth = chain
    g = compose_path(paths)
    assert g == truth
    assert g.metrics["n_hops"] == 2 and [h["from"] for h in g.metrics["hops"]] == paths[:2]
    assert all(h["mean_matched"] > 0.9 for h in g.metrics["hops"])
    assert g.source["fingerprint"] == hf_gauge.fingerprint(models[0]) and g.source["model_id"] == paths[0]
    assert g.target["fingerprint"] == hf_gauge.fingerprint(models[2]) and g.target["model_id"] == paths[2]
    assert torch.as_tensor(g.confidence["residual"]).shape == (64,) and g.metrics["min_margin"] > 0
    assert compose_path(list(models), data=ids, progress=False) == truth
    assert compose_path([paths[0], paths[2]], via=paths[1]) == truth
    assert compose_path([models[0], models[2]], via=[models[1]]) == truth


def test_at_most_two_models_alive(chain, monkeypatch):
    paths, _, truth = chain
    alive: list[weakref.ref] = []
    real = path_mod._load

    def tracking(ckpt, kw):
        gc.collect()
        assert sum(r() is not None for r in alive) <= 1, "a third checkpoint was loaded while two were alive"
        m = real(ckpt, kw)
        alive.append(weakref.ref(m))
        return m

    monkeypatch.setattr(path_mod, "_load", tracking)
    assert compose_path(paths) == truth and len(alive) == 3


def test_composition_order_is_g2_after_g1():
    A = tiny_model("llama", seed=0)
    B, C = copy.deepcopy(A), None
    g1 = hf_gauge.random_gauge(B, seed=3)
    B.apply_gauge(g1)
    C = copy.deepcopy(B)
    g2 = hf_gauge.random_gauge(C, seed=4)
    C.apply_gauge(g2)
    g = compose_path([A, B, C])
    assert g == g2 @ g1 and g != g1 @ g2
    target = {k: v.clone() for k, v in C.state_dict().items()}
    A.apply_gauge(g)
    assert all(torch.equal(A.state_dict()[k], v) for k, v in target.items())


@pytest.mark.parametrize("kwargs, match", [
    (dict(checkpoints=["only-one"]), "at least two"),
    (dict(checkpoints="a-path"), "list of models"),
    (dict(checkpoints=["a", "b", "c"], via="base"), "via= inserts"),
    (dict(checkpoints=["a", "b"], method="procrustes"), "signed"),
    (dict(checkpoints=["a", "b"], data=iter([torch.ones(1, 3, dtype=torch.long)])), "one-shot iterator"),
    (dict(checkpoints=[3, 4]), "a model or a local path"),
])
def test_bad_paths_refused(kwargs, match):
    with pytest.raises(GaugeError, match=match):
        compose_path(**kwargs)
