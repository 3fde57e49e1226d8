"""Hub round trips with the real huggingface_hub client against a local Hub-compatible server (127.0.0.1 only)."""
from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from huggingface_hub import ModelCard

from hf_gauge import Gauge, GaugeError, SignedPermutation, load_gauge, push_gauge
from hf_gauge.hub import gauge_card, gauge_id, template_path
from hub_server import HubServer, local_network_only  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("local_network_only")


@pytest.fixture
def hub():
    with HubServer() as server:
        yield server


def gauge(seed: int) -> Gauge:
    return Gauge(SignedPermutation.random(24, seed), mlp={1: SignedPermutation.random(40, seed + 100)},
                 source={"model_id": "org/base", "model_type": "llama", "hidden_size": 24, "fingerprint": "aa"},
                 target={"model_id": "org/finetune", "model_type": "llama", "hidden_size": 24, "fingerprint": "bb"},
                 method="signed", metrics={"mean_matched": 0.99 - seed / 100})


def test_push_then_download_into_fresh_cache(hub: HubServer, tmp_path: Path) -> None:
    # a checkpoint already lives in the repo: its config.json and README must survive the gauge push
    from huggingface_hub import HfApi
    HfApi(endpoint=hub.url).create_repo("org/model")
    hub.commit("org/model", {"config.json": b'{"model_type": "llama"}', "README.md": b"# the model card\n"})
    g = gauge(1)
    info = push_gauge(g, "org/model", path_in_repo="gauges/to-finetune", endpoint=hub.url)
    files = hub.files("org/model")
    assert files["config.json"] == b'{"model_type": "llama"}' and files["README.md"] == b"# the model card\n"
    assert {"gauges/to-finetune/gauge.safetensors", "gauges/to-finetune/gauge_config.json",
            "gauges/to-finetune/README.md"} <= set(files)
    assert info.oid == hub.repos["org/model"].branches["main"]
    back = load_gauge("org/model", subfolder="gauges/to-finetune", cache_dir=tmp_path / "cache", endpoint=hub.url)
    assert back == g and back.source == g.source and back.target == g.target and back.metrics == g.metrics
    for n in g.spaces:
        assert torch.equal(back[n].perm, g[n].perm) and torch.equal(back[n].sign, g[n].sign)
    # the model card: rendered from the packaged template, with metadata and usage
    card = ModelCard(files["gauges/to-finetune/README.md"].decode())
    assert card.data.library_name == "hf_gauge" and card.data.base_model == "org/base"
    assert "org/base" in card.text and "org/finetune" in card.text and "`signed`" in card.text
    assert 'subfolder="gauges/to-finetune"' in card.text and "mean_matched" in card.text
    methods = {m for m, _ in hub.log}
    assert methods <= {"POST", "HEAD", "GET"}


def test_default_path_and_root_refused(hub: HubServer) -> None:
    g = gauge(2)
    push_gauge(g, "org/fresh", endpoint=hub.url)                # creates the repo
    assert f"gauges/{gauge_id(g)}/gauge_config.json" in hub.files("org/fresh")
    for bad in ("", "/", ".", "gauges/../x"):
        with pytest.raises(GaugeError, match="subfolder"):
            push_gauge(g, "org/fresh", path_in_repo=bad, endpoint=hub.url)
    assert "README.md" not in hub.files("org/fresh")


def test_revisions_commits_and_branches(hub: HubServer, tmp_path: Path) -> None:
    g1, g2, g3 = gauge(1), gauge(2), gauge(3)
    c1 = push_gauge(g1, "org/m", path_in_repo="gauges/g", endpoint=hub.url).oid
    c2 = push_gauge(g2, "org/m", path_in_repo="gauges/g", endpoint=hub.url).oid   # a new commit on main
    push_gauge(g3, "org/m", path_in_repo="gauges/g", revision="experiment", endpoint=hub.url)  # a new branch
    assert c1 != c2
    cache = tmp_path / "cache"
    kw = dict(subfolder="gauges/g", cache_dir=cache, endpoint=hub.url)
    assert load_gauge("org/m", revision=c1, **kw) == g1
    assert load_gauge("org/m", revision=c2, **kw) == g2
    assert load_gauge("org/m", **kw) == g2
    assert load_gauge("org/m", revision="experiment", **kw) == g3
    assert load_gauge("org/m", revision="experiment", **kw) != g2
    # each revision was cached separately; offline re-loads come from the cache without any request
    n = len(hub.log)
    assert load_gauge("org/m", revision=c1, local_files_only=True, **kw) == g1
    assert load_gauge("org/m", revision="experiment", local_files_only=True, **kw) == g3
    assert len(hub.log) == n


def test_offline_mode_env_uses_cache(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = gauge(4)
    push_gauge(g, "org/off", path_in_repo="gauges/g", endpoint=hub.url)
    kw = dict(subfolder="gauges/g", cache_dir=tmp_path / "cache", endpoint=hub.url)
    with pytest.raises(GaugeError, match="not in the local cache"):
        load_gauge("org/off", local_files_only=True, **kw)
    assert load_gauge("org/off", **kw) == g
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)   # what HF_HUB_OFFLINE=1 sets
    n = len(hub.log)
    assert load_gauge("org/off", **kw) == g
    assert len(hub.log) == n
    with pytest.raises(GaugeError, match="not in the local cache"):
        load_gauge("org/off", revision="other", **kw)


def test_hub_errors_are_gauge_errors(hub: HubServer, tmp_path: Path) -> None:
    push_gauge(gauge(5), "org/e", path_in_repo="gauges/g", endpoint=hub.url)
    kw = dict(cache_dir=tmp_path / "c", endpoint=hub.url)
    with pytest.raises(GaugeError, match="subfolder"):
        load_gauge("org/e", **kw)                                    # gauge files are not at the root
    with pytest.raises(GaugeError, match="no gauge.safetensors"):
        load_gauge("org/e", subfolder="gauges/other", **kw)
    with pytest.raises(GaugeError, match="not found"):
        load_gauge("org/e", subfolder="gauges/g", revision="nope", **kw)
    with pytest.raises(GaugeError, match="neither a local folder nor a Hub repository"):
        load_gauge("org/missing", subfolder="gauges/g", **kw)


def test_corrupt_upload_is_refused_on_download(hub: HubServer, tmp_path: Path) -> None:
    push_gauge(gauge(6), "org/c", path_in_repo="gauges/g", endpoint=hub.url)
    cfg = json.loads(hub.files("org/c")["gauges/g/gauge_config.json"])
    cfg["format_version"] = 99
    hub.commit("org/c", {"gauges/g/gauge_config.json": json.dumps(cfg).encode()})
    with pytest.raises(GaugeError, match="unknown gauge format version 99"):
        load_gauge("org/c", subfolder="gauges/g", cache_dir=tmp_path / "c", endpoint=hub.url)


def test_card_template_is_packaged_and_renders_without_metadata() -> None:
    p = template_path()
    assert p.is_file() and p.parent.name == "templates"
    card = gauge_card(Gauge(SignedPermutation.identity(4)))
    assert card.data.library_name == "hf_gauge" and card.data.base_model is None
    assert "No fit metrics were recorded" in card.text and "unknown" in card.text
