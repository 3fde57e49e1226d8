"""Transport a steering vector and an SAE into another checkpoint's chart, and check they still work.

    python examples/02_transport_steering_sae.py
"""
from __future__ import annotations

import copy

import torch

import hf_gauge
from hf_gauge.weights import load_smollm2

a, tok = load_smollm2()
b = copy.deepcopy(a).apply_gauge(hf_gauge.random_gauge(a, seed=2))
ids = tok(["Coordinates are a choice of chart, not a property of the model."], return_tensors="pt").input_ids
g = a.gauge_to(b, data=ids)                         # from activations this time
layer, d = a.config.num_hidden_layers // 2, a.config.hidden_size


def run(model, vec=None):
    """Logits and the residual at ``layer``'s output, optionally steered by ``vec``."""
    seen = {}

    def hook(_m, _i, o):
        h = o[0] if isinstance(o, tuple) else o
        if vec is not None:
            h = h + vec
        seen["h"] = h
        return (h,) + tuple(o[1:]) if isinstance(o, tuple) else h
    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(ids).logits, seen["h"]
    finally:
        handle.remove()


# 1. a steering vector: adding the transported vector to B does what adding the original to A does
v = torch.randn(d) * 4
la, _ = run(a, v)
lb, _ = run(b, g.transport(v))
print(f"steering: max |logits A+v - logits B+g(v)| = {(la - lb).abs().max():.2e}")
assert (la - lb).abs().max() < 1e-3 * la.abs().max()   # equal up to float rounding

# 2. an SAE (here a random ReLU SAE as a plain dict; SAELens SAE objects and folders work the same way)
m = 4 * d
sae = {"W_enc": torch.randn(d, m) / d**0.5, "b_enc": torch.zeros(m), "W_dec": torch.randn(m, d) / m**0.5,
       "b_dec": torch.randn(d) * 0.1}
sae_b = g.transport(sae)                            # a new dict; `sae` is unchanged
_, ha = run(a)
_, hb = run(b)
codes_a = torch.relu((ha - sae["b_dec"]) @ sae["W_enc"] + sae["b_enc"])
codes_b = torch.relu((hb - sae_b["b_dec"]) @ sae_b["W_enc"] + sae_b["b_enc"])
rel = (codes_a - codes_b).abs().max() / codes_a.abs().max()
print(f"SAE: max |codes on A - transported codes on B| / max |code| = {rel:.2e}")
assert rel < 1e-4

# 3. index sets and attributions: indices map through the permutation, scores take the sign
top = hf_gauge.IndexSet(ha.abs().mean((0, 1)).topk(5).indices)
print("top-5 residual coordinates in A's chart:", top.indices.tolist(), "-> in B's chart:",
      g.transport(top).indices.tolist())
