"""``hf-gauge``: find, apply, transport, verify, push and show gauges from the command line.

Models, checkpoints and gauges are given as local folders or Hub ids (a gauge on the Hub as
``namespace/repo/gauges/<name>``). Refused input exits with status 2 and one line ``error: ...``.
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import GaugeError

__all__ = ["main", "build_parser"]


# ----------------------------------------------------------------------------------------------------------------
# argument helpers
# ----------------------------------------------------------------------------------------------------------------
def _load_gauge(spec: str, revision: str | None = None):
    """A gauge folder, or ``namespace/repo[/sub/folder]`` on the Hub."""
    from .hub import load_gauge

    if Path(spec).exists() or Path(spec).is_absolute() or spec.startswith("."):
        return load_gauge(spec)
    if len(spec.strip("/").split("/")) < 2:
        raise GaugeError(f"no gauge folder {spec!r}; on the Hub give namespace/repo/gauges/<name>")
    return load_gauge(spec.strip("/"), revision=revision)


def _check_model_arg(spec: str) -> None:
    """Refuse a path that does not exist before any model is loaded (Hub ids pass through)."""
    if not Path(spec).exists() and (Path(spec).is_absolute() or spec.startswith(".") or spec.count("/") > 1):
        raise GaugeError(f"no model folder at {spec}")


def _load_model(spec: str, revision: str | None = None, dtype: str = "float32", device_map: str | None = None,
                offload_folder: str | None = None):
    """``AutoModelForCausalLM.from_pretrained`` in ``dtype`` (``"auto"``: the checkpoint's), optionally spread by
    accelerate over ``device_map`` (``"auto"``: GPUs, then CPU, then ``offload_folder`` on disk)."""
    import torch
    from transformers import AutoModelForCausalLM

    _check_model_arg(spec)
    kw: dict[str, Any] = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    if device_map:
        kw["device_map"] = device_map
        if offload_folder:
            kw["offload_folder"] = offload_folder
    elif offload_folder:
        raise GaugeError("--offload-folder needs --device-map (e.g. --device-map auto)")
    try:
        return AutoModelForCausalLM.from_pretrained(spec, revision=revision, trust_remote_code=False, **kw).eval()
    except (OSError, ValueError) as e:
        raise GaugeError(f"cannot load model {spec!r}: {str(e).splitlines()[0]}") from None


def _load_config(spec: str):
    """A model config from a local ``config.json`` file or a model folder holding one (never the Hub)."""
    from transformers import AutoConfig

    from .jsonio import read_json

    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise GaugeError(f"no config.json at {spec}: give the base model's folder or its config.json")
    try:
        read_json(path, str(path), "give the base model's folder or its config.json")
        return AutoConfig.from_pretrained(path.parent if path.name == "config.json" else path, local_files_only=True,
                                          trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise GaugeError(f"cannot read the model config {path}: {str(e).splitlines()[0]}") from None


def _load_pair(args: argparse.Namespace, revision_a: str | None = None, revision_b: str | None = None):
    kw = {"dtype": args.dtype, "device_map": args.device_map, "offload_folder": args.offload_folder}
    return _load_model(args.model_a, revision_a, **kw), _load_model(args.model_b, revision_b, **kw)


def _add_loading(s: argparse.ArgumentParser) -> None:
    """Options for loading both models (activation statistics stay float64 whatever the weights' dtype)."""
    s.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "auto"),
                   help="weights dtype when models are loaded (default float32; auto: as stored)")
    s.add_argument("--device-map", metavar="MAP",
                   help="accelerate device map for loading (e.g. auto: GPUs, then CPU, then --offload-folder)")
    s.add_argument("--offload-folder", metavar="DIR", help="where accelerate offloads weights that do not fit")


def _load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise GaugeError(f"cannot load a tokenizer from {spec!r} (needed for text data): {str(e).splitlines()[0]}") \
            from None


