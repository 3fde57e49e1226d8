"""hf_gauge.testing.local_hub: the real huggingface_hub client talks to the local server inside the block, and its
settings come back afterwards (also after an error)."""
from __future__ import annotations

import huggingface_hub.constants as hc
import pytest
from hub_server import local_network_only  # noqa: F401  (fixture)

from hf_gauge import Gauge, SignedPermutation, list_gauges
from hf_gauge.testing import local_hub

pytestmark = pytest.mark.usefixtures("local_network_only")


def test_push_and_load_through_the_default_client_settings() -> None:
    before = (hc.ENDPOINT, hc.HUGGINGFACE_CO_URL_TEMPLATE, hc.HF_HUB_CACHE, hc.HF_HUB_DISABLE_XET)
    g = Gauge(SignedPermutation.random(16, 3), source={"model_id": "org/a"}, target={"model_id": "org/b"})
    with local_hub() as hub:
        cache = hc.HF_HUB_CACHE
        g.push_to_hub("org/m", path_in_repo="gauges/a2b")   # no endpoint passed: the patched constants route it
        assert list_gauges("org/m") == ["gauges/a2b"]
        assert Gauge.from_pretrained("org/m", subfolder="gauges/a2b") == g
        assert "org/m" in hub.repos and any(p.startswith("/api/") for _, p in hub.log)
    assert (hc.ENDPOINT, hc.HUGGINGFACE_CO_URL_TEMPLATE, hc.HF_HUB_CACHE, hc.HF_HUB_DISABLE_XET) == before
    assert not __import__("os").path.exists(cache)                   # the throw-away cache is removed


def test_settings_restored_after_an_error() -> None:
    before = (hc.ENDPOINT, hc.HUGGINGFACE_CO_URL_TEMPLATE, hc.HF_HUB_CACHE)
    with pytest.raises(RuntimeError), local_hub():
        assert hc.ENDPOINT.startswith("http://127.0.0.1:")
        raise RuntimeError("boom")
    assert (hc.ENDPOINT, hc.HUGGINGFACE_CO_URL_TEMPLATE, hc.HF_HUB_CACHE) == before


def test_offline_mode_is_lifted_for_the_block_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """With HF_HUB_OFFLINE=1 (a user's setting, or one a test left in the environment) the local server still
    answers inside the block, and offline mode is back afterwards."""
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    g = Gauge(SignedPermutation.random(16, 4), source={"model_id": "org/a"}, target={"model_id": "org/b"})
    with local_hub():
        g.push_to_hub("org/m", path_in_repo="gauges/a2b")
        assert Gauge.from_pretrained("org/m", subfolder="gauges/a2b") == g
    assert hc.HF_HUB_OFFLINE is True
