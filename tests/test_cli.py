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
