"""GFM tables as a real renderer reads them (markdown-it-py's table rule): every row must have its header's cells."""
from __future__ import annotations

import re

_PIPE = re.compile(r"(?<!\\)\|")


def _gfm_cells(line: str) -> int:
    """Cells of one table row as GFM splits it: on every unescaped ``|`` (code spans do not protect a pipe), the
    optional outer pipes removed."""
    s = line.strip()
    s = s[1:] if s.startswith("|") else s
    s = s[:-1] if s.endswith("|") and not s.endswith("\\|") else s
    return len(_PIPE.split(s))


def gfm_tables(markdown: str) -> list[list[list[str]]]:
    """The tables markdown-it-py finds in ``markdown`` (rows of rendered cell texts, header first); ``AssertionError``
    when a source row has more or fewer cells than its header (GFM would drop or pad them, cutting the row)."""
    from markdown_it import MarkdownIt

    tokens = MarkdownIt("commonmark").enable("table").parse(markdown)
    lines = markdown.splitlines()
    tables: list[list[list[str]]] = []
    rows: list[list[str]] | None = None
    for t in tokens:
        if t.type == "table_open":
            start, end = t.map
            header = _gfm_cells(lines[start])
            for i in range(start, end):
                if i != start + 1:                 # the delimiter row
                    assert _gfm_cells(lines[i]) == header, f"GFM row with {_gfm_cells(lines[i])} cells under a " \
                                                           f"header of {header}: {lines[i]!r}"
            rows = []
        elif t.type == "tr_open" and rows is not None:
            rows.append([])
        elif t.type == "inline" and rows:
            rows[-1].append(t.content)
        elif t.type == "table_close" and rows is not None:
            tables.append(rows)
            rows = None
    return tables
