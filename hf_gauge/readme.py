"""A repository's root ``README.md`` as the user wrote it: hf_gauge's marked section found and replaced, every other
byte kept (line endings, trailing blanks, a BOM, YAML comments and quoting, fenced examples).

The section is the lines from a start marker line to the next end marker line (``INDEX_START`` / ``INDEX_END``). A
line is a marker only when the whole line is the marker (column 0; trailing blanks allowed) and it lies outside the
YAML front matter and outside every fenced code block (CommonMark: a run of 3+ backticks or tildes indented at most
three spaces opens a fence, a run of the same character at least as long closes it, an unclosed fence runs to the end
of the file). A marker anywhere else (in a fenced or indented code block, inline, in the metadata) is the user's text.
The file is never re-serialized: bytes are decoded (strict UTF-8), offsets are taken, and the new section is spliced in.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import GaugeError

__all__ = ["INDEX_START", "INDEX_END", "RootReadme", "parse_root_readme"]

INDEX_START = "<!-- hf_gauge:gauges:start -->"
INDEX_END = "<!-- hf_gauge:gauges:end -->"

# huggingface_hub's ``REGEX_YAML_BLOCK`` (what the Hub reads as the metadata header), anchored by ``match``
_FRONT_MATTER = re.compile(r"(\s*---[\r\n]+)([\S\s]*?)([\r\n]+---(\r\n|\n|$))")
_FENCE_OPEN = re.compile(r" {0,3}(`{3,}|~{3,})(.*)")
_LINE = re.compile(r"[^\n]*\n|[^\n]+")


@dataclass(frozen=True)
class RootReadme:
    """A decoded root README: ``text`` (exactly the file, BOM included), the character span of hf_gauge's section
    (``None`` when absent: from the start of the start marker line to the end of the end marker line, its line
    ending excluded), the line ending a new section uses (the file's own: CRLF or LF) and the fence a file without a
    section leaves open at its end (``""`` if none)."""
    text: str
    span: tuple[int, int] | None
    newline: str
    open_fence: str = ""

    def section_lines(self) -> list[str]:
        """The section's lines between the two markers (line endings removed); empty without a section."""
        if self.span is None:
            return []
        body = self.text[self.span[0]:self.span[1]].split("\n")[1:-1]
        return [ln.rstrip("\r") for ln in body]

    def with_section(self, lines: list[str]) -> bytes:
        """The file with the section replaced by ``INDEX_START``, ``lines``, ``INDEX_END`` (appended after a blank
        line when there is none, after a line closing a fence the file leaves open, so that the section is seen as
        hf_gauge's next time); every byte outside the section is the original's."""
        nl = self.newline
        section = nl.join([INDEX_START, *lines, INDEX_END])
        if self.span is not None:
            a, b = self.span
            return (self.text[:a] + section + self.text[b:]).encode("utf-8")
        t = self.text
        if self.open_fence:
            t += ("" if t.endswith("\n") else nl) + self.open_fence + nl
        sep = "" if not t.strip("\ufeff") or t.endswith(("\n\n", "\n\r\n")) else (nl if t.endswith("\n") else nl + nl)
        return (t + sep + section + nl).encode("utf-8")


def _marker(line: str) -> str | None:
    s = line.rstrip(" \t\r\n")
    return s if s in (INDEX_START, INDEX_END) else None


def parse_root_readme(data: bytes, where: str = "README.md") -> RootReadme:
    """Decode and check a root README (``GaugeError`` for text that is not UTF-8 or a metadata header that is not a
    YAML mapping) and locate hf_gauge's section: the first end marker line and the last start marker line before it."""
    import yaml

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GaugeError(f"{where} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); save it as "
                         "UTF-8 before pushing a gauge") from None
    bom = 1 if text.startswith("\ufeff") else 0
    body_at = bom
    m = _FRONT_MATTER.match(text, bom)
    if m:
        try:
            meta = yaml.safe_load(m.group(2))
        except yaml.YAMLError as e:
            raise GaugeError(f"{where} has a metadata header that is not valid YAML "
                             f"({' '.join(str(e).split())[:200]}); fix it before pushing a gauge") from None
        if meta is not None and not isinstance(meta, dict):
            raise GaugeError(f"{where} has a metadata header that is not a YAML mapping (it is a "
                             f"{type(meta).__name__}); fix it before pushing a gauge") from None
        body_at = m.end()
    first = text.find("\n")
    newline = "\r\n" if first > 0 and text[first - 1] == "\r" else "\n"
    fence: tuple[str, int] | None = None          # (character, length) of the open fence
    start = None
    span = None
    for lm in _LINE.finditer(text, body_at):
        line = lm.group().rstrip("\r\n")
        if fence is not None:
            s = line.lstrip(" ")
            if len(line) - len(s) <= 3 and s.rstrip(" \t") == fence[0] * len(s.rstrip(" \t")) \
                    and len(s.rstrip(" \t")) >= fence[1]:
                fence = None
            continue
        fm = _FENCE_OPEN.fullmatch(line)
        if fm and not (fm.group(1)[0] == "`" and "`" in fm.group(2)):
            fence = (fm.group(1)[0], len(fm.group(1)))
            continue
        kind = _marker(line)
        if kind == INDEX_START:
            start = lm.start()
        elif kind == INDEX_END and start is not None:
            span = (start, lm.start() + len(line))
            break
    open_fence = fence[0] * fence[1] if fence is not None and span is None else ""
    return RootReadme(text, span, newline, open_fence)
