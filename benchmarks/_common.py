"""Helpers shared by the benchmark scripts: timing, results files, environment description."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict[str, Any]:
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version()}


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``results/<name>.json`` atomically."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "date": _dt.date.today().isoformat(), "environment": environment()}
    out = RESULTS / f"{name}.json"
    fd, tmp = tempfile.mkstemp(dir=RESULTS, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, out)
    return out