def _read_data(args: argparse.Namespace) -> Any:
    """``--text`` strings, a ``.txt`` file (text), or a ``.safetensors``/``.json`` file of token ids."""
    if args.text and args.data:
        raise GaugeError("give --data or --text, not both")
    if args.text:
        return list(args.text)
    if not args.data:
        return None
    p = Path(args.data)
    if not p.is_file():
        raise GaugeError(f"--data {p}: no such file")
    import torch

    if p.suffix == ".safetensors":
        from .transport._io import read_safetensors
        t, _ = read_safetensors(p, "give --data as a .safetensors file holding a tensor named 'input_ids', a .json "
                                   "list of token-id lists, or a .txt file")
        if "input_ids" not in t:
            raise GaugeError(f"--data {p} must hold a tensor named 'input_ids' (got {sorted(t)[:5]})")
        return t["input_ids"].long()
    if p.suffix == ".json":
        try:
            return torch.tensor(json.loads(p.read_text()), dtype=torch.long)
        except (json.JSONDecodeError, TypeError, ValueError, RuntimeError):
            raise GaugeError(f"--data {p} must be a JSON list of token-id lists of equal length") from None
    return [p.read_text(encoding="utf-8", errors="replace")]


def text_windows(texts: list[str], tokenizer: Any, max_length: int) -> Any:
    """Token ids ``[n, max_length]``: the texts tokenized end to end and cut into windows of ``max_length`` tokens
    (a text shorter than one window gives one shorter row), so no row runs past the model's context."""
    import torch

    if max_length < 2:
        raise GaugeError(f"--max-length must be at least 2, got {max_length}")
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"])
    if not ids:
        raise GaugeError("the text data holds no tokens")
    n = len(ids) // max_length
    if n == 0:
        return torch.tensor([ids], dtype=torch.long)
    return torch.tensor(ids[: n * max_length], dtype=torch.long).view(n, max_length)


def _context(model: Any) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def _add_data(s: argparse.ArgumentParser, description: str) -> None:
    """The data options of every command that runs the models on data (``find``, ``verify``): one builder, so they
    window and cap text the same way."""
    g = s.add_argument_group("data", description)
    g.add_argument("--data", metavar="FILE", help=".txt text, or token ids in .safetensors (input_ids) / .json")
    g.add_argument("--text", nargs="+", metavar="TEXT", help="text to run through both models")
    g.add_argument("--tokenizer", help="tokenizer for text data (default: A's)")
    g.add_argument("--max-length", type=int, metavar="T", help="tokens per row: text is cut into windows of T "
                   "tokens (default: min(512, the model's context)); refused past the context")
    g.add_argument("--max-tokens", type=int, metavar="N", help="read at most N tokens of the data (whole rows of "
                   "--max-length tokens; one shorter row when N is below a row)")


def cap_tokens(ids: Any, max_tokens: int | None) -> Any:
    """At most ``max_tokens`` tokens of ``ids`` ``[n, T]``: the first ``max_tokens // T`` rows, or the first
    ``max_tokens`` tokens of row 0 when that is no whole row; ``ids`` itself when it is already small enough."""
    if max_tokens is None:
        return ids
    if max_tokens < 2:
        raise GaugeError(f"--max-tokens must be at least 2, got {max_tokens}")
    if ids.dim() == 1:
        return ids[:max_tokens]
    rows = max_tokens // ids.shape[-1]
    return ids[:rows] if rows else ids[:1, :max_tokens]


def _token_data(args: argparse.Namespace, model: Any, data: Any) -> Any:
    """``--data``/``--text`` (from ``_read_data``) as token ids ``[n, T]`` for ``model``: text cut into
    ``--max-length`` windows with the tokenizer, ids checked against the context, at most ``--max-tokens``."""
    ctx = _context(model)
    if args.max_length is not None and ctx and args.max_length > ctx:
        raise GaugeError(f"--max-length {args.max_length} is past the model's context ({ctx} positions)")
    if isinstance(data, list):
        max_length = args.max_length or min(ctx or 512, 512)
        data = text_windows(data, _load_tokenizer(args.tokenizer or args.model_a), max_length)
    elif ctx and data.shape[-1] > ctx:
        raise GaugeError(f"--data rows have {data.shape[-1]} tokens, past the model's context ({ctx} positions)")
    return cap_tokens(data, args.max_tokens)


