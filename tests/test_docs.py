"""The user-facing pages: the walkthrough notebook is committed executed, README and docs/ keep short lines and
valid relative links, and the tables generated from benchmark results are current."""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_walkthrough_notebook_is_committed_valid_and_executed() -> None:
    """Every code cell ran, in order, in one kernel session, and left output; no error, no warning, no path of the
    machine that ran it (tests/test_examples.py runs it again and compares)."""
    import nbformat

    nb = nbformat.read(ROOT / "examples" / "walkthrough.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 4
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    for c in code:
        assert c.outputs, c.source[:80]
        for o in c.outputs:
            assert o.output_type == "stream" and o.name == "stdout", (o.output_type, o.get("name"), c.source[:80])
    text = json.dumps([c.outputs for c in code])
    assert not re.search(r"/(root|home|tmp|work|Users)/", text)


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_no_line_over_400_characters() -> None:
    """README and docs/ are read as text too (terminals, diffs): long narrative belongs in lists, not table cells."""
    long = [f"{p.relative_to(ROOT)}:{i}: {len(ln)}" for p in _pages()
            for i, ln in enumerate(p.read_text().splitlines(), 1) if len(ln) > 400]
    assert long == []


_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def relative_links(text: str) -> list[str]:
    """The targets of markdown links and images that are not URLs or in-page anchors (code spans skipped)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [t for t in _LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:|#", t)]


def test_relative_links_point_to_files() -> None:
    broken = []
    for page in _pages():
        for target in relative_links(page.read_text()):
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists() or ROOT not in path.parents:
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert broken == []


def test_link_finder_sees_links_and_skips_code() -> None:
    text = "[a](docs/x.md) ![f](img.png) [u](https://hf.co) [s](#top) `[c](no.md)`\n```\n[d](no2.md)\n```"
    assert relative_links(text) == ["docs/x.md", "img.png"]


def test_performance_tables_match_the_result_files() -> None:
    """docs/performance.md's generated tables equal what benchmarks/tables.py makes from benchmarks/results/."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_tables", ROOT / "benchmarks" / "tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    page = (ROOT / "docs" / "performance.md").read_text()
    assert tables.render(page) == page, "run: python benchmarks/tables.py"
    stale = page.replace("| **1.20×** |", "| **1.10×** |", 1)          # a hand-edited number is caught
    assert stale != page and tables.render(stale) == page


def _code_block(text: str, after: str, lang: str) -> str:
    i = text.index(after)
    start = text.index(f"```{lang}\n", i) + len(lang) + 4
    return text[start:text.index("```", start)]


def test_readme_quickstart_runs(tmp_path: Path, monkeypatch) -> None:
    """README's Python quickstart, as written, on two tiny gauge-equivalent models named like Hub checkpoints, the
    push going to the local Hub."""
    import copy
    import warnings

    import torch
    from conftest import VOCAB, tiny_model

    import hf_gauge
    from hf_gauge.testing import local_hub

    block = _code_block((ROOT / "README.md").read_text(), "## Quickstart", "python")
    a = tiny_model("llama", seed=0)
    b = copy.deepcopy(a).apply_gauge(hidden := hf_gauge.random_gauge(a, seed=1))
    a.config._name_or_path, b.config._name_or_path = "org/base", "org/finetune"
    v_a = torch.randn(a.config.hidden_size)
    ns = {"model_a": a, "model_b": b, "input_ids": torch.randint(0, VOCAB, (4, 32)), "v_a": v_a}
    monkeypatch.chdir(tmp_path)
    with local_hub() as hub, warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)                     # 128 tokens >= d = 64: no fit warning
        exec(compile(block, "README.md quickstart", "exec"), ns)
        assert "org/my-model" in hub.repos
    assert ns["g"].residual == hidden.residual
    assert torch.equal(ns["v_b"], v_a)                       # A now lives in B's chart: the last fit is the identity
    assert (tmp_path / "gauges" / "a2b" / "gauge.safetensors").is_file()
