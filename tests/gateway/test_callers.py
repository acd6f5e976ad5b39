"""The gateway's `Caller` of a request is made once for a token's verified facts, the address,
the protocol version, the session and the posture, and given again for the same ones
(`StreamableHttpEndpoint._caller`): any of them that differs makes another, with its own values,
and the memory is bounded. The token is still verified on every request before this (its
revocation included: tests/gateway/test_revocation.py)."""

from __future__ import annotations

from types import SimpleNamespace

import anyio

import bastion.gateway.transport as transport
from bastion.delegation.labels import LabelKey, LocalLabels
from bastion.gateway.enforce import label_key
from bastion.gateway.transport import StreamableHttpEndpoint
from bastion.oauth.verifier import VerifiedToken
from bastion.signals.posture import PostureSettings


def verified(subject="sam", client="agent-1", agents=(), claims=None, task=None) -> VerifiedToken:
    return VerifiedToken(
        subject=subject,
        client_id=client,
        scopes=frozenset({"customers:read"}),
        audience=("http://bastion/mcp/desk",),
        jti="j-" + subject + client,
        issued_at=1000,
        expires_at=2000,
        grant_id="g-" + subject,
        claims=claims if claims is not None else {"iat": 1000},
        agents=agents,
        task=task,
    )


def endpoint(**posture) -> StreamableHttpEndpoint:
    settings = PostureSettings.from_mapping(posture)
    return StreamableHttpEndpoint(SimpleNamespace(posture=settings))  # type: ignore[arg-type]


HEADERS = {"mcp-protocol-version": "2026-07-28", "mcp-session-id": "s1"}


def test_the_same_request_gets_the_same_caller():
    ep, token = endpoint(), verified()
    first = ep._caller(token, "127.0.0.1", dict(HEADERS))
    assert ep._caller(token, "127.0.0.1", dict(HEADERS)) is first
    assert (first.subject, first.client_id, first.address) == ("sam", "agent-1", "127.0.0.1")
    assert (first.protocol_version, first.session_id, first.grant_id) == (
        "2026-07-28",
        "s1",
        "g-sam",
    )
    assert [repr(p) for p in first.principals] == ['User{"sam"}', 'Agent{"agent-1"}']


def test_anything_that_differs_makes_another_caller_with_its_own_values():
    ep, token = endpoint(device_header="x-device", trusted_proxies=["127.0.0.1/32"]), verified()
    first = ep._caller(token, "127.0.0.1", dict(HEADERS))
    # Another token with the same facts: its own caller, equal to the first.
    again = ep._caller(verified(), "127.0.0.1", dict(HEADERS))
    assert again is not first and again == first
    others = {
        "another agent": ep._caller(verified(client="agent-2"), "127.0.0.1", dict(HEADERS)),
        "a delegated chain": ep._caller(
            verified(agents=("agent-0", "agent-1")), "127.0.0.1", dict(HEADERS)
        ),
        "another address": ep._caller(token, "10.0.0.7", dict(HEADERS)),
        "another version": ep._caller(
            token, "127.0.0.1", {**HEADERS, "mcp-protocol-version": "2025-11-25"}
        ),
        "another session": ep._caller(token, "127.0.0.1", {**HEADERS, "mcp-session-id": "s2"}),
        "another posture": ep._caller(token, "127.0.0.1", {**HEADERS, "x-device": "laptop-9"}),
    }
    for what, caller in others.items():
        assert caller is not first and caller != first, what
    assert others["another agent"].client_id == "agent-2"
    assert [repr(p) for p in others["a delegated chain"].principals] == [
        'User{"sam"}',
        'Agent{"agent-0"}',
        'Agent{"agent-1"}',
    ]
    assert others["another address"].address == "10.0.0.7"
    assert others["another version"].protocol_version == "2025-11-25"
    assert others["another session"].session_id == "s2"
    assert others["another posture"].posture.device_id == "laptop-9"
    assert first.posture.device_id is None
    # Two addresses that are no IP (a Unix socket's peer, say) have the same posture: the
    # address itself tells their callers apart.
    a, b = (ep._caller(token, name, dict(HEADERS)) for name in ("peer-a", "peer-b"))
    assert a.posture is b.posture and (a.address, b.address) == ("peer-a", "peer-b")
    # And the first is still given for its own request.
    assert ep._caller(token, "127.0.0.1", dict(HEADERS)) is first


def test_a_token_bound_to_a_task_gets_the_tasks_label_set_not_its_agents_untasked_one():
    ep = endpoint()
    tasked = ep._caller(verified(task="task-1"), "127.0.0.1", dict(HEADERS))
    untasked = ep._caller(verified(), "127.0.0.1", dict(HEADERS))
    assert tasked.task == "task-1" and untasked.task == ""
    assert label_key(tasked) == LabelKey("sam", "agent-1", "task-1")
    assert label_key(untasked) == LabelKey("sam", "agent-1")
    # What the agent was shown under the task is not in its untasked set.
    labels = LocalLabels()
    anyio.run(labels.record, [label_key(tasked)], ["pii"])
    assert labels.current(label_key(untasked)) == []
    assert labels.current(label_key(tasked)) == ["pii"]


def test_the_callers_kept_are_bounded(monkeypatch):
    monkeypatch.setattr(transport, "_CALLERS", 3)
    ep = endpoint()
    tokens = [verified(subject=f"u{i}") for i in range(5)]
    for token in tokens:
        ep._caller(token, "127.0.0.1", dict(HEADERS))
        assert len(ep._callers) <= 3
    assert ep._caller(tokens[-1], "127.0.0.1", dict(HEADERS)).subject == "u4"
