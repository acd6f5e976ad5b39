"""Text an upstream's authorization server (or whoever sends a signed-in person a link) writes,
for the tests of what the connections show and log: a line break forges a log line, an ANSI
escape drives the terminal that reads the log, U+202E turns what follows around, and 10 KB
floods both. It must come out as `bastion.names.readable` shows what others wrote."""

from __future__ import annotations

# A line break, an ANSI escape (red), a right-to-left override, then 10 KB.
HOSTILE = "fine\nINFO forged line \x1b[31mred \u202eexe.txt " + "x" * 10_240
ESCAPED = "fine\\u000aINFO forged line \\u001b[31mred \\u202eexe.txt x"
_RAW = ("\n", "\x1b", "\u202e", "x" * 200)


def assert_escaped_and_cut(text: str, page: bool = False) -> None:
    """``HOSTILE`` is in ``text`` escaped and cut (a page's own HTML has line breaks: there,
    its escaped one shows that the text's was escaped)."""
    for raw in _RAW[page:]:
        assert raw not in text, repr(raw)
    assert ESCAPED in text, text[:400]
    assert "more characters)" in text
