"""Claim `lora`: a LoRA adapter moved to a gauged base keeps its gain under B_d, loses it under S_d.

Task: tiny sentiment classification as next-token prediction on real SmolLM2-135M-Instruct:
``"Review: The {noun} was {adjective}.\\nLabel:"`` -> ``" blue"`` (positive) / ``" red"`` (negative): arbitrary label
words (adjectives and nouns written for this benchmark; train and test use disjoint adjectives). The base model's
own accuracy is measured and reported next to the majority-class rate: it is not assumed to be at chance. A PEFT LoRA (r=4 on q/v/o/up/down: readers
and writers of the residual) is trained with AdamW, then moved to the base in a hidden random B_d gauge with
``hf_gauge.transport_peft_model(gauge, peft_model, gauged_base)`` using the gauge found by ``find_gauge`` (B_d) and
two S_d baselines: matched (``find_gauge(method="permutation")``) and oracle (the B_d permutation, all signs +1). Gain = mean label cross-entropy of the base minus that of base+LoRA on
the test set; retained = gain on the gauged base / gain on the original. Accuracy (label with the higher logit) too.
Gain and accuracy are measured over the two label tokens (softmax over their two logits: chance CE = ln 2), with the
full-vocabulary cross-entropy kept beside it (``*_full_vocab``: it mostly measures learning to emit a label word at
all). Three seeds (hidden gauge, LoRA init, batches) in the full mode, one in the quick mode.
Paper: no number (the 99.7% / -0.5% SST-2 figures once quoted here are in none of the paper's texts we hold).
Usage: python benchmarks/claim_lora.py [--quick]
"""
from __future__ import annotations

import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import claims_common as cc  # noqa: E402
import hf_gauge  # noqa: E402
import verdicts as V  # noqa: E402

PAPER = {"text": "LoRA: B_d transport keeps the adapter's effect, S_d does not (no number in the paper's texts)",
         "source": "The claim is the paper's general transport claim applied to adapters. The '99.7% (B_d) vs -0.5% (S_d) "
                   "on SST-2' that earlier rows quoted comes from a third-party summary: none of the paper texts we hold "
                   "(/work/shared/seeds/, five files: abstract, two summaries, a review, a related abstract) mentions "
                   "LoRA, SST-2 or 99.7% (checked with grep), so those numbers are dropped."}
NOUNS = ["movie", "film", "book", "meal", "hotel", "concert", "album", "game", "phone", "service", "lecture", "trip",
         "show", "play", "cafe", "novel", "laptop", "museum", "restaurant", "class"]
POS_TRAIN = ["great", "wonderful", "excellent", "delightful", "superb", "lovely", "fantastic", "charming"]
NEG_TRAIN = ["terrible", "awful", "dreadful", "boring", "horrible", "disappointing", "dull", "miserable"]
POS_TEST = ["brilliant", "marvelous", "enjoyable", "pleasant"]
NEG_TEST = ["dismal", "bland", "tedious", "unpleasant"]
LABELS = (" blue", " red")   # arbitrary label words: the base model cannot already solve the task


def examples(adjs_pos: list[str], adjs_neg: list[str]) -> list[tuple[str, int]]:
    out = [(f"Review: The {n} was {a}.\nLabel:", 0) for n in NOUNS for a in adjs_pos]
    out += [(f"Review: The {n} was {a}.\nLabel:", 1) for n in NOUNS for a in adjs_neg]
    random.Random(0).shuffle(out)
    return out