def _no_data_options(args: argparse.Namespace, what: str) -> None:
    """Refuse data options given without data (they would silently do nothing)."""
    given = [f for f, v in (("--max-tokens", args.max_tokens), ("--max-length", args.max_length),
                            ("--tokenizer", args.tokenizer)) if v is not None]
    if given:
        raise GaugeError(f"{'/'.join(given)} only apply to --data/--text; {what} reads no tokens")


def is_main_process() -> bool:
    """True on the process that writes and prints: rank 0 under ``torchrun`` / ``accelerate launch``, else always."""
    import os

    return os.environ.get("RANK", "0") == "0"


def fit_summary(gauge: Any) -> str:
    """The fit in a few lines: the residual's matched correlation, margins and low-confidence count, then one line
    per further space family (``mlp``, ``attn``, ...): its spaces, smallest margin and low-confidence count (units
    whose margin is below the threshold; for a space that records no count, the space itself when its smallest
    margin is)."""
    m = gauge.metrics
    if "mean_matched" not in m:
        return f"fit: {gauge.method}"
    thr = m.get("low_confidence_threshold", 0.05)
    lines = [f"fit: {gauge.method}, d={gauge.width}, tokens={m.get('n_tokens', 0)}: matched |C| mean "
             f"{m['mean_matched']:.3f} (min {m['min_matched']:.3f}), margin min {m['min_margin']:.3g} mean "
             f"{m['mean_margin']:.3g}, low-confidence {m['n_low_confidence']} (margin < {thr})"]
    families: dict[str, list[dict[str, Any]]] = {}
    for name in gauge.spaces:
        conf = gauge.confidence.get(name)
        if name != "residual":
            families.setdefault(name.split(".")[0], []).append(conf if isinstance(conf, dict) else {})
    for fam, confs in families.items():
        margins = [float(c["min_margin"]) for c in confs if isinstance(c.get("min_margin"), (int, float))]
        low = 0
        for c in confs:
            n, mm = c.get("n_low_confidence"), c.get("min_margin")
            low += int(n) if isinstance(n, int) else int(isinstance(mm, (int, float)) and mm < thr)
        margin = f"{min(margins):.3g}" if margins else "unknown"
        lines.append(f"  {fam}: {len(confs)} spaces, margin min {margin}, low-confidence {low}")
    return "\n".join(lines)


def _add_spaces(s: argparse.ArgumentParser, default: str) -> None:
    """``--spaces``: 'all', 'residual' or space families declared by the specs (checked against the model's spec once
    it is known, since families are data; the registry is read without importing torch)."""
    from .specs import space_families

    s.add_argument("--spaces", nargs="+", default=[default], metavar="FAMILY",
                   help=f"gauge spaces to fit (default: {default}): 'all', or space families of the model's spec "
                        f"({', '.join(space_families())} across the supported architectures); 'residual' is always "
                        "included")


def _spaces_arg(args: argparse.Namespace) -> str | tuple[str, ...]:
    """``--spaces`` as ``find_gauge``'s ``spaces=``: ``"all"`` or the families with ``"residual"`` first."""
    return "all" if "all" in args.spaces else tuple(dict.fromkeys(["residual"] + list(args.spaces)))


