"""A gateway message is decided only once every fact change its process has heard of is applied
(`Replica.heard_not_applied`): while the change log cannot be read after a notice, the message
waits ``consistency_timeout`` and is refused as on stale facts, never decided on facts the
process knows to be out of date; once the log is read again, calls go through."""

from __future__ import annotations

import threading
import time

from bastion.policy.parser import parse_fact
from tests.gateway.streams import messages, modern_headers, modern_request
from tests.gateway.support import start
from tests.waits import PATIENCE, eventually_async, reads_held

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


def test_a_message_waits_for_a_change_being_added_and_the_gateway_goes_on(tmp_path, monkeypatch):
    """A change added to the facts in force on a worker thread, under their lock
    (`Replica.in_force`): a gateway message that arrives meanwhile waits for it, then is decided;
    the server answers other requests meanwhile (its event loop is not held)."""
    from bastion.facts.index import FactIndex
    from bastion.server import replica as replica_module

    monkeypatch.setattr(replica_module, "_CHECKED_ON_LOOP", 2)
    monkeypatch.setattr(replica_module, "_BUILT_ASIDE", 10**9)
    armed, adding, resume = threading.Event(), threading.Event(), threading.Event()
    add_all = FactIndex.add_all

    def held_add_all(self, inserts, shared=False):
        if shared and armed.is_set() and not adding.is_set():  # the change's facts
            adding.set()
            assert resume.wait(PATIENCE)
        return add_all(self, inserts, shared)

    monkeypatch.setattr(FactIndex, "add_all", held_add_all)
    with start(tmp_path) as bastion:
        token = bastion.token("sam", "deskhttp")
        assert "result" in call(bastion, token)
        armed.set()
        members = [
            parse_fact(f'has_role(User{{"kim{i}"}}, "member", Team{{"support"}})') for i in range(5)
        ]
        bastion.store.apply(members)
        assert adding.wait(PATIENCE)
        answers: list[dict] = []
        calling = threading.Thread(target=lambda: answers.append(call(bastion, token)))
        calling.start()
        assert bastion.http.get(f"{bastion.url}/healthz").status_code == 200
        calling.join(0.2)
        assert calling.is_alive() and not answers  # waiting for the change
        resume.set()
        calling.join(PATIENCE)
        assert "result" in answers[0], answers
        held = set(bastion.app.state.replica.authz.facts)
        assert all(m in held for m in members)


def test_a_decision_and_a_list_filter_wait_for_a_change_being_put_in_force():
    """`Enforcer.decide` asks `facts_in_force` again right before it decides (a change can begin
    while its counters or labels are read), and `Enforcer.settled` (before a list is filtered,
    after the upstream answered) waits for such a change too."""
    import asyncio

    from bastion import Authorizer
    from bastion.facts.model import Entity
    from bastion.gateway.enforce import Caller, Enforcer

    authz = Authorizer(
        'actor User {}\nactor Agent {}\nresource Tool {}\nallow(_, "call", _: Tool);'
    )
    caller = Caller("sam", "bot", frozenset(), "127.0.0.1", "2025-11-25")

    async def scenario() -> str:
        change = asyncio.get_running_loop().create_future()
        awaited: list[None] = []  # once for each caller that waits for the change

        class Change:
            """The change being put in force, noted as it is waited for."""

            def __await__(self):
                awaited.append(None)  # in the step that suspends on it
                return (yield from asyncio.shield(change).__await__())

        enforcer = Enforcer(
            lambda: authz, None, facts_in_force=lambda: None if change.done() else Change()
        )
        context = enforcer.context(caller, "desk", "tools/call")
        tool = Entity("Tool", "desk/search")
        deciding = asyncio.ensure_future(
            enforcer.decide(caller, "desk", "tools/call", "call", tool, context, {})
        )
        settling = asyncio.ensure_future(enforcer.settled())
        # Both wait for the change, or one has gone on without it (then it ends, and is seen).
        assert await eventually_async(
            lambda: deciding.done() or settling.done() or len(awaited) == 2
        ), "neither waited for the change nor ended"
        assert not deciding.done() and not settling.done()
        change.set_result(None)
        await settling
        return (await deciding).record["result"]

    assert asyncio.run(scenario()) == "allow"


def test_a_streams_notification_is_decided_on_the_facts_in_force_after_its_connect_decision():
    """`Gateway.may_hear` decides ``connect`` again (which can wait), then whether the resource's
    update may be heard: on the `Authorizer` in force then, not on the one before the wait. The
    gateway around it is stubbed (its token check and connect decision): only the order of the
    two decisions is under test."""
    import asyncio
    from types import SimpleNamespace

    from bastion import Authorizer
    from bastion.gateway.enforce import Caller, Enforcer
    from bastion.gateway.gateway import Gateway
    from bastion.gateway.sessions import Listener, read_decision

    types = "actor User {}\nactor Agent {}\nresource McpResource {}\n"
    readable = Authorizer(types + 'allow(_, "read", _: McpResource);')
    in_force = [readable]
    enforcer = Enforcer(lambda: in_force[0], None)

    async def decide(*args, **kwargs):
        in_force[0] = Authorizer(types)  # a change put in force while it waited: no read now
        return SimpleNamespace(record={})

    async def verify_token(*args):
        return None

    recorded = []
    enforcer.decide, enforcer.write = decide, lambda record: None
    enforcer.record_heard = lambda *args: recorded.append(args[-2])  # heard or not
    gateway = SimpleNamespace(
        verify_token=verify_token, enforcer=enforcer, _connect_needs_deciding=lambda *a: True
    )
    gateway._stream_token_valid = lambda listener: Gateway._stream_token_valid(gateway, listener)
    caller = Caller("sam", "bot", frozenset(), "127.0.0.1", "2025-11-25")
    listener = Listener(None, "desk", caller, "token", frozenset(), frozenset({"notes/a"}))
    method = "notifications/resources/updated"
    heard = asyncio.run(Gateway.may_hear(gateway, listener, method, "notes/a"))
    assert heard is False and recorded == [False] and listener.withheld == {"notes/a"}
    # Before the change it could be heard: what refused it is the change.
    context = enforcer.context(caller, "desk", method)
    assert read_decision(readable, caller, "desk", "notes/a", context, time.time)[2] is True
