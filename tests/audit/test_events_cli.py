"""``bastion audit events`` on a terminal: each recorded value shown escaped exactly once.

A record holds text others wrote either as it came (a user's answer) or as
`bastion.names.readable` already showed it where it was taken in (an upstream authorization
server's refusal, a tool's changed description, a provider's error at the login callback). The
command line shows either one escaped once: never the raw character, which would forge a line
or drive the terminal, and never an escape escaped again (``\\\\u001b``), which reads as text
the record does not hold."""

from __future__ import annotations

from bastion.audit.log import AuditLog
from bastion.cli import main
from bastion.db import Database
from bastion.names import readable


def test_each_recorded_value_is_shown_escaped_once(tmp_path, capsys):
    path = str(tmp_path / "audit.db")
    db = Database(path)
    AuditLog(db).record(
        "connection.upstream_revocation",
        subject="alice",
        upstream="tracker",
        outcome="failed: invalid_request: " + readable("down\n\x1b[31m"),  # escaped as taken in
        answer="as it came\nnext \x1b[2J line",  # raw
        changes=["description: " + readable("tool\x1b]0;x") + " -> quiet"],  # escaped lines
        context={"note": "nested\nline \x1b"},  # raw, inside a JSON value
    )
    db.close()
    capsys.readouterr()
    assert main(["audit", "events", "--database", path]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.endswith("\n"), out
    assert "\x1b" not in out
    assert "\\\\u" not in out, out  # nothing escaped twice
    for shown in (
        "down\\u000a\\u001b[31m",
        "as it came\\u000anext \\u001b[2J line",
        "tool\\u001b]0;x",
        "nested\\u000aline \\u001b",
    ):
        assert shown in out, (shown, out)