# ----------------------------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------------------------
def cmd_find(args: argparse.Namespace) -> int:
    from .match import find_gauge

    data = _read_data(args)
    _check_model_arg(args.model_a), _check_model_arg(args.model_b)
    spaces = _spaces_arg(args)
    if data is None and args.method != "procrustes":   # data-free: straight from the checkpoint files, no model built
        if args.device_map or args.offload_folder:
            raise GaugeError("--device-map/--offload-folder only apply when models are loaded (--data/--text); "
                             "data-free find reads the checkpoint files block by block")
        _no_data_options(args, "data-free find")
        from .filefind import find_gauge_from_files
        gauge = find_gauge_from_files(args.model_a, args.model_b, method=args.method, spaces=spaces,
                                      revision_a=args.revision_a, revision_b=args.revision_b)
    else:
        a, b = _load_pair(args, args.revision_a, args.revision_b)
        kwargs: dict[str, Any] = {"data": data, "method": args.method, "spaces": spaces}
        if data is not None:
            kwargs.update(data=_token_data(args, a, data), batch_size=args.batch_size,
                          progress=not args.no_progress and is_main_process())
            if args.layers:
                kwargs["layers"] = args.layers
        else:
            _no_data_options(args, "find without data")
        gauge = find_gauge(a, b, **kwargs)
    if not is_main_process():
        return 0
    if args.method == "procrustes":
        from .omapio import save_orthogonal_map
        out = save_orthogonal_map(gauge, args.output)
        d = gauge.diagnostics()
        print(f"fit: procrustes, d={d['d']}: ||R - I|| {d['dist_identity']:.3g} (random rotation "
              f"{d['dist_identity_random']:.3g}), distance to the nearest signed permutation "
              f"{d['dist_signed_permutation']:.3g}")
        print(f"saved orthogonal map to {out} (it transports vectors and SAEs; it is not a gauge)")
        return 0
    from .gauge import Gauge
    if not isinstance(gauge, Gauge):
        raise GaugeError(f"method {args.method!r} returned a {type(gauge).__name__}, not a gauge; hf-gauge find "
                         "writes signed-permutation gauges (methods signed, permutation)")
    print(fit_summary(gauge))
    out = gauge.save_pretrained(args.output)
    print(f"saved gauge ({gauge.method}) to {out}")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from .checkpoint import apply_gauge_to_checkpoint

    gauge = _load_gauge(args.gauge, args.gauge_revision)
    try:
        out = apply_gauge_to_checkpoint(args.src, gauge, args.output, progress=not args.no_progress,
                                        strict=args.strict, overwrite=args.overwrite, io=args.io,
                                        revision=args.revision)
    except GaugeError as e:                  # the library's advice, in the command line's words
        raise GaugeError(str(e).replace("overwrite=True", "--overwrite").replace("strict=True", "--strict")) \
            from None
    print(f"wrote {out}")
    return 0


def hub_object(spec: str, revision: str | None = None) -> Path:
    """A local path as is; ``namespace/repo[/sub/folder][/file]`` on the Hub downloaded with ``snapshot_download``
    (only that subfolder or file: a SAELens release folder, an adapter, a vector file) and its local path."""
    if Path(spec).exists() or Path(spec).is_absolute() or spec.startswith("."):
        return Path(spec)
    parts = spec.strip("/").split("/")
    if len(parts) < 2:
        raise GaugeError(f"no file or folder {spec!r}; on the Hub give namespace/repo[/subfolder]")
    from .hub import download_snapshot

    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    if any(x in ("", ".", "..") for x in parts):
        raise GaugeError(f"{spec!r}: path parts may not be empty, '.' or '..'")
    root = download_snapshot(repo, spec, revision=revision, allow_patterns=[sub, f"{sub}/*"] if sub else None)
    local = root / sub if sub else root
    if not local.exists():
        raise GaugeError(f"{repo!r} has no {sub!r} (revision {revision or 'main'})")
    return local


