"""The sweep of pending requests nobody may answer any more, in a running bastion and a second
one on its database (two replicas, each sweeping): a held call's only approver is disabled
while it waits, and nobody retries, opens or lists it. A sweep closes it (``expired``, one
audit event saying ``no_approver``) within its interval, set small here; a request whose
approver may still answer stays pending. Before, it stayed pending until it expired."""

from __future__ import annotations

import time

import pytest

from tests.approvals.test_agents_acting_as_themselves import call
from tests.approvals.test_unanswerable import RULES, approver
from tests.signals.support import running
from tests.waits import eventually


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    yield from running(
        tmp_path_factory,
        "stranded-sweep",
        RULES,
        replicas=1,
        approvals={"wait_seconds": 0, "stranded_sweep_seconds": 0.2},
    )


def test_a_request_whose_only_approver_is_disabled_is_closed_by_the_sweep_unlooked_at(bastion):
    approver(bastion, "blair", "held-kept")
    approver(bastion, "drew", "held-stranded")
    token = bastion.token("sam", "deskhttp")
    kept, stranded = (
        call(bastion, token, {"query": query})["error"]["data"]
        for query in ("held-kept", "held-stranded")
    )
    assert kept["reason"] == stranded["reason"] == "approval_pending", (kept, stranded)
    bastion.app.state.oauth.store.disable_user("drew", time.time(), actor="test")
    approvals = bastion.app.state.approvals
    swept = eventually(
        lambda: approvals.store.get(stranded["approval_id"]).status != "pending", every=0.05
    )
    assert swept, "no sweep closed the request"
    assert approvals.store.get(stranded["approval_id"]).status == "expired"
    # Two servers sweep it: one closes it, with one audit event.
    (closed,) = approvals.audit.events("approval.expired", request_id=stranded["approval_id"])
    assert closed.detail["reason"] == "no_approver" and "disabled" in closed.detail["why"]
    # Held first, the other was looked at by the same passes: blair may still answer it.
    assert approvals.store.get(kept["approval_id"]).status == "pending"
