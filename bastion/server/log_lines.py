"""One log line per message, whatever text from elsewhere it quotes.

bastion's messages quote what others sent (a transmitter's SET key, an upstream's error, a
provider's answer, a client's name): a line break in such a value would start a line of the
log's own shape (``ERROR bastion.oauth: ...``) that bastion never wrote, for whoever reads or
greps the log (CWE-117). Here every character that breaks a line or moves the terminal (C0
controls but the tab, DEL, C1 controls, U+2028 and U+2029) is written as its escape (``\\n``,
``\\x1b``, ``\\u2028``) in the message of every record of the server's log; a traceback, which
the handler adds after the message, keeps its lines.
"""

from __future__ import annotations

import logging
import re

_BREAKING = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def one_line(message: str) -> str:
    """``message`` with each character that would break its line written as its escape."""
    return _BREAKING.sub(_escape, message) if _BREAKING.search(message) else message


class OneLineFormatter(logging.Formatter):
    """A `logging.Formatter` whose message part is always one line (`one_line`)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = one_line(record.message)
        return super().formatMessage(record)


def configure_logging(level: str) -> None:
    """The server's log: to standard error, ``LEVEL logger: message``, one line a message."""
    handler = logging.StreamHandler()
    handler.setFormatter(OneLineFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
