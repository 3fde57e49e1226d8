"""``hf-gauge demo``: the whole story on real SmolLM2-135M weights, on a CPU, in about a minute.

1. Hide a random B_d gauge in a copy of the model: the logits do not change, every weight does.
2. Find the gauge again, data-free from the weights and from activations (1024 tokens of real text: more than the
   residual width, so the sample correlation has full rank); the S_d (permutation-only) baseline lands at the
   positive-sign fraction.
3. Transport a steering vector; its effect is the same in the gauged model.
4. Save the gauge (safetensors + JSON) and load it back.
5. Apply the inverse: the weights come back bit for bit.
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from typing import Any, Callable

import torch


def _row(rows: list, step: str, result: str, t0: float) -> None:
    rows.append((step, result, f"{time.perf_counter() - t0:6.2f}s"))
    print(f"  {step:<44} {result}", flush=True)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    return fn(), t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hf-gauge demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0, help="seed of the hidden gauge")
    ap.add_argument("--tokens", type=int, default=1024,
                    help="tokens of real text used for activation matching (default 1024; fewer than the residual "
                         "width, 576, make find_gauge warn that the match can be chance)")
    args = ap.parse_args(argv)

    import hf_gauge
    from hf_gauge.weights import load_smollm2

    torch.manual_seed(0)
    rows: list[tuple[str, str, str]] = []
    failed: list[str] = []        # the demo's claims, checked: a failed one makes the exit code 1

    def check(ok: bool, what: str) -> None:
        if not ok:
            failed.append(what)
    print("hf_gauge demo: real SmolLM2-135M-Instruct weights (Llama, RMSNorm, d=576)", flush=True)
    (a, tok), t0 = _timed(load_smollm2)
    _row(rows, "load model A", f"{sum(p.numel() for p in a.parameters())/1e6:.1f}M params, group {hf_gauge.symmetry_group(a)}", t0)

    from pydoc_data.topics import topics
    text = " ".join(topics[k] for k in sorted(topics)[:60])
    ids = tok(text, return_tensors="pt").input_ids[0][: args.tokens]
    ids = ids[: (len(ids) // 64) * 64].reshape(-1, 64)
    probe = ids[:2, :48]

    t0 = time.perf_counter()
    b = copy.deepcopy(a)
    hidden = hf_gauge.random_gauge(b, seed=args.seed)
    b.apply_gauge(hidden)
    with torch.no_grad():
        la, lb = a(probe).logits, b(probe).logits
    changed = sum(not torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))
    # a gauge reorders the sums in each matmul: equal up to float32 rounding (1e-5 of the largest logit)
    check((la - lb).abs().max().item() <= 1e-5 * la.abs().max().item(), "the gauged copy's logits equal A's")
    n_params = sum(1 for _ in a.parameters())
    _row(rows, "hide a random B_d gauge in copy B",
         f"{changed}/{n_params} tensors changed, {int((hidden.residual.sign < 0).sum())} signs flipped; "
         f"max abs logit diff A vs B = {(la - lb).abs().max().item():.1e}", t0)

    def accuracy(g) -> str:
        idx = (g.residual.perm == hidden.residual.perm).double().mean().item()
        full = ((g.residual.perm == hidden.residual.perm) & (g.residual.sign == hidden.residual.sign)).double().mean().item()
        return f"indices {idx:6.1%}, indices+signs {full:6.1%}"

    g_free, t0 = _timed(lambda: a.gauge_to(b))
    _row(rows, "find the gauge from weights (data-free)", accuracy(g_free), t0)
    check(g_free.residual == hidden.residual, "data-free matching recovers the hidden gauge")
    g_act, t0 = _timed(lambda: a.gauge_to(b, data=ids, progress=False))
    _row(rows, "find it from activations (sign-marginalized)",
         accuracy(g_act) + f" ({g_act.metrics['n_tokens']} tokens)", t0)
    check(g_act.residual == hidden.residual, "activation matching recovers the hidden gauge")
    g_perm, t0 = _timed(lambda: a.gauge_to(b, data=ids, method="permutation", progress=False))
    _row(rows, "permutation-only baseline (S_d)",
         accuracy(g_perm) + f" (ceiling: {hidden.residual.positive_fraction:.1%} positive signs)", t0)

    t0 = time.perf_counter()
    layer = a.config.num_hidden_layers // 2
    v = torch.randn(a.config.hidden_size) * 4.0

    def steered(model, vec):
        h = model.model.layers[layer].register_forward_hook(lambda m, i, o: (o[0] + vec,) + tuple(o[1:]) if isinstance(o, tuple) else o + vec)
        try:
            with torch.no_grad():
                return model(probe).logits
        finally:
            h.remove()

    effect_a = steered(a, v) - la
    effect_b = steered(b, g_free.transport(v)) - lb
    effect_p = steered(b, hf_gauge.Gauge(residual=hf_gauge.SignedPermutation(g_free.residual.perm)).transport(v)) - lb
    cos = torch.nn.functional.cosine_similarity
    keep = cos(effect_a.flatten().double(), effect_b.flatten().double(), dim=0).item()
    keep_p = cos(effect_a.flatten().double(), effect_p.flatten().double(), dim=0).item()
    _row(rows, f"steering vector at layer {layer}, transported",
         f"effect cosine B_d {keep:.4f}, S_d {keep_p:.4f}", t0)
    check(keep > 0.9999, "the transported steering vector has the same effect")

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        g_free.save_pretrained(tmp)
        g_loaded = hf_gauge.Gauge.from_pretrained(tmp)
        files = sorted(os.listdir(tmp))
    _row(rows, "save the gauge, load it back", f"{', '.join(files)}; equal: {'yes' if g_loaded == g_free else 'NO'}", t0)
    check(g_loaded == g_free, "the saved gauge loads back equal")

    t0 = time.perf_counter()
    b.apply_gauge(g_loaded.inverse())
    exact = all(torch.equal(pa, pb) for pa, pb in zip(a.state_dict().values(), b.state_dict().values()))
    _row(rows, "apply the found gauge's inverse to B", "bit-exact restore of A: " + ("yes" if exact else "NO"), t0)
    check(exact, "applying the inverse restores A bit for bit")

    print("\n| step | result | time |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    for what in failed:
        print(f"FAILED: {what}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
