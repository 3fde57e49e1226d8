"""Streaming paired statistics: exact against brute force, padding-blind, scale-robust pooling, data validation,
and the same sums from 2 accelerate processes as from one."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_model
from hf_gauge import GaugeError
from hf_gauge.stats import PairStats, collect_pair_stats, iter_batches

REPO = Path(__file__).resolve().parents[1]


def _pair(seed_b: int = 1, layers: int = 3):
    return tiny_model("llama", seed=0, layers=layers), tiny_model("llama", seed=seed_b, layers=layers)


def _hidden(model, ids):
    with torch.no_grad():
        return [h.reshape(-1, h.shape[-1]).double() for h in model(ids, output_hidden_states=True).hidden_states]


def test_stats_equal_brute_force_over_hidden_states():
    """embed + blocks 0..L-2 + final norm are exactly HF's hidden_states: compare with numpy on stored activations."""
    A, B = _pair()
    ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(0))
    st = collect_pair_stats(A, B, ids, layers=range(2), progress=False)   # one batch, as below
    ha, hb = _hidden(A, ids), _hidden(B, ids)
    assert len(st.sites) == len(ha) == 4 and st.n_tokens == 30
    d = A.config.hidden_size
    per_site, covs = [], []
    for xa, xb in zip(ha, hb):
        c = np.corrcoef(xa.numpy().T, xb.numpy().T)[:d, d:]
        per_site.append(c)
        xa_c, xb_c = xa - xa.mean(0), xb - xb.mean(0)
        cov = (xa_c.T @ xb_c / xa.shape[0]).numpy()
        covs.append(cov / np.sqrt((xa_c.var(0, unbiased=False).sum() * xb_c.var(0, unbiased=False).sum()).item()))
    np.testing.assert_allclose(st.correlation().numpy(), np.mean(per_site, 0), atol=1e-9)
    np.testing.assert_allclose(st.cross_covariance().numpy(), np.mean(covs, 0), atol=1e-9)
    np.testing.assert_allclose(st.site_correlations()[2].numpy(), per_site[2], atol=1e-9)


def test_pooling_is_per_site_standardized():
    """Scaling one site by 1000 (and shifting it) must not change the pooled correlation; raw pooling would."""
    g = torch.Generator().manual_seed(1)
    xa = [torch.randn(200, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    xb = [x[:, torch.randperm(8, generator=g)] + 0.5 * torch.randn(200, 8, generator=g, dtype=torch.float64) for x in xa]
    ref, scaled = PairStats(["s0", "s1"], 8), PairStats(["s0", "s1"], 8)
    for s in range(2):
        ref.update(s, xa[s], xb[s])
        k = 1000.0 if s == 1 else 1.0
        scaled.update(s, k * xa[s] + 7.0 * s, k * xb[s] - 3.0 * s)
    torch.testing.assert_close(ref.correlation(), scaled.correlation(), atol=1e-10, rtol=0)
    # raw pooling over both sites (what we avoid) is dominated by the large site
    raw = np.corrcoef(torch.cat([xa[0], 1000 * xa[1] + 7]).numpy().T, torch.cat([xb[0], 1000 * xb[1] - 3]).numpy().T)[:8, 8:]
    assert np.abs(raw - ref.correlation().numpy()).max() > 0.05


def test_padding_excluded_right_and_left():
    """Ragged sequences, padded right or left in one batch, give the statistics of the unpadded sequences."""
    A, B = _pair()
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 128, (n,), generator=g) for n in (9, 4, 6)]
    alone = collect_pair_stats(A, B, [s[None] for s in seqs], progress=False)   # iterable of [1, T] tensors
    T = 9
    for side in ("right", "left"):
        ids = torch.full((3, T), 5, dtype=torch.long)      # pad id 5: a real token, so leaks would show
        mask = torch.zeros(3, T, dtype=torch.long)
        for r, s in enumerate(seqs):
            sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
            ids[r, sl], mask[r, sl] = s, 1
        padded = collect_pair_stats(A, B, [{"input_ids": ids, "attention_mask": mask}], progress=False)
        assert padded.n_tokens == alone.n_tokens == 19
        for k, v in alone._tensors().items():       # float32 forward rounding only (masked softmax sums)
            tol = 1e-6 * float(v.abs().max())
            torch.testing.assert_close(getattr(padded, k), v, atol=tol, rtol=0, msg=f"{side} padding: {k}")
        leaky = collect_pair_stats(A, B, ids, progress=False)    # the same batch with the mask ignored
        assert leaky.n_tokens == 27 and not torch.allclose(leaky.sum_a[0] / 27, alone.sum_a[0] / 19, atol=1e-3)


