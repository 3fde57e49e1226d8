"""The ``hf-gauge`` command line: the installed console script as a subprocess, and ``main()`` in process."""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import VOCAB, assert_state_equal, state, tiny_model
from hf_gauge import apply_gauge, load_gauge, random_gauge
from hf_gauge.cli import build_parser, main
from hub_server import HubServer, local_network_only  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("local_network_only")

SUBCOMMANDS = ("find", "apply", "transport", "verify", "push", "show", "demo", "audit")


def script() -> list[str]:
    exe = shutil.which("hf-gauge", path=str(Path(sys.executable).parent)) or shutil.which("hf-gauge")
    return [exe] if exe else [sys.executable, "-m", "hf_gauge"]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the console script (or ``python -m hf_gauge`` when the first argument is ``-m``)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    cmd = [sys.executable, *args] if args[:1] == ("-m",) else [*script(), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=300)


@pytest.fixture
def setup(tmp_path: Path):
    a = tiny_model("llama", tie=True)
    g = random_gauge(a, seed=6, spaces=("residual", "mlp"))
    b = apply_gauge(copy.deepcopy(a), g)
    a.save_pretrained(tmp_path / "A", max_shard_size="20KB")
    b.save_pretrained(tmp_path / "B")
    g.save_pretrained(tmp_path / "gauges" / "a2b")
    return tmp_path, a, b, g


def test_console_script_installed_and_apply(setup) -> None:
    tmp, a, b, g = setup
    assert shutil.which("hf-gauge", path=str(Path(sys.executable).parent)), "console script not installed"
    r = run("apply", str(tmp / "A"), "--gauge", str(tmp / "gauges" / "a2b"), "-o", str(tmp / "out"))
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "apply gauge" in r.stderr          # tqdm progress bar on stderr
    loaded = AutoModelForCausalLM.from_pretrained(tmp / "out")
    assert_state_equal(state(loaded), state(b))


def test_bad_input_one_line_error_no_traceback(setup) -> None:
    """Through ``python -m hf_gauge`` (``__main__.py``)."""
    tmp, *_ = setup
    r = run("-m", "hf_gauge", "apply", str(tmp / "A"), "--gauge", str(tmp / "A"), "-o", str(tmp / "o"))   # not a gauge folder
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "gauge.safetensors" in lines[0]
    assert not (tmp / "o").exists()


