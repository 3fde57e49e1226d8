"""``load_adapter``: a PEFT adapter trained on model A, loaded onto model B through the gauge A -> B.

``load_adapter(model_b, "org/adapter-for-a", gauge=g)`` reads the adapter (a local folder, or a Hub repository
``org/name[/subfolder]`` through ``snapshot_download``: its config and safetensors weights only, never pickle), moves
its tensors into B's chart (``transport_adapter_state``: index operations) and injects it into ``model_b`` like
``PeftModel.from_pretrained`` does, returning the ``PeftModel``. B + the moved adapter computes what A + the adapter
computes (up to float reassociation) when B is ``g(A)``; on a fine-tune of ``g(A)`` it is the adapter in B's chart.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from ..errors import GaugeError
from .peft_adapters import (ADAPTER_CFG, ADAPTER_WEIGHTS, check_peft_type, check_adapter_chart, is_adapter_folder,
                            read_record, transport_adapter_state)

__all__ = ["load_adapter", "adapter_folder"]


def adapter_folder(adapter: str | os.PathLike, subfolder: str | None = None, revision: str | None = None,
                   token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
                   endpoint: str | None = None, local_files_only: bool = False) -> Path:
    """The local folder of ``adapter``: itself when it is a folder, else ``org/name[/subfolder]`` downloaded from the
    Hub (``adapter_config.json`` and ``adapter_model.safetensors`` only)."""
    if Path(adapter).is_dir():
        return Path(adapter) / subfolder if subfolder else Path(adapter)
    spec = str(adapter)
    if Path(spec).is_absolute() or spec.startswith((".", "~")) or spec.count("/") < 1:
        raise GaugeError(f"no adapter folder at {spec} (and it is not a Hub id org/name)")
    from ..hub import download_snapshot, split_hub_path
    repo, sub = split_hub_path(spec, subfolder)
    patterns = [f"{sub}/{f}" if sub else f for f in (ADAPTER_CFG, ADAPTER_WEIGHTS)]
    root = download_snapshot(repo, spec, revision=revision, token=token, cache_dir=cache_dir, endpoint=endpoint,
                             local_files_only=local_files_only, allow_patterns=patterns)
    return root / sub if sub else root


def load_adapter(model: Any, adapter: str | os.PathLike, gauge: Any, *, adapter_name: str = "default",
                 is_trainable: bool = False, strict: bool = False, subfolder: str | None = None,
                 revision: str | None = None, token: str | bool | None = None,
                 cache_dir: str | os.PathLike | None = None, endpoint: str | None = None) -> Any:
    """Load the PEFT adapter ``adapter`` (trained on the gauge's source model A: a folder or a Hub id) onto ``model``
    (in the gauge's target chart) through ``gauge``; returns the ``PeftModel`` (``model`` gets the adapter layers
    injected, as with ``PeftModel.from_pretrained``; in eval mode unless ``is_trainable``).

    A model whose chart fingerprint differs from ``gauge.target['fingerprint']`` warns (``strict=True`` refuses); an
    adapter already transported through this gauge, or one in the wrong direction, is refused.
    """
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict

    from ..gauge import Gauge
    from ..models import fingerprint, unwrap
    from ._io import read_safetensors
    if not isinstance(gauge, Gauge):
        raise GaugeError(f"load_adapter needs gauge= a hf_gauge.Gauge (from A to this model), got "
                         f"{type(gauge).__name__}")
    if hasattr(model, "peft_config"):
        raise GaugeError("model must be a plain transformers model in the gauge's target chart, not a PeftModel")
    src = adapter_folder(adapter, subfolder, revision, token, cache_dir, endpoint)
    if not is_adapter_folder(src) or not (src / ADAPTER_WEIGHTS).is_file():
        raise GaugeError(f"{adapter} holds no PEFT adapter ({ADAPTER_CFG} and {ADAPTER_WEIGHTS}); adapter_model.bin "
                         "(a pickle) is not read: re-save the adapter with safe_serialization=True")
    try:
        cfg = PeftConfig.from_pretrained(str(src))
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise GaugeError(f"{src / ADAPTER_CFG} is not a valid PEFT config: {' '.join(str(e).split())[:200]}") from None
    check_peft_type(cfg, str(adapter))
    check_adapter_chart(gauge, src, cfg.base_model_name_or_path, read_record(src))
    want = gauge.target.get("fingerprint")
    if want and fingerprint(model) != want:
        msg = (f"the model's chart fingerprint {fingerprint(model)} differs from the gauge's target {want}: is it the "
               "gauge's target model (or apply_gauge(A, gauge))?")
        if strict:
            raise GaugeError(msg)
        warnings.warn(msg, stacklevel=2)
    sd, _ = read_safetensors(src / ADAPTER_WEIGHTS, "re-save the adapter with save_pretrained")
    moved = transport_adapter_state(gauge, sd, config=unwrap(model).config)
    cfg.inference_mode = not is_trainable
    pm = get_peft_model(model, cfg, adapter_name=adapter_name)
    res = set_peft_model_state_dict(pm, moved, adapter_name=adapter_name)
    if getattr(res, "unexpected_keys", None):
        raise GaugeError(f"{adapter}: adapter keys not loaded into the model: {res.unexpected_keys[:5]}")
    return pm.train() if is_trainable else pm.eval()
