"""Move a sharded checkpoint on disk and a PEFT LoRA adapter folder through a gauge, without loading the model.

    python examples/03_checkpoint_and_adapter_on_disk.py [--workdir DIR]

The CLI does the same: `hf-gauge apply SRC --gauge G -o OUT` and `hf-gauge transport ADAPTER --gauge G -o OUT`.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import hf_gauge
from hf_gauge.weights import load_smollm2

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--workdir", default=None, help="keep the files here (default: a temporary folder, removed at the end)")
args = ap.parse_args()
# about 1.1 GB of checkpoints, adapters and gauge: in a temporary folder removed at the end, unless --workdir is given
with tempfile.TemporaryDirectory(prefix="hf-gauge-example-") as tmp:
    work = Path(args.workdir or tmp)

    base, tok = load_smollm2()
    base.save_pretrained(work / "base", max_shard_size="100MB")          # several shards
    g = hf_gauge.random_gauge(base, seed=3, spaces=("residual", "mlp"))  # residual + every MLP layer
    g.save_pretrained(work / "gauge")

    # 1. the checkpoint: streamed tensor by tensor, shard layout and index kept, config/tokenizer files copied
    hf_gauge.apply_gauge_to_checkpoint(work / "base", work / "gauge", work / "base-gauged", progress=False)

    # 2. a LoRA adapter trained (here: randomly initialised) on the base, saved as a PEFT folder
    cfg = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                     init_lora_weights=False)
    get_peft_model(base, cfg).save_pretrained(work / "adapter")     # (injects LoRA layers into `base` in place)
    # the output names the gauged checkpoint as its base (adapter_config.json and README), so AutoPeftModel loads it right
    hf_gauge.transport_path(g, work / "adapter", work / "adapter-gauged", base=str(work / "base-gauged"))

    # the moved adapter on the moved checkpoint computes what the original adapter on the original base computes
    ids = tok(["Gauge-covariant adapters"], return_tensors="pt").input_ids
    fresh = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)   # noqa: E731
    with torch.no_grad():
        la = PeftModel.from_pretrained(fresh(work / "base"), work / "adapter").eval()(ids).logits
        lb = AutoPeftModelForCausalLM.from_pretrained(work / "adapter-gauged", dtype=torch.float32).eval()(ids).logits
    print(f"files under {work}: {sorted(p.name for p in work.iterdir())}")
    print(f"max |logits(base+adapter) - logits(gauged base + transported adapter)| = {(la - lb).abs().max():.2e}")
    assert (la - lb).abs().max() < 1e-3 * la.abs().max()
