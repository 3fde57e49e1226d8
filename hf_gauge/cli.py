"""``hf-gauge``: find, apply, transport, verify, push and show gauges from the command line.

Models, checkpoints and gauges are given as local folders or Hub ids (a gauge on the Hub as
``namespace/repo/gauges/<name>``). Refused input exits with status 2 and one line ``error: ...``.
"""
from __future__ import annotations

import argparse
import json
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
    parts = spec.strip("/").split("/")
    if len(parts) < 2:
        raise GaugeError(f"no gauge folder {spec!r}; on the Hub give namespace/repo/gauges/<name>")
    return load_gauge("/".join(parts[:2]), subfolder="/".join(parts[2:]) or None, revision=revision)


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
        return AutoModelForCausalLM.from_pretrained(spec, revision=revision, **kw).eval()
    except (OSError, ValueError) as e:
        raise GaugeError(f"cannot load model {spec!r}: {str(e).splitlines()[0]}") from None


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
        return AutoTokenizer.from_pretrained(spec)
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


# ----------------------------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------------------------
def cmd_find(args: argparse.Namespace) -> int:
    from .hub import save_gauge
    from .match import find_gauge

    data = _read_data(args)
    _check_model_arg(args.model_a), _check_model_arg(args.model_b)
    spaces = "all" if "all" in args.spaces else tuple(dict.fromkeys(["residual"] + list(args.spaces)))
    if data is None:           # data-free: straight from the checkpoint files, no model is built
        if args.device_map or args.offload_folder:
            raise GaugeError("--device-map/--offload-folder only apply when models are loaded (--data/--text); "
                             "data-free find reads the checkpoint files block by block")
        from .filefind import find_gauge_from_files
        gauge = find_gauge_from_files(args.model_a, args.model_b, method=args.method, spaces=spaces,
                                      revision_a=args.revision_a, revision_b=args.revision_b)
    else:
        a, b = _load_pair(args, args.revision_a, args.revision_b)
        kwargs: dict[str, Any] = {"data": data, "method": args.method, "spaces": spaces}
        if isinstance(data, list):
            kwargs["tokenizer"] = _load_tokenizer(args.tokenizer or args.model_a)
        gauge = find_gauge(a, b, **kwargs)
    from .gauge import Gauge
    if not isinstance(gauge, Gauge):
        raise GaugeError(f"method {args.method!r} returned a {type(gauge).__name__}, not a gauge; hf-gauge find "
                         "writes signed-permutation gauges (methods signed, permutation)")
    out = save_gauge(gauge, args.output)
    print(f"saved gauge ({gauge.method}) to {out}")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from .checkpoint import apply_gauge_to_checkpoint

    gauge = _load_gauge(args.gauge, args.gauge_revision)
    out = apply_gauge_to_checkpoint(args.src, gauge, args.output, progress=not args.no_progress,
                                    strict=args.strict, overwrite=args.overwrite, revision=args.revision)
    print(f"wrote {out}")
    return 0


def cmd_transport(args: argparse.Namespace) -> int:
    from .transport.files import transport_path

    gauge = _load_gauge(args.gauge, args.gauge_revision)
    if args.inverse:
        gauge = gauge.inverse()
    out = transport_path(gauge, args.obj, args.output)
    print(f"wrote {out if out is not None else args.output}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    _check_model_arg(args.model_a), _check_model_arg(args.model_b)
    gauge = _load_gauge(args.gauge, args.gauge_revision)
    data = _read_data(args)
    if data is None:           # stream both checkpoints tensor by tensor
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

    if isinstance(data, list):
        tok = _load_tokenizer(args.tokenizer or args.model_a)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        data = tok(data, return_tensors="pt", padding=True)["input_ids"]
    a, b = _load_pair(args)
    res = verify(a, b, gauge, data=data)
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

    gauge = _load_gauge(args.gauge)
    info = push_gauge(gauge, args.repo_id, path_in_repo=args.path_in_repo, commit_message=args.commit_message,
                      revision=args.revision, private=args.private or None)
    print(f"pushed to {getattr(info, 'commit_url', info)}")
    return 0


def show_text(gauge) -> str:
    """A human-readable summary of a gauge."""
    from .hub import _group, gauge_id

    lines = [f"gauge {gauge_id(gauge)}  method={gauge.method}  group={_group(gauge)}"]
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
    gauge = _load_gauge(args.gauge, args.revision)
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
    from . import __version__
    p.add_argument("--version", action="version", version=f"hf_gauge {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    s = sub.add_parser("find", help="fit the gauge from model A's chart to model B's")
    s.add_argument("model_a", metavar="A", help="source model: folder or Hub id")
    s.add_argument("model_b", metavar="B", help="target model: folder or Hub id")
    s.add_argument("--data", metavar="FILE", help=".txt text, or token ids in .safetensors (input_ids) / .json")
    s.add_argument("--text", nargs="+", metavar="TEXT", help="text to run through both models")
    s.add_argument("--tokenizer", help="tokenizer for text data (default: A's)")
    s.add_argument("--method", default="signed", choices=("signed", "permutation"),
                   help="signed (B_d, default) or permutation (the S_d baseline)")
    s.add_argument("--spaces", nargs="+", default=["residual"], choices=("residual", "mlp", "attn", "all"),
                   help="gauge spaces to fit (default: residual; 'all' adds every MLP layer and head space)")
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
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_apply)

    s = sub.add_parser("transport", help="move an object (SAE, steering vector, adapter, ...) through a gauge")
    s.add_argument("obj", metavar="OBJ", help="file or folder of the object")
    s.add_argument("--gauge", required=True, metavar="G")
    s.add_argument("--gauge-revision")
    s.add_argument("--inverse", action="store_true", help="use the inverse gauge (target -> source)")
    s.add_argument("-o", "--output", required=True, metavar="OUT")
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
    s.add_argument("--data", metavar="FILE", help="check logits on this data (loads both models): .txt text, or "
                   "token ids in .safetensors (input_ids) / .json")
    s.add_argument("--text", nargs="+", metavar="TEXT", help="check logits on this text (loads both models)")
    s.add_argument("--tokenizer", help="tokenizer for text data (default: A's)")
    _add_loading(s)
    s.add_argument("--atol", type=float, default=1e-3, help="max |logit change| of A under the gauge (default 1e-3)")
    s.add_argument("--max-weight-ratio", type=float, default=0.5,
                   help="when weights are not bit-exact (a fine-tune), accept if ||gA - B|| <= RATIO * ||A - B|| "
                        "(default 0.5)")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("push", help="upload a gauge folder (with a model card) to a Hub model repo")
    s.add_argument("gauge", metavar="GAUGE")
    s.add_argument("repo_id", metavar="REPO_ID")
    s.add_argument("--path-in-repo", help="subfolder (default gauges/<gauge id>)")
    s.add_argument("--revision", help="branch (created if missing)")
    s.add_argument("--commit-message")
    s.add_argument("--private", action="store_true", help="create the repo private")
    s.set_defaults(func=cmd_push)

    s = sub.add_parser("show", help="summarize a gauge")
    s.add_argument("gauge", metavar="GAUGE")
    s.add_argument("--revision")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("demo", help="run the end-to-end demo (arguments go to the demo)", add_help=False)
    s.add_argument("demo_args", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_demo)

    from .audit import add_subparser as add_audit   # the module (hf_gauge.audit is the function)
    add_audit(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-gauge`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:            # the demo parses its own options (argparse REMAINDER drops leading --flags)
        from .demo import main as demo_main
        return demo_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (GaugeError, OSError, ImportError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
