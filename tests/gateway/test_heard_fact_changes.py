"""A gateway message is decided only once every fact change its process has heard of is applied
(`Replica.heard_not_applied`): while the change log cannot be read after a notice, the message
waits ``consistency_timeout`` and is refused as on stale facts, never decided on facts the
process knows to be out of date; once the log is read again, calls go through."""

from __future__ import annotations

import time

from bastion.policy.parser import parse_fact
from tests.gateway.streams import messages, modern_headers, modern_request
from tests.gateway.support import start
from tests.waits import reads_held

SEARCH = {"name": "search_customers", "arguments": {"query": "a"}}


def call(bastion, token) -> dict:
    response = bastion.http.post(
        bastion.mcp_url("deskhttp"),
        json=modern_request(1, "tools/call", SEARCH),
        headers=modern_headers(token, "tools/call", SEARCH["name"]),
    )
    assert response.status_code == 200, response.text
    return messages(response)[-1]


def test_a_message_waits_for_a_fact_change_its_process_heard_of(tmp_path):
    with start(tmp_path) as bastion:
        token = bastion.token("sam", "deskhttp")
        assert "result" in call(bastion, token)
        replica = bastion.app.state.replica
        with reads_held(replica):
            # A change committed (by another process, say), and heard of as a commit's notice
            # (PostgreSQL) is; the log is not read meanwhile. Without the commit, SQLite's
            # data_version would rightly confirm the replica current without reading the log.
            bastion.store.apply([parse_fact('has_role(User{"kim"}, "member", Team{"support"})')])
            replica.noticed = time.monotonic()
            refused = call(bastion, token)
            assert refused["error"]["data"]["reason"] == "facts_stale", refused
        assert "result" in call(bastion, token)
