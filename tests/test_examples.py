"""The README's main command (``hf-gauge demo``) and the example scripts run end to end on real SmolLM2 weights."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _run(args: list[str], tmp_path: Path, **env_extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env_extra}
    return subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)


def test_demo_console_script(tmp_path: Path, smollm2_dir) -> None:
    """``make demo`` as a newcomer runs it (the defaults), UserWarnings as errors, no warning shown: the demo's own
    fit must not warn (it once fed 512 tokens to a width of 576 and printed "the match can be chance")."""
    exe = Path(sys.executable).with_name("hf-gauge")
    r = _run([str(exe), "demo"], tmp_path, PYTHONWARNINGS="error::UserWarning")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Warning" not in r.stderr, r.stderr[-2000:]
    out = r.stdout
    assert "(1024 tokens)" in out
    assert out.count("indices+signs 100.0%") == 4       # data-free and activations, in the log and the table
    assert "bit-exact restore of A: yes" in out and "equal: yes" in out
    assert "effect cosine B_d 1.0000" in out


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_example_runs(script: str, tmp_path: Path, smollm2_dir) -> None:
    """Each script runs and removes what it wrote to temporary folders (example 03 once left 1.1 GB behind)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = _run([sys.executable, str(ROOT / "examples" / script)], tmp_path, TMPDIR=str(tmp))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    left = [p.name for p in tmp.iterdir() if not p.name.startswith("torchinductor_")]   # torch's own compile cache
    assert left == [] and [p.name for p in tmp_path.iterdir()] == ["tmp"]


def _floats_masked(nb) -> list[str]:
    """Each code cell's text output, joined (the kernel splits a cell's stdout into stream messages as its flushes
    happen to fall), with every decimal number masked (floats from BLAS reductions vary in their last digits)."""
    import re
    return [re.sub(r"\d+\.\d+(e[-+]?\d+)?", "#", "".join("".join(o.get("text", "")) for o in c.outputs))
            for c in nb.cells if c.cell_type == "code"]


def test_walkthrough_notebook_executes_offline(tmp_path: Path, smollm2_dir) -> None:
    """examples/walkthrough.ipynb run top to bottom by a Jupyter kernel (nbclient), as `jupyter execute` runs it:
    no error, the push goes to the local Hub the notebook starts itself, and the outputs stored in the repository
    are what it prints now (numbers masked)."""
    import nbclient
    import nbformat

    committed = nbformat.read(ROOT / "examples" / "walkthrough.ipynb", as_version=4)
    nb = nbformat.read(ROOT / "examples" / "walkthrough.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    out = "".join("".join(o.get("text", "")) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "recovered the hidden gauge exactly: True" in out and "round trip equal: True" in out
    assert "['gauges/a2b']" in out and "# Gauge: HuggingFaceTB/SmolLM2-135M-Instruct" in out
    lines = dict(ln.split(": ", 1) for ln in out.splitlines() if ln.startswith(("max |logit", "without")))
    assert float(lines["max |logit difference|, steered A vs steered B"]) < 1e-3
    assert float(lines["without transport"]) > 1.0
    assert _floats_masked(nb) == _floats_masked(committed), "re-run: jupyter execute --inplace examples/walkthrough.ipynb"
    assert list(tmp_path.iterdir()) == []                             # it writes nothing where it runs


def test_readme_figures_exist() -> None:
    """Every image the README shows is a PNG in the repository (the key figures: sign ceiling, trajectory, audit)."""
    import re
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)
    assert {Path(p).stem for p in links} >= {"sign_ceiling", "trajectory", "audit"}
    for p in links:
        f = ROOT / p
        assert f.is_file() and f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p
