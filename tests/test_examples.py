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
