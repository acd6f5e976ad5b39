"""Identifiers people type on a command line never start with "-" (argparse reads it as an
option: `bastion alerts show -R41EGQh4W-MnYHu` failed once in CI)."""

from __future__ import annotations

from bastion import ids


def test_an_id_that_would_start_with_a_dash_is_drawn_again(monkeypatch):
    drawn = iter(["-R41EGQh4W-MnYHu", "--x", "R41EGQh4W-MnYHu"])
    monkeypatch.setattr(ids.secrets, "token_urlsafe", lambda nbytes: next(drawn))
    assert ids.typed_id(12) == "R41EGQh4W-MnYHu"


def test_alert_and_approval_ids_are_typed_ids(monkeypatch):
    from bastion.approvals.store import new_request_id
    from bastion.signals import alerts

    drawn = iter(["-a", "b", "-c", "d"])
    monkeypatch.setattr(ids.secrets, "token_urlsafe", lambda nbytes: next(drawn))
    assert new_request_id() == "b"
    assert alerts.typed_id is ids.typed_id and ids.typed_id(12) == "d"
