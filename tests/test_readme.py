"""The root README splice: hf_gauge's marked section found outside fences and the front matter, every other byte
kept (issue 23.4). The same properties through a real push to the local fake Hub are in test_hub.py."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_gauge import GaugeError
from hf_gauge.readme import INDEX_END, INDEX_START, parse_root_readme

# ------------------------------------------------------------------------------------------------ README strategy
_WORDS = st.text(st.sampled_from(list("abc XYZ#*_.,:é中🙂\t|")), max_size=20)
_EOL = st.sampled_from(["\n", "\r\n", "  \n", " \t\r\n"])          # LF, CRLF, trailing blanks before either
_YAML = ["license: mit  # the licence\n", 'tags: [a, "b c", \'d\']\n', "base_model: 'org/x'\n",
         "# a comment line\n", "datasets:\n- x   # trailing\n-   y\n", 'pipeline_tag: "text-generation"\n',
         "extra: {k: [1, 2], q: 'a # not a comment'}\n", "empty:\n"]
_MARKER = st.sampled_from([INDEX_START, INDEX_END, INDEX_START + "  ", INDEX_END + "\t"])


@st.composite
def _line(draw) -> str:
    return draw(_WORDS).lstrip(" \t") + draw(_EOL)


@st.composite
def _fenced(draw) -> str:
    """A fenced code block (``` or ~~~, indented 0-3 spaces) showing the markers: the user's text."""
    ch, n, ind = draw(st.sampled_from("`~")), draw(st.integers(3, 5)), " " * draw(st.integers(0, 3))
    inner = draw(st.lists(st.one_of(_line(), _MARKER.map(lambda m: m + "\n"),
                                    st.sampled_from(["```\n", "~~~~~~\n", "`` `\n"]) .filter(lambda f: ch not in f)),
                          max_size=6))
    if draw(st.booleans()):
        inner = [INDEX_START + "\n", draw(_line()), INDEX_END + "\r\n"] + inner
    info = draw(st.sampled_from(["", "html", "markdown title"]))
    close = ch * (n + draw(st.integers(0, 2)))
    return ind + ch * n + info + "\n" + "".join(inner) + " " * draw(st.integers(0, 3)) + close + draw(_EOL)


@st.composite
def _block(draw) -> str:
    return draw(st.one_of(
        _line(), _fenced(),
        _MARKER.map(lambda m: "    " + m + "\n"),                       # an indented code block
        _MARKER.map(lambda m: f"Write `{m}` in your card.\n"),           # inline
        st.just("\n"), st.just("# Title\r\n")))


@st.composite
def readmes(draw, front_matter: bool = True, open_fence: bool = True) -> str:
    """A user's README: BOM, YAML front matter with comments/quotes/flow lists, fenced markers, CRLF, no final EOL."""
    text = "\ufeff" if draw(st.booleans()) else ""
    if front_matter and draw(st.booleans()):
        eol = draw(st.sampled_from(["\n", "\r\n"]))
        yaml = "".join(draw(st.lists(st.sampled_from(_YAML), max_size=5)))
        text += "---" + eol + yaml.replace("\n", eol) + "---" + eol
    text += "".join(draw(st.lists(_block(), max_size=8)))
    if open_fence and draw(st.integers(0, 3)) == 0:             # a fence left open at the end of the file
        text += draw(st.sampled_from(["```\n", "  ~~~~ x\r\n"])) + draw(_MARKER) + "\n"
    if draw(st.booleans()):
        text = text.rstrip("\r\n")
    return text


# ------------------------------------------------------------------------------------------------ properties
@settings(max_examples=150, deadline=None)
@given(readmes(), st.lists(st.text(st.sampled_from("ab|`"), max_size=5).map(lambda t: "| " + t), max_size=3))
def test_section_appended_and_every_user_byte_kept(user: str, rows: list[str]) -> None:
    r = parse_root_readme(user.encode())
    assert r.span is None and r.section_lines() == []          # markers in fences / indented / inline are the user's
    out = r.with_section(rows).decode()
    assert out.startswith(user)                                  # every byte the user wrote, BOM and CRLF included
    a, b = out.index(INDEX_START, len(user)), out.rindex(INDEX_END) + len(INDEX_END)
    closing = r.open_fence + r.newline if r.open_fence else ""  # a fence the user left open is closed first
    assert out[len(user):a].lstrip("\r\n").strip("\r\n") == closing.strip("\r\n") and out[b:] == r.newline
    again = parse_root_readme(out.encode())
    assert again.section_lines() == rows                         # found back, rows intact
    out2 = again.with_section(["x"]).decode()                    # a second push replaces only the section
    assert out2 == out[:a] + r.newline.join([INDEX_START, "x", INDEX_END]) + out[b:]


@settings(max_examples=150, deadline=None)
@given(readmes(open_fence=False), readmes(front_matter=False), st.sampled_from(["\n", "\r\n"]))
def test_section_in_the_middle_replaced_in_place(head: str, tail: str, eol: str) -> None:
    head = head.rstrip("\r\n") + "\n" if head.rstrip("\r\n\ufeff") else head
    tail = tail.lstrip("\ufeff")
    old = eol.join([INDEX_START, "## Gauges", "| [`gauges/a`](gauges/a) | old |", INDEX_END])
    user = head + old + eol + tail
    r = parse_root_readme(user.encode())
    assert r.section_lines() == ["## Gauges", "| [`gauges/a`](gauges/a) | old |"]
    out = r.with_section(["new"]).decode()
    assert out == head + r.newline.join([INDEX_START, "new", INDEX_END]) + eol + tail


def test_crlf_file_gets_a_crlf_section_and_markers_need_a_whole_line() -> None:
    user = "# T\r\n\r\nsee <!-- hf_gauge:gauges:start --> here\r\n~~~~\r\n" + INDEX_START + "\r\nkeep ~~~\r\n"
    r = parse_root_readme(user.encode())                 # an unclosed fence runs to the end: closed before the section
    assert r.span is None and r.open_fence == "~~~~"
    out = r.with_section(["row"])
    assert out == (user + "~~~~\r\n\r\n" + INDEX_START + "\r\nrow\r\n" + INDEX_END + "\r\n").encode()
    assert parse_root_readme(out).section_lines() == ["row"]                 # found next time, not appended again
    no_eol = parse_root_readme(b"```py\nx = 1").with_section(["r"])
    assert no_eol == ("```py\nx = 1\n```\n\n" + INDEX_START + "\nr\n" + INDEX_END + "\n").encode()
    dup = parse_root_readme((INDEX_START + "\nstray start\n" + INDEX_START + "\nours\n" + INDEX_END + "\n").encode())
    assert dup.section_lines() == ["ours"]                      # an unpaired start of the user's is kept


@pytest.mark.parametrize("data, match", [
    (b"# caf\xe9\n", r"not UTF-8 text \(byte 0xe9 at offset 5\)"),
    (b"---\nlicense: [mit\n---\n# x\n", "not valid YAML"),
    (b"---\n- a\n- b\n---\n# x\n", "not a YAML mapping"),
    (b"\xef\xbb\xbf---\na: b\n  c: d\n---\n", "not valid YAML"),
])
def test_bad_readme_is_a_gauge_error(data: bytes, match: str) -> None:
    with pytest.raises(GaugeError, match=match):
        parse_root_readme(data, "the README.md of org/x")