def test_find_verify_transport_console_script(setup) -> None:
    """find -> verify -> transport through the installed console script, one subprocess each."""
    tmp, a, b, g = setup
    from safetensors.torch import load_file, save_file
    r = run("find", str(tmp / "A"), str(tmp / "B"), "--spaces", "mlp", "-o", str(tmp / "G"))
    assert r.returncode == 0 and "saved gauge" in r.stdout, r.stderr
    found = load_gauge(tmp / "G")
    assert found == g                                                # the hidden gauge, residual and MLP spaces
    r = run("verify", str(tmp / "A"), str(tmp / "B"), "--gauge", str(tmp / "G"), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["ok"] and res["weights_bit_exact"] and res["fingerprint_match"]
    v = {"layer.1": torch.randn(64), "layer.0": torch.randn(3, 64)}
    save_file(v, tmp / "vec.safetensors")
    r = run("transport", str(tmp / "vec.safetensors"), "--gauge", str(tmp / "G"), "-o", str(tmp / "OUT.safetensors"))
    assert r.returncode == 0 and "wrote" in r.stdout, r.stderr
    out = load_file(tmp / "OUT.safetensors")
    assert out.keys() == v.keys() and all(torch.equal(out[k], g.residual(v[k])) for k in v)


def test_corrupt_safetensors_one_line_error(setup, capsys: pytest.CaptureFixture) -> None:
    """A corrupt or non-safetensors file given to find --data or transport: GaugeError -> one line, status 2."""
    tmp, a, b, g = setup
    from safetensors.torch import save
    good = save({"input_ids": torch.zeros(2, 5, dtype=torch.long)})
    bad = {"text": b"not a safetensors file at all", "empty": b"", "truncated": good[:-7]}
    for name, data in bad.items():
        (tmp / f"{name}.safetensors").write_bytes(data)
        argvs = (["find", str(tmp / "A"), str(tmp / "B"), "--data", str(tmp / f"{name}.safetensors"),
                  "-o", str(tmp / "f")],
                 ["transport", str(tmp / f"{name}.safetensors"), "--gauge", str(tmp / "gauges" / "a2b"),
                  "-o", str(tmp / "t.safetensors")])
        for argv in argvs:
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            lines = err.strip().splitlines()
            assert "Traceback" not in err and len(lines) == 1, (argv, err)
            assert lines[0].startswith("error: ") and "not a valid safetensors file" in lines[0], argv
            assert str(tmp / f"{name}.safetensors") in lines[0], argv
        assert not (tmp / "f").exists() and not (tmp / "t.safetensors").exists()


def test_every_subcommand_help(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for c in SUBCOMMANDS:                                          # listed as a command, not just mentioned
        assert re.search(rf"^\s+{c}\b", out, re.M), c
    for cmd in SUBCOMMANDS:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert f"usage: hf-gauge {cmd}" in capsys.readouterr().out
    assert main([]) == 2
    with pytest.raises(SystemExit) as e:
        main(["apply"])                                            # missing arguments
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "required" in err[-1]


def test_show_and_errors_in_process(setup, capsys: pytest.CaptureFixture) -> None:
    tmp, a, b, g = setup
    assert main(["show", str(tmp / "gauges" / "a2b")]) == 0
    out = capsys.readouterr().out
    assert "residual" in out and "mlp.1" in out and "method=random" in out and "group=B_d" in out
    for argv in (["show", str(tmp / "nope")], ["show", str(tmp / "A")],
                 ["apply", str(tmp / "A"), "--gauge", str(tmp / "gauges" / "a2b"), "-o", str(tmp / "A" / "x")],
                 ["verify", str(tmp / "A"), str(tmp / "missing"), "--gauge", str(tmp / "gauges" / "a2b")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), argv


def test_verify_command(setup, capsys: pytest.CaptureFixture) -> None:
    tmp, a, b, g = setup
    assert main(["verify", str(tmp / "A"), str(tmp / "B"), "--gauge", str(tmp / "gauges" / "a2b"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["ok"] and res["weights_bit_exact"] and res["fingerprint_match"]
    random_gauge(a, seed=99, spaces=("residual", "mlp")).save_pretrained(tmp / "gauges" / "wrong")
    assert main(["verify", str(tmp / "A"), str(tmp / "B"), "--gauge", str(tmp / "gauges" / "wrong")]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_find_command(setup, capsys: pytest.CaptureFixture) -> None:
    tmp, a, b, g = setup
    ids = torch.randint(0, VOCAB, (8, 24), generator=torch.Generator().manual_seed(0)).tolist()
    (tmp / "ids.json").write_text(json.dumps(ids))
    rc = main(["find", str(tmp / "A"), str(tmp / "B"), "--data", str(tmp / "ids.json"), "-o", str(tmp / "found")])
    assert rc == 0, capsys.readouterr().err
    found = load_gauge(tmp / "found")
    assert found.residual == g.residual
    assert main(["find", str(tmp / "A"), str(tmp / "B"), "--data", str(tmp / "nope.json"), "-o", str(tmp / "f2")]) == 2
    assert not (tmp / "f2").exists()
    # data-free, residual + every MLP layer: the whole hidden gauge comes back
    assert main(["find", str(tmp / "A"), str(tmp / "B"), "--spaces", "mlp", "-o", str(tmp / "full")]) == 0
    assert load_gauge(tmp / "full") == g


def test_transport_command(setup, capsys: pytest.CaptureFixture) -> None:
    tmp, a, b, g = setup
    from safetensors.torch import load_file, save_file
    v = torch.randn(64)
    save_file({"vector": v}, tmp / "vec.safetensors")
    rc = main(["transport", str(tmp / "vec.safetensors"), "--gauge", str(tmp / "gauges" / "a2b"), "-o",
               str(tmp / "vec_b.safetensors")])
    assert rc == 0, capsys.readouterr().err
    out = load_file(tmp / "vec_b.safetensors")
    assert torch.equal(next(iter(out.values())), g.residual(v))


def test_transport_adapter_base(setup, capsys: pytest.CaptureFixture) -> None:
    """An adapter folder through ``transport``: refused without --base (a random gauge records no distinct target),
    written with --base into adapter_config.json; transporting the output again through the same gauge is refused."""
    from peft import LoraConfig, get_peft_model
    tmp, a, b, g = setup
    get_peft_model(copy.deepcopy(a), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp / "ad")
    G = str(tmp / "gauges" / "a2b")
    assert main(["transport", str(tmp / "ad"), "--gauge", G, "-o", str(tmp / "ad_b")]) == 2
    assert "--base" in capsys.readouterr().err and not (tmp / "ad_b").exists()
    assert main(["transport", str(tmp / "ad"), "--gauge", G, "-o", str(tmp / "ad_b"), "--base", str(tmp / "B")]) == 0
    assert json.loads((tmp / "ad_b" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tmp / "B")
    assert main(["transport", str(tmp / "ad_b"), "--gauge", G, "-o", str(tmp / "ad_bb"), "--base", "x"]) == 2
    assert "already transported" in capsys.readouterr().err
    assert main(["transport", str(tmp / "vec.safetensors"), "--gauge", G, "-o", str(tmp / "v"), "--base", "x"]) == 2


def test_push_then_show_offline_from_cache(setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    """push and show against the local Hub; then a fresh process with HF_HUB_OFFLINE=1 reads the cache."""
    import huggingface_hub.constants as hc
    tmp, a, b, g = setup
    cache = tmp_path / "hfcache"
    with HubServer() as hub:
        monkeypatch.setattr(hc, "ENDPOINT", hub.url)                    # what HF_ENDPOINT sets at import time
        monkeypatch.setattr(hc, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        assert main(["push", str(tmp / "gauges" / "a2b"), "org/tiny", "--path-in-repo", "gauges/a2b"]) == 0
        assert "pushed to" in capsys.readouterr().out
        assert "gauges/a2b/gauge.safetensors" in hub.files("org/tiny")
        assert main(["show", "org/tiny/gauges/a2b"]) == 0                # downloads into the cache
        assert "mlp.1" in capsys.readouterr().out
        assert main(["push", str(tmp / "gauges" / "a2b"), "org/tiny", "--path-in-repo", ""]) == 2
        assert capsys.readouterr().err.startswith("error: path_in_repo")
        dead = hub.url
    env = {"HF_ENDPOINT": dead, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    r = run("show", "org/tiny/gauges/a2b", env=env)                     # the server is gone: cache only
    assert r.returncode == 0 and "mlp.1" in r.stdout and "method=random" in r.stdout, r.stderr
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    assert main(["show", "org/tiny/gauges/other"]) == 2
    assert "cache" in capsys.readouterr().err


def test_all_subcommands_registered() -> None:
    parser = build_parser()
    choices = parser._subparsers._group_actions[0].choices            # type: ignore[union-attr]
    assert {"find", "apply", "transport", "verify", "push", "show", "demo", "audit"} <= set(choices)


def test_transport_adapter_through_head_gauge(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A gauge that moves attention heads: the adapter folder is transported with --config (or the adapter's local
    base folder); without either, one line names the --config option (and reads "an adapter")."""
    from peft import LoraConfig, PeftModel, get_peft_model
    a = tiny_model("llama")
    g = random_gauge(a, seed=3, spaces=("residual", "mlp", "attn"))
    b = apply_gauge(copy.deepcopy(a), g)
    g.save_pretrained(tmp_path / "g")
    a.save_pretrained(tmp_path / "A")
    torch.manual_seed(0)
    pa = get_peft_model(copy.deepcopy(a), LoraConfig(r=4, target_modules=["q_proj", "k_proj", "o_proj"],
                                                     init_lora_weights=False)).eval()
    pa.save_pretrained(tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "not/a-local-folder"
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(cfg))
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = pa(ids).logits
    capsys.readouterr()

    assert main(["transport", str(tmp_path / "ad"), "--gauge", str(tmp_path / "g"), "--base", str(tmp_path / "B"), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "an adapter" in err and "--config" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()

    for k, conf in enumerate([str(tmp_path / "A"), str(tmp_path / "A" / "config.json")]):
        out = tmp_path / f"ad_b{k}"
        assert main(["transport", str(tmp_path / "ad"), "--gauge", str(tmp_path / "g"), "--base", str(tmp_path / "B"), "-o", str(out),
                     "--config", conf]) == 0, capsys.readouterr().err
        with torch.no_grad():
            got = PeftModel.from_pretrained(copy.deepcopy(b), out).eval()(ids).logits
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()

    cfg["base_model_name_or_path"] = str(tmp_path / "A")          # a local base folder is read by default
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(cfg))
    assert main(["transport", str(tmp_path / "ad"), "--gauge", str(tmp_path / "g"), "--base", str(tmp_path / "B"), "-o", str(tmp_path / "ad_c")]) == 0
    assert main(["transport", str(tmp_path / "ad"), "--gauge", str(tmp_path / "g"), "--base", str(tmp_path / "B"), "-o", str(tmp_path / "y"),
                 "--config", str(tmp_path / "nope")]) == 2
    assert "no config.json" in capsys.readouterr().err


def _char_tokenizer(folder: Path) -> None:
    """A character-level tokenizer (printable ASCII, ids < VOCAB) saved next to a tiny model."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"[UNK]": 0, **{chr(c): c - 31 for c in range(32, 127)}}
    assert max(vocab.values()) < VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)


def test_find_text_file_cut_into_windows(setup, capsys: pytest.CaptureFixture) -> None:
    """``--data file.txt`` is tokenized and cut into ``--max-length`` windows (not one row past the context); the
    fit summary line and the progress bar are printed although the output is not a terminal."""
    tmp, a, b, g = setup
    _char_tokenizer(tmp / "A")
    text = "The quick brown fox jumps over the lazy dog. " * 40          # 1800 characters = 1800 tokens
    (tmp / "t.txt").write_text(text)
    argv = ["find", str(tmp / "A"), str(tmp / "B"), "--data", str(tmp / "t.txt"), "--max-length", "64",
            "--batch-size", "4", "--layers", "0", "1"]
    assert main(argv + ["-o", str(tmp / "fw")]) == 0
    out, err = capsys.readouterr()
    got = load_gauge(tmp / "fw")
    assert got.metrics["n_tokens"] == (len(text) // 64) * 64
    assert got.residual == g.residual
    line = next(ln for ln in out.splitlines() if ln.startswith("fit:"))
    assert "matched |C| mean" in line and "low-confidence 0" in line
    assert "%|" in err                                                   # tqdm bar although stderr is captured
    ctx = a.config.max_position_embeddings
    assert main(argv[:-5] + ["--max-length", str(ctx + 1), "-o", str(tmp / "f2")]) == 2
    assert "context" in capsys.readouterr().err and not (tmp / "f2").exists()


def test_find_procrustes_writes_orthogonal_map(setup, capsys: pytest.CaptureFixture) -> None:
    tmp, a, b, g = setup
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    (tmp / "ids.json").write_text(json.dumps(ids.tolist()))
    assert main(["find", str(tmp / "A"), str(tmp / "B"), "--data", str(tmp / "ids.json"), "--method", "procrustes",
                 "-o", str(tmp / "om")]) == 0
    assert "nearest signed permutation" in capsys.readouterr().out
    from safetensors.torch import load_file
    R = load_file(tmp / "om" / "orthogonal_map.safetensors")["R"]
    assert R.dtype == torch.float64 and torch.allclose(R.T @ R, torch.eye(64, dtype=torch.float64), atol=1e-8)
    assert json.loads((tmp / "om" / "orthogonal_map.json").read_text())["convention"] == "x_B = x_A @ R"


def test_merge_command(setup, capsys: pytest.CaptureFixture) -> None:
    """``merge A B -o OUT``: B (a gauged copy of A) moved into A's chart and averaged gives A back."""
    tmp, a, b, g = setup
    assert main(["merge", str(tmp / "A"), str(tmp / "B"), "-o", str(tmp / "M")]) == 0
    assert "wrote" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(tmp / "M")
    for k, v in state(a).items():
        assert torch.allclose(state(merged)[k], v, atol=1e-6), k
    assert main(["merge", str(tmp / "A"), str(tmp / "B"), "--method", "none", "-o", str(tmp / "M0")]) == 0
    naive = state(AutoModelForCausalLM.from_pretrained(tmp / "M0"))
    assert not torch.allclose(naive["model.norm.weight"], state(a)["model.norm.weight"])
    assert main(["merge", str(tmp / "A"), str(tmp / "B"), "-o", str(tmp / "M")]) == 2      # OUT exists: refused


def test_every_subcommand_has_help_and_an_example() -> None:
    parser = build_parser()
    choices = parser._subparsers._group_actions[0].choices            # type: ignore[union-attr]
    helps = {a.dest: a.help for a in parser._subparsers._group_actions[0]._choices_actions}  # type: ignore
    from hf_gauge.cli import audit_parser
    full_audit = audit_parser()._subparsers._group_actions[0].choices["audit"]   # type: ignore[union-attr]
    for name, sp in choices.items():
        assert helps.get(name), name
        if name != "demo":                                             # the demo parses its own options
            text = (full_audit if name == "audit" else sp).format_help()
            assert "example:\n  hf-gauge " in text or "example:\n  torchrun" in text, name
            assert "--token" in text, name


def test_torchrun_only_rank_zero_writes_and_prints(setup) -> None:
    """``torchrun --nproc_per_node 2 -m hf_gauge find``: both ranks compute (sharded statistics), rank 0 alone
    prints the summary and writes the gauge."""
    tmp, a, b, g = setup
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    ids = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(2))
    (tmp / "ids.json").write_text(json.dumps(ids.tolist()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29517", "-m", "hf_gauge", "find",
                        str(tmp / "A"), str(tmp / "B"), "--data", str(tmp / "ids.json"),
                        "-o", str(tmp / "G2")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("fit: ") == 1 and r.stdout.count("saved gauge") == 1, r.stdout
    bars = r.stderr.replace("\r", "\n")                  # rank 0 alone draws progress bars: one statistics bar,
    assert bars.count("activation statistics: 100%") == 1, bars[-2000:]         # and its two model loads
    assert bars.count("Loading weights: 100%") <= 2, bars[-2000:]
    got = load_gauge(tmp / "G2")
    assert got.residual == g.residual and got.metrics["n_tokens"] == 8 * 16       # both shards counted


def test_transport_hub_objects_sae_release_folder_and_adapter(setup, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """``transport namespace/repo/subfolder``: a SAELens release folder and a PEFT adapter repo on the (local) Hub
    are downloaded (that subfolder only) and transported like local folders."""
    import huggingface_hub.constants as hc
    from huggingface_hub import HfApi
    from peft import LoraConfig, get_peft_model
    from sae_lens import SAE, StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    tmp, a, b, g = setup
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=16, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_pre")))
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.1), sae.b_dec.normal_()
    sae.save_model(tmp / "sae")
    get_peft_model(copy.deepcopy(a), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
                   ).save_pretrained(tmp / "ad")
    G = str(tmp / "gauges" / "a2b")
    with HubServer() as hub:
        monkeypatch.setattr(hc, "ENDPOINT", hub.url)
        monkeypatch.setattr(hc, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "cache"))
        api = HfApi(endpoint=hub.url)
        api.create_repo("org/saes")
        api.upload_folder(repo_id="org/saes", folder_path=tmp / "sae", path_in_repo="blocks.1.hook_resid_pre")
        api.upload_folder(repo_id="org/saes", folder_path=tmp / "sae", path_in_repo="blocks.0.hook_resid_pre")
        api.create_repo("org/adapter")
        api.upload_folder(repo_id="org/adapter", folder_path=tmp / "ad")
        assert main(["transport", "org/saes/blocks.1.hook_resid_pre", "--gauge", G, "-o", str(tmp / "sae_b")]) == 0
        assert main(["transport", "org/adapter", "--gauge", G, "--base", "org/gauged", "-o", str(tmp / "ad_b")]) == 0
        assert main(["transport", "org/saes/nope", "--gauge", G, "-o", str(tmp / "x")]) == 2
        got = [p for m, p in hub.log if "/resolve/" in p]
    assert not any("blocks.0" in p for p in got)                         # only the asked-for subfolder
    sae_b = SAE.load_from_disk(tmp / "sae_b")
    assert torch.equal(sae_b.W_dec, g.residual(sae.W_dec))
    assert json.loads((tmp / "ad_b" / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/gauged"


HEAVY = ("torch", "transformers", "huggingface_hub", "numpy", "scipy", "safetensors", "peft", "accelerate")


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["find", "--help"], ["transport", "--help"], []])
def test_help_imports_no_heavy_dependency(argv) -> None:
    """``hf-gauge --help`` (and every subcommand's help) imports none of hf_gauge's heavy dependencies: checked on
    ``sys.modules`` in a fresh interpreter, not by timing."""
    code = ("import sys\nfrom hf_gauge.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert "HEAVY []" in r.stdout, r.stdout[-500:] + r.stderr[-2000:]
    assert ("usage: hf-gauge" in r.stdout + r.stderr) or "hf_gauge 0" in r.stdout


def test_audit_help_through_main(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["audit", "--help"])
    assert e.value.code == 0 and "--n-gauges" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ user errors (issue 11)
def _one_line(err: str) -> str:
    """The single ``error:`` line (progress bars of model loads may precede it; no traceback)."""
    lines = [ln for ln in err.strip().splitlines() if "Loading weights" not in ln]
    assert "Traceback (most recent call last)" not in err and len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def test_user_errors_one_line_status_2(setup, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad JSON data, disk full while writing, a pickled pytorch_model.bin and a plain ValueError: one line, exit 2."""
    import errno
    import pickle

    tmp, a, b, g = setup
    (tmp / "bad.json").write_text("[[1, 2], [3")
    assert main(["find", str(tmp / "A"), str(tmp / "B"), "--data", str(tmp / "bad.json"), "-o", str(tmp / "f")]) == 2
    assert "JSON" in _one_line(capsys.readouterr().err)

    torch.save(torch.randn(a.config.hidden_size), tmp / "v.pt")

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)      # the vector file's write fails: disk full
    assert main(["transport", str(tmp / "v.pt"), "--gauge", str(tmp / "gauges" / "a2b"), "-o", str(tmp / "w.pt")]) == 2
    assert "No space left on device" in _one_line(capsys.readouterr().err)
    monkeypatch.undo()
    assert not list(tmp.glob("*w.pt*"))            # no output, no temp file left

    class Evil:          # a pickle that is not a plain state dict (weights_only loading refuses it)
        def __reduce__(self):
            return (print, ("unpickled!",))
    bad = tmp / "pickled"
    shutil.copytree(tmp / "B", bad)
    for f in bad.glob("*.safetensors"):
        f.unlink()
    (bad / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
    assert main(["verify", str(tmp / "A"), str(bad), "--gauge", str(tmp / "gauges" / "a2b")]) == 2
    out = capsys.readouterr()
    assert "unpickled!" not in out.out
    assert "--debug" not in _one_line(out.err)      # a user error: no hint about a traceback

    import hf_gauge.cli as cli

    def boom(args):
        raise ValueError("invalid literal for int() with base 10: 'x'")
    monkeypatch.setattr(cli, "cmd_show", boom)
    assert main(["show", str(tmp / "gauges" / "a2b")]) == 2
    assert "invalid literal" in _one_line(capsys.readouterr().err)


def test_unexpected_error_hint_and_debug_traceback(setup, capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import hf_gauge.cli as cli
    tmp, *_ = setup

    def bug(args):
        raise KeyError("internal")
    monkeypatch.setattr(cli, "cmd_show", bug)
    assert main(["show", str(tmp / "gauges" / "a2b")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "KeyError" in line and "--debug" in line
    for argv in (["--debug", "show", str(tmp / "gauges" / "a2b")], ["show", str(tmp / "gauges" / "a2b"), "--debug"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_model_loads_never_trust_remote_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every from_pretrained in the package passes trust_remote_code=False explicitly (transformers would otherwise
    ask on stdin for a repository with custom code)."""
    import ast

    import hf_gauge
    import hf_gauge.cli as cli
    seen = {}

    def fake(cls, name, **kw):
        seen.update(kw)
        raise OSError("stop")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(fake))
    with pytest.raises(Exception):
        cli._load_model("org/model")
    assert seen.get("trust_remote_code") is False
    missing = []
    for py in Path(hf_gauge.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(py.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "from_pretrained" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id.startswith("Auto")):
                kws = {k.arg: k.value for k in node.keywords if k.arg}
                for k in node.keywords:
                    if k.arg is None and isinstance(k.value, ast.Dict):
                        kws.update({getattr(kk, "value", None): v for kk, v in zip(k.value.keys, k.value.values)})
                v = kws.get("trust_remote_code")
                if not (isinstance(v, ast.Constant) and v.value is False):
                    missing.append(f"{py.name}:{node.lineno}")
    assert not missing, missing


def test_find_loading_options(setup, capsys: pytest.CaptureFixture) -> None:
    """--dtype / --device-map (accelerate) apply when models are loaded for data; refused where nothing is loaded."""
    tmp, a, b, g = setup
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    (tmp / "ids.json").write_text(json.dumps(ids.tolist()))
    assert main(["find", str(tmp / "A"), str(tmp / "B"), "--data", str(tmp / "ids.json"), "--dtype", "bfloat16",
                 "--device-map", "cpu", "-o", str(tmp / "Gd")]) == 0, capsys.readouterr().err
    assert load_gauge(tmp / "Gd").residual == g.residual
    assert main(["find", str(tmp / "A"), str(tmp / "B"), "--device-map", "auto", "-o", str(tmp / "Gx")]) == 2
    assert "only apply when models are loaded" in capsys.readouterr().err
    assert main(["find", str(tmp / "A"), str(tmp / "B"), "--data", str(tmp / "ids.json"), "--offload-folder",
                 str(tmp / "off"), "-o", str(tmp / "Gy")]) == 2
    assert "needs --device-map" in capsys.readouterr().err


def test_spaces_are_the_spec_families(setup, capsys: pytest.CaptureFixture) -> None:
    """``--spaces`` takes the families the specs declare (no hard-coded list): help lists the registry's families, a
    family the model's spec lacks is refused with the model's own families named, for find (from files) and merge."""
    from hf_gauge.specs import SPECS, space_families

    tmp, a, b, g = setup
    assert set(space_families()) == {t.split(".")[0] for s in SPECS.values() for t in s.spaces}
    parser = build_parser()
    find_help = next(p for n, p in parser._subparsers._group_actions[0].choices.items() if n == "find").format_help()
    assert all(f in find_help for f in space_families())
    for cmd in (["find", str(tmp / "A"), str(tmp / "B")], ["merge", str(tmp / "A"), str(tmp / "B")]):
        assert main([*cmd, "--spaces", "mlp", "experts", "-o", str(tmp / "x")]) == 2
        err = capsys.readouterr().err
        line = err.strip().splitlines()[-1]                 # merge loads the models first (progress bars before it)
        assert "Traceback" not in err and line.startswith("error: spaces=")
        assert "'experts'" in line and str(SPECS["llama"].families) in line, line
        assert not (tmp / "x").exists()
    assert main(["find", str(tmp / "A"), str(tmp / "B"), "--spaces", "mlp", "-o", str(tmp / "x")]) == 0
    assert load_gauge(tmp / "x") == g


# --------------------------------------------------------------------------- issue 27: the CLI as users expect it
def test_max_tokens_caps_the_data_of_find_verify_and_audit(setup, capsys: pytest.CaptureFixture) -> None:
    """``--max-tokens N`` reads whole ``--max-length`` windows up to N tokens (find, verify from one shared option
    builder; audit's alias); verify windows text like find; data options without data are refused."""
    from hf_gauge.cli import audit_parser
    tmp, a, b, g = setup
    _char_tokenizer(tmp / "A")
    text = "The quick brown fox jumps over the lazy dog. " * 10           # 450 tokens
    base = ["find", str(tmp / "A"), str(tmp / "B"), "--text", text, "--max-length", "16", "--no-progress"]
    assert main(base + ["--max-tokens", "40", "-o", str(tmp / "f")]) == 0
    assert load_gauge(tmp / "f").metrics["n_tokens"] == 32                  # two whole windows of 16
    vargs = ["verify", str(tmp / "A"), str(tmp / "B"), "--gauge", str(tmp / "gauges" / "a2b"), "--json"]
    capsys.readouterr()
    assert main(vargs + ["--text", text, "--max-length", "16", "--max-tokens", "40"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 32
    assert main(vargs + ["--text", text, "--max-length", "50"]) == 0       # verify cuts text into windows too
    assert json.loads(capsys.readouterr().out)["tokens"] == (len(text) // 50) * 50
    for cmd in (["find", str(tmp / "A"), str(tmp / "B"), "-o", str(tmp / "x")], vargs):
        assert main(cmd + ["--max-tokens", "40"]) == 2
        assert "--max-tokens only apply to --data/--text" in capsys.readouterr().err
    assert audit_parser().parse_args(["audit", "smollm2", "--max-tokens", "128"]).tokens == 128


def test_find_spaces_all_summary_covers_every_family(setup, capsys: pytest.CaptureFixture) -> None:
    tmp, a, b, g = setup
    assert main(["find", str(tmp / "A"), str(tmp / "B"), "--spaces", "all", "-o", str(tmp / "all")]) == 0
    out = capsys.readouterr().out
    for fam in ("mlp", "attn"):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(f"{fam}:"))
        assert re.fullmatch(rf"  {fam}: 2 spaces, margin min [0-9.e-]+, low-confidence 0", line), line


def test_show_and_push_the_procrustes_output(setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture) -> None:
    """``find --method procrustes`` writes orthogonal_map.*: ``show`` summarizes it (locally and from the Hub) and
    ``push`` publishes it with a card, refusing local model paths."""
    import huggingface_hub.constants as hc

    from hf_gauge.omapio import load_orthogonal_map
    tmp, a, b, g = setup
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    (tmp / "ids.json").write_text(json.dumps(ids.tolist()))
    assert main(["find", str(tmp / "A"), str(tmp / "B"), "--data", str(tmp / "ids.json"), "--method", "procrustes",
                 "--no-progress", "-o", str(tmp / "om")]) == 0
    capsys.readouterr()
    assert main(["show", str(tmp / "om")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("orthogonal map ") and "d=64" in out and "nearest signed permutation" in out
    with HubServer() as hub:
        monkeypatch.setattr(hc, "ENDPOINT", hub.url)
        monkeypatch.setattr(hc, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "cache"))
        push = ["push", str(tmp / "om"), "org/maps", "--path-in-repo", "maps/a2b"]
        assert main(push) == 2
        assert "--source-id" in capsys.readouterr().err                      # A and B are local folders
        assert main(push + ["--source-id", "org/a", "--target-id", "org/b"]) == 0
        files = hub.files("org/maps")
        names = ("orthogonal_map.safetensors", "orthogonal_map.json", "README.md")
        assert {f"maps/a2b/{f}" for f in names} <= set(files)
        assert str(tmp) not in files["maps/a2b/orthogonal_map.json"].decode() + files["maps/a2b/README.md"].decode()
        capsys.readouterr()
        assert main(["show", "org/maps/maps/a2b"]) == 0
        assert "source: model_id=org/a" in capsys.readouterr().out
        ns: dict = {}                                                     # the map card's snippet runs as written
        exec(re.search(r"```python\n(.*?)```", files["maps/a2b/README.md"].decode(), re.S).group(1), ns)
        assert torch.equal(ns["omap"].R, load_orthogonal_map(tmp / "om").R)
    assert torch.equal(load_orthogonal_map(tmp / "om").R, json_free_R(files["maps/a2b/orthogonal_map.safetensors"]))


def json_free_R(data: bytes) -> torch.Tensor:
    from safetensors.torch import load
    return load(data)["R"]


def test_apply_error_names_the_cli_flag(setup, capsys: pytest.CaptureFixture) -> None:
    tmp, *_ = setup
    (tmp / "busy").mkdir()
    (tmp / "busy" / "x").write_text("x")
    assert main(["apply", str(tmp / "A"), "--gauge", str(tmp / "gauges" / "a2b"), "-o", str(tmp / "busy"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "overwrite=True" not in err


def test_show_into_a_closed_pipe_is_quiet(setup) -> None:
    """``hf-gauge show G | head``: the reader closed the pipe before show wrote; no traceback, no error, status 0."""
    tmp, *_ = setup
    r, w = os.pipe()
    os.close(r)                                          # the reader is gone before the first byte is written
    try:
        p = subprocess.run([*script(), "show", str(tmp / "gauges" / "a2b")], stdout=w, stderr=subprocess.PIPE,
                           text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        os.close(w)
    assert p.returncode == 0 and p.stderr == "", p.stderr
