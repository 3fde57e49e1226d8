"""Shared fixtures: tiny random models of every supported family, and real SmolLM2-135M weights."""
from __future__ import annotations

import contextlib

import pytest
import torch

torch.set_num_threads(1)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def fresh_kernel_state():
    """Every test starts as a fresh process would: the engine has not loaded numba (``HF_GAUGE_KERNELS=auto``)."""
    yield
    from hf_gauge import engine
    engine._compiled.cache_clear()

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
ALL_FAMILIES = FAMILIES + ("gpt_neox",)
VOCAB = 128


def tiny_model(model_type: str = "llama", *, tie: bool = False, seed: int = 0, dtype=torch.float32,
               hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, intermediate: int = 96,
               biases: bool = True, **extra):
    """A tiny random transformers model with generic (non-constant) gains and random biases."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(hidden_size=hidden_size, intermediate_size=intermediate, num_hidden_layers=layers,
              num_attention_heads=heads, vocab_size=VOCAB, tie_word_embeddings=tie, **extra)
    if model_type != "gpt_neox":
        kw["num_key_value_heads"] = kv_heads
    if model_type == "llama" and biases:
        kw.update(attention_bias=True, mlp_bias=True)
    if model_type == "qwen3":
        kw.setdefault("head_dim", hidden_size // heads)
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, **kw)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:   # generic gains around 1, random biases: the B_d regime
                p.normal_(1.0 if n.endswith("weight") else 0.0, 0.3)
    return model.to(dtype)


def permutation_only(gauge):
    """The same gauge with every sign +1 (the S_d baseline: shows that signs matter)."""
    from hf_gauge import Gauge, SignedPermutation
    return Gauge(spaces={k: SignedPermutation(v.perm) for k, v in gauge.spaces.items()},
                 source=gauge.source, target=gauge.target, method=f"permutation-only({gauge.method})")


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{k} differs"


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="session")
def smollm2_dir():
    """Folder of real SmolLM2-135M-Instruct weights (built once from the offline GGUF, then cached)."""
    from hf_gauge.weights import smollm2_path
    return smollm2_path()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture
def smollm2(smollm2_dir):
    """A fresh fp32 copy of real SmolLM2-135M (tests may mutate it)."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_ids(smollm2_tokenizer):
    """Real English text (the standard library's pydoc topics) tokenized for SmolLM2."""
    from pydoc_data.topics import topics
    text = " ".join(topics[k] for k in sorted(topics)[:40])
    ids = smollm2_tokenizer(text, return_tensors="pt").input_ids[0]
    return ids[: 4 * 64].reshape(4, 64)


@pytest.fixture
def one_thread():
    """One torch thread for the test (tiny models: one thread beats two contended ones on a shared 2-core
    machine); the count is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
