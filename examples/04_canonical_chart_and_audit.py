"""State index-level claims in a canonical chart, and audit a claim under random gauges.

    python examples/04_canonical_chart_and_audit.py
"""
from __future__ import annotations

import copy

import torch

import hf_gauge
from hf_gauge.audit import topk_residual_claim
from hf_gauge.weights import load_smollm2

a, tok = load_smollm2()
b = copy.deepcopy(a).apply_gauge(hf_gauge.random_gauge(a, seed=4, spaces=("residual", "mlp", "attn")))

# two differently gauged copies land on the same weights in the canonical chart
ca, cb = copy.deepcopy(a), copy.deepcopy(b)
hf_gauge.canonicalize(ca)
hf_gauge.canonicalize(cb)
same = all(torch.equal(p, q) for p, q in zip(ca.state_dict().values(), cb.state_dict().values()))
print("canonical charts of A and gauged A are bit-identical:", same)
assert same

# "the top-20 residual coordinates at the middle layer" is a statement about a chart: audit it
ids = tok(["An index is only meaningful once the gauge is fixed. " * 4], return_tensors="pt").input_ids
report = hf_gauge.audit(a, topk_residual_claim(ids, k=20), n_gauges=4, data=ids)
print(report.table())
assert report.transported_agreement == 1.0 and report.raw_agreement < 0.5
