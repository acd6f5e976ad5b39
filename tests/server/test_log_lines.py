"""The server's log writes each message on one line (bastion.server.log_lines): what a message
quotes from elsewhere cannot start a line of the log's own shape."""

from __future__ import annotations

import io
import logging

import pytest

from bastion.server.log_lines import OneLineFormatter, one_line


@pytest.mark.parametrize(
    ("quoted", "written"),
    [
        ("a\nERROR x: forged", "a\\nERROR x: forged"),
        ("a\r\nb", "a\\r\\nb"),
        ("a\u2028b\u2029c", "a\\u2028b\\u2029c"),
        ("\x1b[2Jcleared", "\\x1b[2Jcleared"),
        ("a\x85b\x7fc\x00", "a\\x85b\\x7fc\\x00"),
        ("tab\tkept, caf\u00e9 and \u0645\u0631\u062d\u0628\u0627 too", None),
    ],
)
def test_a_quoted_value_breaks_no_line(quoted, written):
    assert one_line(quoted) == (quoted if written is None else written)


def test_a_record_is_one_line_and_its_traceback_keeps_its_lines():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(OneLineFormatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("bastion.test_log_lines")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("SET keyed %s", "k\nERROR bastion: forged")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed on %s", "x\ny")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "WARNING bastion.test_log_lines: SET keyed k\\nERROR bastion: forged"
    assert lines[1] == "ERROR bastion.test_log_lines: failed on x\\ny"
    assert lines[2] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: boom"