def cmd_transport(args: argparse.Namespace) -> int:
    from .transport.files import transport_path

    gauge = _load_gauge(args.gauge, args.gauge_revision)
    args.obj = str(hub_object(args.obj, args.revision))
    if args.inverse:
        gauge = gauge.inverse()
    kw: dict[str, Any] = {"config": _load_config(args.config)} if args.config else {}
    if args.base:
        from .transport.files import detect
        if detect(args.obj) != "peft":
            raise GaugeError("--base names the gauged base model of a PEFT adapter folder; OBJ is not one")
        kw["base"] = args.base
    out = transport_path(gauge, args.obj, args.output, **kw)
    print(f"wrote {out if out is not None else args.output}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    _check_model_arg(args.model_a), _check_model_arg(args.model_b)
    gauge = _load_gauge(args.gauge, args.gauge_revision)
    data = _read_data(args)
    if data is None:           # stream both checkpoints tensor by tensor
        _no_data_options(args, "the streaming weight check")
        from .fileverify import verify_files
        rep = verify_files(args.model_a, args.model_b, gauge, atol=args.weight_atol)
        if args.json:
            print(json.dumps(rep))
        else:
            print(f"{'tensor group':58s} {'tensors':>7s} {'exact':>6s} {'max|gA-B|':>10s} {'max|B|':>10s}")
            for k, v in rep["groups"].items():
                print(f"{k:58s} {v['tensors']:7d} {v['bit_exact']:6d} {v['max_abs_diff']:10.3g} {v['max_abs_b']:10.3g}")
            for k in ("missing_in_a", "missing_in_b", "mismatched"):
                if rep[k]:
                    print(f"{k}: {', '.join(rep[k][:5])}{' ...' if len(rep[k]) > 5 else ''}")
            print(f"{'result':58s} {'OK' if rep['ok'] else 'FAIL'} (weight atol {args.weight_atol})")
        return 0 if rep["ok"] else 1
    from .verify import verify

    a, b = _load_pair(args)
    res = verify(a, b, gauge, data=_token_data(args, a, data))
    # logits check the gauge is a symmetry; weights check it is the right one (bit-exact, or closer than without)
    ok = res["symmetry_logit_diff"] <= args.atol and (
        res["weights_bit_exact"]
        or res["relative_weight_diff"] <= args.max_weight_ratio * res["relative_weight_diff_without_gauge"])
    if args.json:
        print(json.dumps({**res, "ok": ok, "atol": args.atol}))
    else:
        for k, v in res.items():
            print(f"{k:34s} {v}")
        print(f"{'result':34s} {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_gauge
    from .omapio import is_map_folder, load_orthogonal_map, push_orthogonal_map

    kw = dict(path_in_repo=args.path_in_repo, commit_message=args.commit_message, revision=args.revision,
              private=args.private or None, create_pr=args.create_pr, source_id=args.source_id,
              target_id=args.target_id)
    if is_map_folder(args.gauge):             # find --method procrustes output
        info = push_orthogonal_map(load_orthogonal_map(args.gauge), args.repo_id, **kw)
    else:
        info = push_gauge(_load_gauge(args.gauge), args.repo_id, **kw)
    print(f"pushed to {getattr(info, 'pr_url', None) or getattr(info, 'commit_url', info)}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .match import select_families
    from .merge import merge
    from .specs import get_spec
    from .transport._io import atomic_dir

    _check_model_arg(args.model_a), _check_model_arg(args.model_b)
    if not 0.0 <= args.weight <= 1.0:
        raise GaugeError(f"--weight must lie in [0, 1], got {args.weight}")
    gauge = _load_gauge(args.gauge, args.gauge_revision) if args.gauge else None
    a, b = _load_model(args.model_a, args.revision_a), _load_model(args.model_b, args.revision_b)
    spaces = select_families(get_spec(a), _spaces_arg(args))      # refused before any fit, also when unused
    kw: dict[str, Any] = {} if gauge is not None or args.method == "none" else {"spaces": spaces}
    merged = merge(a, b, weight=args.weight, gauge=gauge, method=args.method, **kw)
    with atomic_dir(Path(args.output)) as tmp:
        merged.save_pretrained(tmp)
        try:
            _load_tokenizer(args.model_a).save_pretrained(tmp)
        except GaugeError:
            pass                                  # a checkpoint without a tokenizer merges all the same
    print(f"wrote {args.output} ({1 - args.weight:g} * A + {args.weight:g} * B in A's chart)")
    return 0


def show_text(gauge) -> str:
    """A human-readable summary of a gauge."""
    from .hub import gauge_id, group_name

    lines = [f"gauge {gauge_id(gauge)}  method={gauge.method}  group={group_name(gauge)}"]
    for side in ("source", "target"):
        d = getattr(gauge, side)
        lines.append(f"{side}: " + (", ".join(f"{k}={v}" for k, v in d.items() if v not in (None, "")) or "unknown"))
    lines.append(f"spaces ({len(gauge.spaces)}):")
    for name, el in gauge.spaces.items():
        flag = " identity" if el.is_identity else ""
        lines.append(f"  {name:10s} d={el.size:<6d} negative signs={int((el.sign < 0).sum()):<6d}{flag}")
    if gauge.metrics:
        lines.append("metrics: " + ", ".join(f"{k}={v}" for k, v in gauge.metrics.items()
                                             if not isinstance(v, (list, dict))))
    return "\n".join(lines)


def cmd_show(args: argparse.Namespace) -> int:
    from .omapio import describe_map, is_map_folder, load_orthogonal_map

    if is_map_folder(args.gauge):             # find --method procrustes output
        print(describe_map(load_orthogonal_map(args.gauge)))
        return 0
    try:
        gauge = _load_gauge(args.gauge, args.revision)
    except GaugeError as e:
        if Path(args.gauge).exists() or len(args.gauge.strip("/").split("/")) < 3:
            raise
        try:
            folder = hub_object(args.gauge, args.revision)     # a map published with push (no gauge files)
        except GaugeError:
            raise e from None
        if not is_map_folder(folder):
            raise
        print(describe_map(load_orthogonal_map(folder)))
        return 0
    print(show_text(gauge))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    rc = demo_main(list(args.demo_args))
    return int(rc or 0)


# ----------------------------------------------------------------------------------------------------------------
# parser
# ----------------------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, status 2
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hf-gauge", description="Find, apply and transport residual-stream gauges (signed "
                "permutations) between transformers checkpoints.")
    from .version import __version__
    p.add_argument("--version", action="version", version=f"hf_gauge {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    s = sub.add_parser("find", help="fit the gauge from model A's chart to model B's")
    s.add_argument("model_a", metavar="A", help="source model: folder or Hub id")
    s.add_argument("model_b", metavar="B", help="target model: folder or Hub id")
    _add_data(s, "text or token ids whose activations are matched (loads both models; without data the fit is "
                 "data-free, from the checkpoint files)")
    s.add_argument("--method", default="signed", choices=("signed", "permutation", "procrustes"),
                   help="signed (B_d, default), permutation (the S_d baseline) or procrustes (an orthogonal map "
                        "for models that are not gauge-equivalent; needs data; written as orthogonal_map.*)")
    s.add_argument("--batch-size", type=int, default=8, metavar="N", help="rows per forward pass (default 8)")
    s.add_argument("--layers", type=int, nargs="+", metavar="L", help="blocks whose outputs are matched (default: "
                   "every block)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (it is shown on stderr otherwise, "
                   "also when stderr is not a terminal)")
    _add_spaces(s, "residual")
    s.add_argument("--revision-a")
    s.add_argument("--revision-b")
    _add_loading(s)
    s.add_argument("-o", "--output", required=True, metavar="GAUGE", help="gauge folder to write")
    s.set_defaults(func=cmd_find)

    s = sub.add_parser("apply", help="write a checkpoint moved through a gauge (streaming, shard by shard)")
    s.add_argument("src", metavar="SRC", help="checkpoint folder or Hub id")
    s.add_argument("--gauge", required=True, metavar="G", help="gauge folder or namespace/repo/gauges/<name>")
    s.add_argument("--gauge-revision")
    s.add_argument("--revision", help="revision of a Hub SRC")
    s.add_argument("-o", "--output", required=True, metavar="OUT", help="new output folder")
    s.add_argument("--strict", action="store_true", help="refuse a source-fingerprint mismatch")
    s.add_argument("--overwrite", action="store_true", help="replace an existing non-empty OUT")
    s.add_argument("--io", choices=("auto", "buffered", "direct"), default="auto",
                   help="buffered: through the page cache; direct: O_DIRECT reads and writes, tensors moved in place "
                   "(for checkpoints larger than memory); auto (default): direct when the checkpoint and its output "
                   "exceed the available memory")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_apply)

    s = sub.add_parser("transport", help="move an object (SAE, steering vector, adapter, ...) through a gauge")
    s.add_argument("obj", metavar="OBJ", help="file or folder of the object, or on the Hub namespace/repo[/subfolder] "
                   "(a SAELens release folder, an adapter repo)")
    s.add_argument("--revision", help="revision of a Hub OBJ")
    s.add_argument("--gauge", required=True, metavar="G")
    s.add_argument("--gauge-revision")
    s.add_argument("--inverse", action="store_true", help="use the inverse gauge (target -> source)")
    s.add_argument("--base", metavar="MODEL", help="PEFT adapters: the gauged base model (folder or Hub id) written "
                   "into adapter_config.json and the README (default: the gauge's recorded target model; refused "
                   "when the gauge records none)")
    s.add_argument("-o", "--output", required=True, metavar="OUT")
    s.add_argument("--config", metavar="BASE", help="the base model's folder or config.json: the head geometry a "
                   "gauge that moves attention heads needs (default: the adapter's local base_model_name_or_path)")
    s.set_defaults(func=cmd_transport)

    s = sub.add_parser("verify", help="check that A moved through the gauge reproduces B", description=
                       "Without --data/--text: streams both checkpoints tensor by tensor, moves A's tensors through "
                       "the gauge on the fly and reports the largest difference per tensor group; OK (exit 0) when "
                       "every difference is at most --weight-atol (default 0: bit-exact), exit 1 otherwise. With "
                       "--data/--text: loads both models, moves a copy of A and compares logits on that data too: "
                       "OK when the gauge preserves A's logits within --atol and moved A's weights equal B's bit for "
                       "bit or are much closer to B's than A's are (--max-weight-ratio). Errors exit 2.")
    s.add_argument("model_a", metavar="A")
    s.add_argument("model_b", metavar="B")
    s.add_argument("--gauge", required=True, metavar="G")
    s.add_argument("--gauge-revision")
    s.add_argument("--weight-atol", type=float, default=0.0,
                   help="streaming check: largest accepted |moved A - B| per tensor (default 0: bit-exact)")
    _add_data(s, "text or token ids to compare logits on (loads both models; without data the check streams the "
                 "checkpoint files)")
    _add_loading(s)
    s.add_argument("--atol", type=float, default=1e-3, help="max |logit change| of A under the gauge (default 1e-3)")
    s.add_argument("--max-weight-ratio", type=float, default=0.5,
                   help="when weights are not bit-exact (a fine-tune), accept if ||gA - B|| <= RATIO * ||A - B|| "
                        "(default 0.5)")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("push", help="upload a gauge folder, or an orthogonal map folder (find --method procrustes), "
                       "with a model card to a Hub model repo")
    s.add_argument("gauge", metavar="GAUGE", help="gauge folder, or orthogonal map folder")
    s.add_argument("repo_id", metavar="REPO_ID")
    s.add_argument("--path-in-repo", help="subfolder (default gauges/<gauge id>, orthogonal_maps/<map id>)")
    s.add_argument("--revision", help="branch (created if missing)")
    s.add_argument("--commit-message")
    s.add_argument("--private", action="store_true", help="create the repo private")
    s.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    s.add_argument("--source-id", metavar="ID", help="Hub id of the source model for the card (default: recorded)")
    s.add_argument("--target-id", metavar="ID", help="Hub id of the target model for the card (default: recorded)")
    s.set_defaults(func=cmd_push)

    s = sub.add_parser("show", help="summarize a gauge or an orthogonal map (find --method procrustes)")
    s.add_argument("gauge", metavar="GAUGE", help="folder, or namespace/repo/<subfolder> on the Hub")
    s.add_argument("--revision")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("demo", help="run the end-to-end demo (arguments go to the demo)", add_help=False)
    s.add_argument("demo_args", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("merge", help="merge two checkpoints after moving B into A's chart")
    s.add_argument("model_a", metavar="A", help="model whose chart the merge keeps: folder or Hub id")
    s.add_argument("model_b", metavar="B", help="model moved into A's chart before interpolating")
    s.add_argument("--weight", type=float, default=0.5, help="(1 - W) * A + W * B (default 0.5)")
    s.add_argument("--gauge", metavar="G", help="the gauge from A to B (default: fitted from the weights)")
    s.add_argument("--gauge-revision")
    s.add_argument("--method", default="signed", choices=("signed", "permutation", "none"),
                   help="fit signed (default), permutation (S_d baseline) or none (no alignment)")
    _add_spaces(s, "all")
    s.add_argument("--revision-a")
    s.add_argument("--revision-b")
    s.add_argument("-o", "--output", required=True, metavar="OUT", help="new output folder")
    s.set_defaults(func=cmd_merge)

    s = sub.add_parser("audit", help=AUDIT_HELP, add_help=False)   # its options: audit_parser() (imports torch)
    s.add_argument("audit_args", nargs=argparse.REMAINDER)
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    _finish_subparsers(sub)
    return p


AUDIT_HELP = "gauge-sweep audit of an index-level claim (raw vs transported agreement)"


def audit_parser() -> argparse.ArgumentParser:
    """The parser of ``hf-gauge audit`` (built by ``hf_gauge.audit``, which needs torch: only when auditing)."""
    from .audit import add_subparser as add_audit   # the module (hf_gauge.audit is the function)
    p = _Parser(prog="hf-gauge")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    add_audit(sub)
    _finish_subparsers(sub)
    return p


EXAMPLES = {
    "find": "hf-gauge find HuggingFaceTB/SmolLM2-135M ./gauged --data corpus.txt --max-length 512 --max-tokens 65536 "
            "-o gauges/a2b\n"
            "torchrun --nproc_per_node 2 -m hf_gauge find A B --data corpus.txt -o G   # rank 0 writes",
    "apply": "hf-gauge apply HuggingFaceTB/SmolLM2-135M --gauge gauges/a2b -o ./SmolLM2-gauged",
    "transport": "hf-gauge transport ./my-lora --gauge gauges/a2b --base ./SmolLM2-gauged -o ./my-lora-gauged\n"
                 "hf-gauge transport ./sae --gauge user/repo/gauges/a2b -o ./sae-gauged",
    "verify": "hf-gauge verify ./A ./B --gauge gauges/a2b --json",
    "push": "hf-gauge push gauges/a2b user/my-model --create-pr --commit-message 'add gauge'",
    "show": "hf-gauge show user/my-model/gauges/a2b\nhf-gauge show ./omap   # find --method procrustes output",
    "merge": "hf-gauge merge ./run-1 ./run-2 --weight 0.5 -o ./merged",
    "audit": "hf-gauge audit smollm2 --claim topk-resid --n-gauges 4 --figure audit.png",
}


def _finish_subparsers(sub: Any) -> None:
    """An example (epilog) on every subcommand, and ``--token`` (Hub access) on every one that takes options."""
    for name, sp in sub.choices.items():
        if name in EXAMPLES:
            sp.epilog = "example:\n  " + EXAMPLES[name].replace("\n", "\n  ")
            sp.formatter_class = argparse.RawDescriptionHelpFormatter
        if name != "demo" and "--token" not in sp._option_string_actions:
            sp.add_argument("--token", help="Hugging Face token for private or gated repos (default: HF_TOKEN or "
                            "the saved login)")
        if name != "demo" and "--debug" not in sp._option_string_actions:   # also after the command
            sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                            help="show the Python traceback of an error")


# user errors: refused input, files that cannot be read or written (disk full, permissions), malformed JSON/values
_USER_ERRORS = (GaugeError, OSError, ImportError, ValueError, json.JSONDecodeError, UnicodeError, RecursionError,
                pickle.UnpicklingError)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush into a closed pipe stays quiet."""
    import os
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):           # no real file descriptor (captured stdout): nothing to flush there
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-gauge`` console script; returns the exit status.

    Every error exits with status 2 and one line ``error: ...`` on stderr (an unexpected one adds a hint);
    ``--debug`` prints the traceback as well. Output into a pipe closed early (``| head``) ends quietly with 0.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:            # the demo parses its own options (argparse REMAINDER drops leading --flags)
        from .demo import main as demo_main
        return demo_main(argv[1:])
    parser = audit_parser() if argv[:1] == ["audit"] else build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    debug = bool(getattr(args, "debug", False))
    if getattr(args, "token", None):
        import os
        os.environ["HF_TOKEN"] = args.token        # read by huggingface_hub and transformers on every request
    if args.command != "find" and not is_main_process():
        return 0                                   # under torchrun only find uses every rank (sharded statistics)
    if not is_main_process():                      # ... and rank 0 alone draws progress bars
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as hf_logging
        disable_progress_bars()
        hf_logging.disable_progress_bar()
    try:
        rc = int(func(args) or 0)
        sys.stdout.flush()                         # a closed pipe shows here, not at interpreter exit
        return rc
    except BrokenPipeError:                        # `hf-gauge show G | head`: the reader has what it wanted
        _silence_stdout()
        return 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (the console script never shows a traceback unless --debug)
        if debug:
            import traceback
            traceback.print_exc()
        msg = " ".join(str(e).split()) or type(e).__name__
        if not isinstance(e, _USER_ERRORS):
            msg = f"{type(e).__name__}: {msg}" + ("" if debug else " (run with --debug for the traceback)")
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
