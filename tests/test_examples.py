"""The README's main command (``hf-gauge demo``) and the example scripts run end to end on real SmolLM2 weights."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)


def test_demo_console_script(tmp_path: Path, smollm2_dir) -> None:
    exe = Path(sys.executable).with_name("hf-gauge")
    r = _run([str(exe), "demo", "--tokens", "256"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert out.count("indices+signs 100.0%") == 4       # data-free and activations, in the log and the table
    assert "bit-exact restore of A: yes" in out and "equal: yes" in out
    assert "effect cosine B_d 1.0000" in out


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_example_runs(script: str, tmp_path: Path, smollm2_dir) -> None:
    r = _run([sys.executable, str(ROOT / "examples" / script)], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_walkthrough_notebook_runs_against_the_local_hub(tmp_path: Path, smollm2_dir,
                                                         monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """examples/walkthrough.ipynb: every code cell executed in order (one namespace, as a kernel would), the push
    going to the local Hub server (the notebook itself names no endpoint)."""
    import json

    import huggingface_hub.constants as hc
    from hub_server import HubServer

    nb = json.loads((ROOT / "examples" / "walkthrough.ipynb").read_text())
    assert nb["nbformat"] == 4
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert len(cells) >= 4 and not any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")
    monkeypatch.chdir(tmp_path)
    with HubServer() as hub:
        monkeypatch.setattr(hc, "ENDPOINT", hub.url)
        monkeypatch.setattr(hc, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "cache"))
        ns: dict = {"__name__": "__main__"}
        for i, src in enumerate(cells):
            exec(compile(src, f"walkthrough.ipynb[code {i}]", "exec"), ns)
        assert "your-name/smollm2-gauges" in hub.repos
    out = capsys.readouterr().out
    assert "recovered the hidden gauge exactly: True" in out and "round trip equal: True" in out
    assert "['gauges/a2b']" in out
    lines = dict(ln.split(": ", 1) for ln in out.splitlines() if ln.startswith(("max |logit", "without")))
    assert float(lines["max |logit difference|, steered A vs steered B"]) < 1e-3
    assert float(lines["without transport"]) > 1.0


def test_readme_figures_exist() -> None:
    """Every image the README shows is a PNG in the repository (the key figures: sign ceiling, trajectory, audit)."""
    import re
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)
    assert {Path(p).stem for p in links} >= {"sign_ceiling", "trajectory", "audit"}
    for p in links:
        f = ROOT / p
        assert f.is_file() and f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p
