"""Model references: a Hub id wherever one can be known; nothing local in what is published or shared."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import hf_gauge
from conftest import tiny_model
from hf_gauge import GaugeError
from hf_gauge.modelref import is_local_path, local_base, model_ref
from hub_server import HubServer, local_network_only  # noqa: F401  (fixture)

SHA = "ab" * 20


def test_model_ref_maps_cache_paths_keeps_ids_and_makes_folders_absolute(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work" / "u2" / "A").mkdir(parents=True)
    (tmp_path / "org" / "local").mkdir(parents=True)
    cached = f"/home/u/.cache/huggingface/hub/models--org--name/snapshots/{SHA}"
    assert model_ref(cached) == ("org/name", SHA)
    assert model_ref("HuggingFaceTB/SmolLM2-135M", "r1") == ("HuggingFaceTB/SmolLM2-135M", "r1")
    assert model_ref("work/u2/A") == (str(tmp_path / "work" / "u2" / "A"), None)
    assert model_ref("org/local")[0] == str(tmp_path / "org" / "local")   # a repo-id-shaped folder that exists
    assert model_ref("gpt2") == ("gpt2", None) and model_ref("") == ("", None)
    assert all(is_local_path(p) for p in ("work/u2/A", "./A", "/abs/A", "~/A", "a/b/c"))
    assert not any(is_local_path(p) for p in ("org/name", "gpt2", "", None))


def test_describe_records_the_hub_id_of_a_cache_snapshot_and_an_absolute_folder(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM
    model = tiny_model("llama", hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate=24)
    snap = tmp_path / "hub" / "models--org--tiny" / "snapshots" / SHA
    model.save_pretrained(snap)
    model.save_pretrained(tmp_path / "work" / "A")
    monkeypatch.chdir(tmp_path)
    d = hf_gauge.describe(AutoModelForCausalLM.from_pretrained(snap))
    assert (d["model_id"], d["revision"]) == ("org/tiny", SHA)
    d = hf_gauge.describe(AutoModelForCausalLM.from_pretrained("work/A"))
    assert d["model_id"] == str(tmp_path / "work" / "A")


@pytest.mark.usefixtures("local_network_only")
def test_push_refuses_a_local_path_naming_the_argument(tmp_path: Path) -> None:
    g = hf_gauge.Gauge(hf_gauge.SignedPermutation.random(8, 0), source={"model_id": "work/u2/A"},
                       target={"model_id": str(tmp_path / "B")}, method="signed")
    with HubServer() as hub:
        with pytest.raises(GaugeError, match=r"source model is the local path 'work/u2/A'.*source_id="):
            hf_gauge.push_gauge(g, "org/x", endpoint=hub.url)
        with pytest.raises(GaugeError, match=r"target model is the local path .*target_id=.*--target-id"):
            hf_gauge.push_gauge(g, "org/x", endpoint=hub.url, source_id="org/a")
        hops = hf_gauge.Gauge(g.residual, source={"model_id": "org/a"}, target={"model_id": "org/b"},
                              metrics={"hops": [{"from": "org/a", "to": "work/u2/mid"}]})
        with pytest.raises(GaugeError, match=r"metrics\['hops'\] names the local checkpoint 'work/u2/mid'"):
            hf_gauge.push_gauge(hops, "org/x", endpoint=hub.url)
        assert "org/x" not in hub.repos                                # refused before anything was created
        hf_gauge.push_gauge(g, "org/x", endpoint=hub.url, source_id="org/a", target_id="org/b")
        files = hub.files("org/x")
    published = b"".join(v for k, v in files.items() if k.endswith((".md", ".json"))).decode()
    assert "work/u2" not in published and str(tmp_path) not in published and "org/a" in published


def test_local_base_is_stored_absolute_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "B").mkdir()
    with pytest.warns(UserWarning, match="resolves only on this machine"):
        assert local_base("./B") == str(tmp_path / "B")
    assert local_base("org/b") == "org/b"
    assert local_base(f"/x/models--org--b/snapshots/{SHA}") == "org/b"


def test_adapter_folder_and_sae_cfg_carry_no_relative_or_local_path(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative base lands absolute in adapter_config.json; a transported SAE's cfg.json names no local model."""
    from peft import LoraConfig, get_peft_model
    from sae_lens import StandardSAE, StandardSAEConfig
    monkeypatch.chdir(tmp_path)
    model = tiny_model("llama", hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate=24)
    g = hf_gauge.random_gauge(model, seed=1)
    g.source["model_id"], g.target["model_id"] = str(tmp_path / "A"), str(tmp_path / "B")
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained("ad")
    with pytest.warns(UserWarning, match="local base model"):
        hf_gauge.transport_path(g, "ad", "ad_b", base="./B")
    assert json.loads(Path("ad_b/adapter_config.json").read_text())["base_model_name_or_path"] == str(tmp_path / "B")
    cfg = json.loads(Path("ad/adapter_config.json").read_text())
    Path("ad/adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "./B"}))
    with pytest.raises(GaugeError, match="wrong direction"):     # ./B is the gauge's target /abs/B
        hf_gauge.transport_path(g, "ad", "ad_c", base="org/b")
    sae = StandardSAE(StandardSAEConfig(d_in=16, d_sae=8))
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_pre"
    sae.save_model(tmp_path / "sae")
    out = hf_gauge.transport_path(g, tmp_path / "sae", tmp_path / "sae_b")
    cfg = (out / "cfg.json").read_text()
    assert str(tmp_path) not in cfg and json.loads(cfg)["metadata"]["hf_gauge"][-1]["target"]["fingerprint"]
