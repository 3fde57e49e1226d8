"""GaugeConfig: the typed gauge_config.json (round trip, every field type refused, files of the old layout load)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

import hf_gauge
from hf_gauge import Gauge, GaugeError, SignedPermutation, load_gauge, save_gauge
from hf_gauge.gauge_config import FORMAT, FORMAT_VERSION, GaugeConfig, SpaceConfig
from hf_gauge.hub import CONFIG_NAME, WEIGHTS_NAME

# the keys, in order, that the hand-built writer before GaugeConfig wrote (an old reader expects this layout)
OLD_KEYS = ["format", "format_version", "library", "library_version", "group", "method", "spaces", "source",
            "target", "metrics", "confidence", "confidence_arrays", "weights_sha256"]


def make_config(**kw) -> GaugeConfig:
    base: dict = {
        "library_version": "0.1.0", "group": "B_d", "method": "signed",
        "spaces": {"residual": SpaceConfig(size=8, negative_signs=3), "mlp.0": SpaceConfig(size=6, negative_signs=0)},
        "source": {"model_id": "org/a", "model_type": "llama", "revision": None}, "target": {"model_id": "org/b"},
        "metrics": {"mean_matched": 0.9, "per_layer": [0.5, 0.25], "nan": float("nan")},
        "confidence": {"threshold": 0.05}, "confidence_arrays": {"residual": "torch", "extra": "numpy"},
        "weights_sha256": "ab" * 32}
    base.update(kw)
    return GaugeConfig(**base)


def test_exported_from_package() -> None:
    assert hf_gauge.GaugeConfig is GaugeConfig and "GaugeConfig" in hf_gauge.__all__


def test_round_trip_bytes_and_path(tmp_path: Path) -> None:
    cfg = make_config()
    raw = cfg.to_json()
    doc = json.loads(raw)
    assert list(doc) == OLD_KEYS
    assert doc["spaces"]["residual"] == {"size": 8, "negative_signs": 3}
    back = GaugeConfig.from_json(raw, "x.json")
    assert back.metrics.pop("nan") != back.metrics.get("nan", 0)   # NaN survives (and is never equal to itself)
    cfg.metrics.pop("nan")
    assert back == cfg
    (tmp_path / "c.json").write_bytes(raw)
    again = GaugeConfig.from_json(tmp_path / "c.json", "c.json")
    again.metrics.pop("nan")
    assert again == cfg and GaugeConfig.from_json(str(tmp_path / "c.json"), "c.json").spaces == cfg.spaces
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.method = "other"  # type: ignore[misc]


def test_saved_gauge_config_is_a_gauge_config(tmp_path: Path) -> None:
    g = Gauge(SignedPermutation.random(8, 1), attn={0: SignedPermutation.random(4, 2)}, method="random",
              confidence={"residual": torch.rand(8), "threshold": 0.1}, metrics={"n_tokens": 5})
    folder = save_gauge(g, tmp_path / "g")
    raw = (folder / CONFIG_NAME).read_bytes()
    cfg = GaugeConfig.from_json(raw, "g")
    assert cfg.to_json() == raw                                       # the writer is GaugeConfig.to_json
    assert cfg.weights_sha256 == hashlib.sha256((folder / WEIGHTS_NAME).read_bytes()).hexdigest()
    assert cfg.spaces == {n: SpaceConfig(el.size, int((el.sign < 0).sum())) for n, el in g.spaces.items()}
    assert cfg.confidence_arrays == {"residual": "torch"} and cfg.confidence == {"threshold": 0.1}
    assert (cfg.format, cfg.format_version, cfg.library, cfg.method) == (FORMAT, FORMAT_VERSION, "hf_gauge", "random")


def _doc(**changes) -> dict:
    doc = json.loads(make_config().to_json())
    for k, v in changes.items():
        if v is _MISSING:
            del doc[k]
        else:
            doc[k] = v
    return doc


_MISSING = object()


@pytest.mark.parametrize("key,value,match", [
    ("format_version", "1", "unknown gauge format version"), ("format_version", True, "unknown gauge format version"),
    ("format_version", 2, "unknown gauge format version"), ("format_version", _MISSING, "unknown gauge format version"),
    ("format", "other", "not an hf_gauge gauge config"), ("format", _MISSING, "not an hf_gauge gauge config"),
    ("library", 1, "field 'library' is an integer"), ("library_version", [0, 1], "'library_version' is an array"),
    ("group", {"g": 1}, "'group' is an object"), ("method", {"x": 1}, "'method' is an object"),
    ("spaces", ["residual"], "'spaces' is an array"), ("spaces", None, "'spaces' is null"),
    ("spaces", _MISSING, "'spaces' is missing"), ("spaces", {}, "lists no gauge spaces"),
    ("spaces", {"residual": 8}, "size None"), ("spaces", {"residual": {"size": "8"}}, "size '8'"),
    ("spaces", {"residual": {"size": True}}, "size True"), ("spaces", {"residual": {"size": 0}}, "size 0"),
    ("spaces", {"residual": {"size": 1 << 40}}, "positive integer"),
    ("spaces", {"residual": {"size": 8, "negative_signs": 9}}, "negative_signs 9"),
    ("spaces", {"residual": {"size": 8, "negative_signs": "1"}}, "negative_signs '1'"),
    ("source", "org/model", "'source' is a string"), ("target", 7, "'target' is an integer"),
    ("metrics", [0.5], "'metrics' is an array"), ("confidence", "high", "'confidence' is a string"),
    ("confidence_arrays", ["residual"], "'confidence_arrays' is an array"),
    ("confidence_arrays", {"residual": "pickle"}, "kind 'pickle'"),
    ("weights_sha256", None, "'weights_sha256' is null"), ("weights_sha256", 5, "'weights_sha256' is an integer"),
    ("weights_sha256", _MISSING, "'weights_sha256' is missing"),
])
def test_every_field_type_refused(key: str, value, match: str) -> None:
    raw = json.dumps(_doc(**{key: value})).encode()
    with pytest.raises(GaugeError, match=match) as e:
        GaugeConfig.from_json(raw, "folder/gauge_config.json")
    assert "folder/gauge_config.json" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("raw,match", [(b"[1, 2]", "not an hf_gauge gauge config"), (b"{", "not valid JSON"),
                                       (b'{"format": "\xff"}', "not valid JSON"),
                                       (b"[" * 100 + b"]" * 100, "nests deeper")])
def test_hostile_json_refused_by_the_shared_reader(raw: bytes, match: str) -> None:
    with pytest.raises(GaugeError, match=match):
        GaugeConfig.from_json(raw, "cfg.json")


def test_missing_path_refused(tmp_path: Path) -> None:
    with pytest.raises(GaugeError, match="cannot read"):
        GaugeConfig.from_json(tmp_path / "nope.json", "nope.json")


def test_null_or_absent_optional_fields_read_as_empty_and_extra_keys_ignored() -> None:
    doc = _doc(source=None, target=_MISSING, metrics=None, confidence=_MISSING, confidence_arrays=None, method=None,
               library=_MISSING, group=None)
    doc["a_future_additive_key"] = {"anything": [1]}
    doc["spaces"] = {"residual": {"size": 8}}                      # negative_signs is optional
    cfg = GaugeConfig.from_json(json.dumps(doc).encode(), "c.json")
    assert (cfg.source, cfg.target, cfg.metrics, cfg.confidence, cfg.confidence_arrays) == ({}, {}, {}, {}, {})
    assert (cfg.method, cfg.library, cfg.group) == (None, None, None)
    assert cfg.spaces == {"residual": SpaceConfig(size=8, negative_signs=None)}


# a gauge_config.json exactly as the hand-built writer before GaugeConfig wrote it (indent 2, these keys)
OLD_FILE = """{
  "format": "hf_gauge.gauge",
  "format_version": 1,
  "library": "hf_gauge",
  "library_version": "0.1.0",
  "group": "B_d",
  "method": "signed",
  "spaces": {
    "residual": {
      "size": 4,
      "negative_signs": 2
    }
  },
  "source": {
    "model_id": "org/a",
    "model_type": "llama"
  },
  "target": {},
  "metrics": {
    "mean_matched": 0.75
  },
  "confidence": {
    "threshold": 0.05
  },
  "confidence_arrays": {
    "residual": "numpy"
  },
  "weights_sha256": "SHA"
}
"""


def test_old_layout_file_loads(tmp_path: Path) -> None:
    perm, sign = torch.tensor([2, 0, 3, 1]), torch.tensor([1, -1, -1, 1], dtype=torch.int8)
    weights = st_save({"residual.perm": perm, "residual.sign": sign, "residual.margin": torch.ones(4)},
                      metadata={"format": "hf_gauge.gauge", "format_version": "1", "group": "B_d"})
    text = OLD_FILE.replace("SHA", hashlib.sha256(weights).hexdigest())
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / WEIGHTS_NAME).write_bytes(weights)
    (folder / CONFIG_NAME).write_text(text)
    cfg = GaugeConfig.from_json(folder / CONFIG_NAME, "old")
    assert cfg.to_json().decode() == text                            # the layout is unchanged byte for byte
    g = load_gauge(folder)
    assert torch.equal(g.residual.perm, perm) and torch.equal(g.residual.sign, sign)
    assert g.source == {"model_id": "org/a", "model_type": "llama"} and g.metrics == {"mean_matched": 0.75}
    assert g.method == "signed" and g.confidence["threshold"] == 0.05
    assert (g.confidence["residual"] == 1).all() and type(g.confidence["residual"]).__module__ == "numpy"


def test_load_gauge_refuses_a_config_without_checksum(tmp_path: Path) -> None:
    folder = save_gauge(Gauge(SignedPermutation.random(8, 0)), tmp_path / "g")
    doc = json.loads((folder / CONFIG_NAME).read_text())
    del doc["weights_sha256"]
    (folder / CONFIG_NAME).write_text(json.dumps(doc))
    with pytest.raises(GaugeError, match="weights_sha256"):
        load_gauge(folder)
