"""Package metadata: building hf_gauge prints no deprecation warnings from its own pyproject.toml."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_metadata_has_no_deprecations():
    pytest.importorskip("setuptools")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), str(ROOT / "pyproject.toml"))
    msgs = [str(w.message) for w in caught if "deprecat" in str(w.message).lower()]
    assert not msgs, msgs
    assert dist.metadata.license_expression == "Apache-2.0"
    for f in dist.metadata.license_files:
        assert (ROOT / f).is_file() and "Apache License" in (ROOT / f).read_text()[:200]


def test_compat_is_an_attribute_after_import_hf_gauge():
    """``hf_gauge.compat.import_repeng`` as the README writes it, in a fresh interpreter (no explicit submodule
    import), and ``compat`` is listed by ``dir(hf_gauge)``."""
    import os
    import subprocess
    import sys
    code = "import hf_gauge; assert callable(hf_gauge.compat.import_repeng); assert 'compat' in dir(hf_gauge)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
