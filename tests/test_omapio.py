"""Orthogonal map folders (find --method procrustes): saved whole, read back exactly, hostile files refused."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hf_gauge import GaugeError, OrthogonalMap
from hf_gauge.omapio import describe_map, is_map_folder, load_orthogonal_map, map_card, save_orthogonal_map


def _omap(d: int = 6) -> OrthogonalMap:
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    return OrthogonalMap(q, source={"model_id": "org/a"}, target={"model_id": "org/b"}, metrics={"n_tokens": 64})


def test_round_trip_card_and_summary(tmp_path: Path) -> None:
    m = _omap()
    out = save_orthogonal_map(m, tmp_path / "om")
    assert is_map_folder(out) and not is_map_folder(tmp_path)
    back = load_orthogonal_map(out)
    assert torch.equal(back.R, m.R) and back.source == m.source and back.metrics == m.metrics
    assert describe_map(back).startswith("orthogonal map ") and "source: model_id=org/a" in describe_map(back)
    card = map_card(back, "org/maps", "maps/x")
    assert card.data.base_model == "org/a" and 'allow_patterns=["maps/x/*"]' in card.text


@pytest.mark.parametrize("break_it, match", [
    (lambda p: (p / "orthogonal_map.json").write_text('{"convention": "x_B = R x_A"}'), "not an orthogonal map"),
    (lambda p: (p / "orthogonal_map.json").write_text('{"convention": "x_B = x_A @ R", "source": 3}'),
     "source must be a JSON object"),
    (lambda p: (p / "orthogonal_map.json").write_text("[1,"), "orthogonal_map.json"),
    (lambda p: save_file({"R": 2 * torch.eye(6, dtype=torch.float64)}, str(p / "orthogonal_map.safetensors")),
     "not orthogonal"),
    (lambda p: save_file({"R": torch.eye(6), "x": torch.ones(1)}, str(p / "orthogonal_map.safetensors")),
     "one finite float tensor 'R'"),
    (lambda p: (p / "orthogonal_map.safetensors").write_bytes(b"\xff" * 16), "not a valid safetensors"),
    (lambda p: (p / "orthogonal_map.safetensors").unlink(), "has no orthogonal_map.safetensors"),
])
def test_hostile_folders_refused(tmp_path: Path, break_it, match) -> None:
    out = save_orthogonal_map(_omap(), tmp_path / "om")
    break_it(out)
    with pytest.raises(GaugeError, match=match):
        load_orthogonal_map(out)