def encode(tok: Any, exs: list[tuple[str, int]], label_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    """Left-padded prompts, attention masks and label token ids."""
    seqs = [tok(p, add_special_tokens=False)["input_ids"] for p, _ in exs]
    T = max(len(s) for s in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (T - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask, torch.tensor([label_ids[y] for _, y in exs])


def label_logits(model: Any, ids: torch.Tensor, mask: torch.Tensor, label_ids: list[int]) -> torch.Tensor:
    pos = mask.cumsum(-1) - 1
    pos = pos.clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
    return out


@torch.no_grad()
def evaluate(model: Any, data: tuple[torch.Tensor, torch.Tensor, torch.Tensor], label_ids: list[int],
             bs: int = 32) -> dict[str, float]:
    ids, mask, y = data
    ce, ce2, acc = 0.0, 0.0, 0.0
    for i in range(0, ids.shape[0], bs):
        lg = label_logits(model, ids[i:i + bs], mask[i:i + bs], label_ids).double()
        y2 = torch.tensor([label_ids.index(int(t)) for t in y[i:i + bs]])
        ce += float(torch.nn.functional.cross_entropy(lg, y[i:i + bs], reduction="sum"))
        two = lg[:, label_ids]
        ce2 += float(torch.nn.functional.cross_entropy(two, y2, reduction="sum"))
        acc += float((two.argmax(-1) == y2).sum())
    n = ids.shape[0]
    return {"ce": ce2 / n, "ce_full_vocab": ce / n, "accuracy": acc / n}


HEADLINE = ["retained_bd", "retained_sd_matched", "retained_sd", "acc_lora", "acc_bd", "acc_sd_matched", "acc_sd",
            "retained_finetuned_bd", "retained_finetuned_identity"]


def finetuned_target(base: torch.nn.Module, tok: Any, test: Any, label_ids: list[int], q: bool) -> dict[str, Any]:
    """The real target (``claim_trajectory``'s pydoc endpoint) in the base's chart and re-gauged, the gauges found
    from the base to the re-gauged export, and the label CE / accuracy of both copies without an adapter."""
    import claim_trajectory as ct
    ft = ct.finetuned_endpoint("pydoc", q)
    match_kw: dict[str, Any] = {"layers": [0, 15, 29]} if q else {}
    match = cc.matching_data(tok, 4 if q else 8, 32 if q else 64)
    ft["g_bd"] = hf_gauge.find_gauge(base, ft["regauged"], data=match, **match_kw)
    ft["g_sd_matched"] = hf_gauge.find_gauge(base, ft["regauged"], data=match, method="permutation", **match_kw)
    ft["identity_eval"] = evaluate(ft["identity"], test, label_ids)
    ft["regauged_eval"] = evaluate(ft["regauged"], test, label_ids)
    ft["gauge_signed_accuracy"] = cc.recovery(ft["g_bd"].residual, ft["gauge"].residual)["signed_accuracy"]
    return ft


def one_seed(seed: int, base: torch.nn.Module, tok: Any, train: Any, test: Any, label_ids: list[int],
             q: bool, finetuned: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """(measured, setup) for one seed: the hidden gauge (61 + seed), the LoRA init and the batches."""
    from peft import LoraConfig, get_peft_model
    g_true = hf_gauge.random_gauge(base, seed=61 + seed)
    gauged_bd = cc.gauged_copy(base, g_true)
    gauged_sd = cc.gauged_copy(base, g_true)
    match_kw: dict[str, Any] = {"layers": [0, 15, 29]} if q else {}
    match = cc.matching_data(tok, 4 if q else 8, 32 if q else 64)
    g = hf_gauge.find_gauge(base, gauged_bd, data=match, **match_kw)
    g_sd = hf_gauge.Gauge(residual=cc.permutation_only(g.residual))
    g_sdm = hf_gauge.find_gauge(base, gauged_bd, data=match, method="permutation", **match_kw)
    gauged_sdm = cc.gauged_copy(base, g_true)
    base_eval = evaluate(base, test, label_ids)
    gauged_base_eval = evaluate(gauged_bd, test, label_ids)

    steps, bs, lr = (20, 8, 3e-3) if q else (150, 16, 1e-3)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                     target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    pm = get_peft_model(cc.clone_model(base), cfg)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    pm.train()
    t0 = time.perf_counter()
    losses = []
    for s in range(steps):
        idx = torch.randint(0, train[0].shape[0], (bs,), generator=gen)
        lg = label_logits(pm, train[0][idx], train[1][idx], label_ids)
        loss = torch.nn.functional.cross_entropy(lg, train[2][idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    t_train = time.perf_counter() - t0
    pm.eval()
    lora_eval = evaluate(pm, test, label_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evals = {"bd": evaluate(hf_gauge.transport_peft_model(g, pm, gauged_bd).eval(), test, label_ids),
                 "sd": evaluate(hf_gauge.transport_peft_model(g_sd, pm, gauged_sd).eval(), test, label_ids),
                 "sd_matched": evaluate(hf_gauge.transport_peft_model(g_sdm, pm, gauged_sdm).eval(), test,
                                        label_ids)}
    ft = finetuned
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lab, target, gg in (("finetuned_identity", ft["identity"], None),
                                ("finetuned_bd", ft["regauged"], ft["g_bd"]),
                                ("finetuned_sd_matched", ft["regauged"], ft["g_sd_matched"])):
            moved = (hf_gauge.transport_peft_model(gg, pm, cc.clone_model(target)) if gg is not None else
                     hf_gauge.transport_peft_model(hf_gauge.Gauge(residual=hf_gauge.SignedPermutation.identity(
                         ft["g_bd"].residual.size)), pm, cc.clone_model(target)))
            evals[lab] = evaluate(moved.eval(), test, label_ids)
    ft_base = {"finetuned_identity": ft["identity_eval"], "finetuned_bd": ft["regauged_eval"],
               "finetuned_sd_matched": ft["regauged_eval"]}
    measured = {"acc_majority_class": float(max((test[2] == label_ids[0]).double().mean(),
                                                (test[2] == label_ids[1]).double().mean())),
                "ce_base": base_eval["ce"], "ce_lora": lora_eval["ce"], "acc_base": base_eval["accuracy"],
                "acc_lora": lora_eval["accuracy"], "ce_base_full_vocab": base_eval["ce_full_vocab"],
                "ce_lora_full_vocab": lora_eval["ce_full_vocab"]}
    for lab, ev in evals.items():
        target_eval = ft_base.get(lab, gauged_base_eval)
        for suffix in ("", "_full_vocab"):
            gain = base_eval["ce" + suffix] - lora_eval["ce" + suffix]
            measured[f"retained_{lab}{suffix}"] = (target_eval["ce" + suffix] - ev["ce" + suffix]) / gain
            measured[f"ce_{lab}{suffix}"] = ev["ce" + suffix]
        measured[f"acc_{lab}"] = ev["accuracy"]
        measured[f"acc_gain_retained_{lab}"] = ((ev["accuracy"] - target_eval["accuracy"])
                                                / max(1e-9, lora_eval["accuracy"] - base_eval["accuracy"]))
    setup = {"steps": steps, "batch": bs, "lr": lr,
             "train_loss_first_last": [losses[0], sum(losses[-10:]) / len(losses[-10:])], "train_s": t_train}
    return measured, setup


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, t_start = cc.start(__doc__, argv)
    q = args.quick
    seeds = [0] if q else [0, 1, 2]
    base, tok = cc.load_base()
    label_ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in LABELS]
    train = encode(tok, examples(POS_TRAIN, NEG_TRAIN), label_ids)
    test = encode(tok, examples(POS_TEST, NEG_TEST), label_ids)
    if q:
        test = tuple(t[:48] for t in test)  # type: ignore[assignment]
    ft = finetuned_target(base, tok, test, label_ids, q)
    runs = [one_seed(s, base, tok, train, test, label_ids, q, ft) for s in seeds]
    measured, spread = cc.over_seeds([r[0] for r in runs], HEADLINE)
    measured["finetuned_gauge_signed_accuracy"] = ft["gauge_signed_accuracy"]
    measured["finetuned_acc_without_adapter"] = ft["identity_eval"]["accuracy"]
    su = runs[0][1]
    pairs = (("bd", "B_d"), ("sd_matched", "S_d matched"), ("sd", "S_d oracle"),
             ("finetuned_identity", "fine-tuned, identity chart"), ("finetuned_bd", "fine-tuned, B_d (re-gauged)"),
             ("finetuned_sd_matched", "fine-tuned, S_d matched"))
    one = lambda k, lab: cc.bar(spread, measured, k, lab) if k in spread else (lab, measured[k], measured[k],  # noqa
                                                                                measured[k])
    fig = cc.bar_figure("lora", q, [
        {"ylabel": "fraction of the label-CE gain retained (two label tokens)",
         "bars": [one(f"retained_{k}", lab) for k, lab in pairs], "hlines": [(V.RETAINED, "kept above"),
                                                                              (V.LOST, "lost below")]},
        {"ylabel": "accuracy (two label tokens)",
         "bars": [one("acc_base", "base"), one("acc_lora", "LoRA")] + [one(f"acc_{k}", lab) for k, lab in pairs],
         "hlines": [(measured["acc_majority_class"], "majority class")]}],
        title=f"LoRA on SmolLM2-135M, synthetic sentiment task ({len(seeds)} seed(s)); the paper's texts give no number")
    res = {"claim": "lora", "paper": PAPER, "measured": measured, "spread": spread, "figure": cc.figure_ref(fig),
           "ours_bd": f"{measured['retained_bd']:.1%} of the label CE gain (acc {measured['acc_bd']:.2f}); fine-tuned "
                      f"checkpoint: B_d {measured['retained_finetuned_bd']:.1%} vs identity chart "
                      f"{measured['retained_finetuned_identity']:.1%}",
           "ours_baseline": f"S_d matched: {measured['retained_sd_matched']:.1%} (acc "
                            f"{measured['acc_sd_matched']:.2f}); S_d oracle: {measured['retained_sd']:.1%} (acc "
                            f"{measured['acc_sd']:.2f}); base acc {measured['acc_base']:.2f}, LoRA "
                            f"{measured['acc_lora']:.2f}",
           "seeds": {"hidden_gauge": [61 + s for s in seeds], "lora_init_and_batches": seeds},
           "setup": {"lora": "r=4, alpha=8, q/v/o/up/down", "steps": su["steps"], "batch": su["batch"],
                     "lr": su["lr"], "n_train": int(train[0].shape[0]), "n_test": int(test[0].shape[0]),
                     "ce": "over the two label tokens (chance ln 2 = 0.693); *_full_vocab: over the vocabulary",
                     "by_seed": {str(s): r[1] for s, r in zip(seeds, runs)}, "finetuned_target": ft["desc"],
                     "train_s": sum(r[1]["train_s"] for r in runs)}}
    return cc.finish(res, q, t_start)


if __name__ == "__main__":
    main()
