"""The authorization server on each database bastion supports: SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from bastion.oauth import InvalidToken

from .support import running_bastion


def test_code_flow_refresh_replay_and_revocation_on_each_database(database_url, tmp_path):
    with running_bastion(database_url, tmp_path) as bastion:
        client = bastion.register()
        code, verifier = bastion.code_for(client)
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": client["redirect_uris"][0],
            "code_verifier": verifier,
            "client_id": client["client_id"],
        }
        first = bastion.token(**form).json()
        assert (
            bastion.server.verifier.verify(first["access_token"], bastion.resource).subject
            == "alice"
        )
        refresh = {"grant_type": "refresh_token", "client_id": client["client_id"]}
        second = bastion.token(**refresh, refresh_token=first["refresh_token"]).json()
        bastion.server.verifier.verify(second["access_token"], bastion.resource)
        # Reusing the first refresh token kills the grant, on every backend.
        assert bastion.token(**refresh, refresh_token=first["refresh_token"]).status_code == 400
        with pytest.raises(InvalidToken, match="revoked"):
            bastion.server.verifier.verify(second["access_token"], bastion.resource)
        # A replayed code fails too.
        assert bastion.token(**form).json()["error"] == "invalid_grant"
        # Housekeeping runs on each backend and keeps the consented grant.
        bastion.clock.advance(bastion.server.settings.refresh_token_seconds + 7200)
        bastion.server.housekeeping()
        rows = bastion.rows()
        assert rows["oauth_refresh_tokens"] == [] and len(rows["oauth_grants"]) == 1