def test_strings_dataloader_and_tensor_agree():
    A, B = _pair()

    class CharTok:                                       # a tokenizer stand-in: one id per character
        def __call__(self, texts, **kw):
            return {"input_ids": [[ord(c) % 128 for c in t] for t in texts]}

    texts = ["hello gauge", "signed permutations", "abc"]
    st_s = collect_pair_stats(A, B, texts, tokenizer=CharTok(), batch_size=2, progress=False)
    ids_rows = [torch.tensor([[ord(c) % 128 for c in t]]) for t in texts]
    st_t = collect_pair_stats(A, B, ids_rows, progress=False)
    loader = torch.utils.data.DataLoader([{"input_ids": r[0]} for r in ids_rows[:2]], batch_size=1)
    st_l = collect_pair_stats(A, B, loader, progress=False)
    assert st_s.n_tokens == st_t.n_tokens == 11 + 19 + 3 and st_l.n_tokens == 30
    torch.testing.assert_close(st_s.cross, st_t.cross, atol=1e-6 * float(st_t.cross.abs().max()), rtol=0)


@pytest.mark.parametrize("bad, match", [
    (torch.randn(2, 5), "integer token ids"),
    ("just one string", "single string"),
    (["text without tokenizer"], "no tokenizer"),
    (torch.zeros(0, 5, dtype=torch.long), "empty"),
    ([], "empty"),
    ([{"ids": torch.ones(1, 3, dtype=torch.long)}], "no 'input_ids'"),
    (torch.full((1, 4), 500), "outside the vocabulary"),
    (12, "unsupported data"),
    (torch.zeros(2, 2, 2, dtype=torch.long), "shape"),
])
def test_bad_data_refused(bad, match):
    A, B = _pair()
    with pytest.raises(GaugeError, match=match):
        collect_pair_stats(A, B, bad, progress=False)


def test_all_padding_counts_nothing():
    A, B = _pair()
    st = collect_pair_stats(A, B, [{"input_ids": torch.ones(2, 3, dtype=torch.long),
                                    "attention_mask": torch.zeros(2, 3, dtype=torch.long)}], progress=False)
    assert st.n_tokens == 0
    with pytest.raises(GaugeError, match="no tokens"):
        st.correlation()


def test_iter_batches_rejects_bad_batch_size():
    with pytest.raises(GaugeError, match="batch_size"):
        iter_batches(torch.ones(2, 2, dtype=torch.long), batch_size=0)


_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from accelerate import PartialState
    state = PartialState(cpu=True)          # as Accelerator(cpu=True) would, before hf_gauge runs
    from conftest import tiny_model
    from hf_gauge.stats import collect_pair_stats
    A, B = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ids = torch.randint(0, 128, (6, 9), generator=torch.Generator().manual_seed(3))
    st = collect_pair_stats(A, B, ids, batch_size=2, progress=False)
    from hf_gauge.match import find_gauge
    g = find_gauge(A, B, data=ids, spaces="all", batch_size=2, progress=False)   # residual, MLP units and heads
    found = {{f"gauge.{{k}}.{{f}}": getattr(v, f) for k, v in g.spaces.items() for f in ("perm", "sign")}}
    found["gauge.mlp_tokens"] = torch.tensor(g.confidence["mlp.0"]["n_tokens"])
    if state.is_main_process:
        torch.save({{"world": state.num_processes, **st._tensors(), **found}}, sys.argv[1])
    state.wait_for_everyone()
    state.destroy_process_group()       # a clean gloo teardown (otherwise a rank may abort at exit)
    import os
    sys.stdout.flush()
    os._exit(0)     # skip interpreter teardown: gloo's threads can abort a rank there ("terminate called ...")
""")


def test_two_accelerate_processes_equal_one(tmp_path):
    """``accelerate launch`` with 2 CPU processes: each streams half the rows; the reduced sums equal one process's.

    ``accelerate launch --cpu --num_processes 2`` needs ``mpirun`` for more than one CPU process (without it the
    launcher silently runs one process), so we use accelerate's torchrun launcher (``--multi_gpu``) on CPU with
    ``PartialState(cpu=True)`` (gloo backend).
    """
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if launcher is None:
        pytest.skip("the accelerate CLI is not installed")
    script = tmp_path / "run_stats.py"
    script.write_text(_SCRIPT.format(tests=str(REPO / "tests")))
    out = tmp_path / "stats.pt"
    with socket.socket() as sock:                       # a free port: other test runs may share the machine
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
                           str(script), str(out)], env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist = torch.load(out)
    assert dist.pop("world") == 2
    A, B = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ids = torch.randint(0, 128, (6, 9), generator=torch.Generator().manual_seed(3))
    one = collect_pair_stats(A, B, ids, batch_size=2, progress=False)
    for k, v in one._tensors().items():
        torch.testing.assert_close(dist[k], v, atol=1e-5, rtol=1e-6, msg=k)
    assert int(dist["count"][0]) == 54
    # the MLP-unit and head statistics are reduced too: every process fits the one-process gauge on all 54 tokens
    from hf_gauge.match import find_gauge
    g = find_gauge(A, B, data=ids, spaces="all", batch_size=2, progress=False)
    assert int(dist.pop("gauge.mlp_tokens")) == 54
    assert {k for k in dist if k.startswith("gauge.")} == {f"gauge.{k}.{f}" for k in g.spaces for f in ("perm", "sign")}
    for k, v in g.spaces.items():
        assert torch.equal(dist[f"gauge.{k}.perm"], v.perm) and torch.equal(dist[f"gauge.{k}.sign"], v.sign), k
