"""Whose decision records a key reads (`GET /v1/decisions/{id}` and its explanation), on a real
``bastion serve``: its own, whichever API it asked through; every record only with ``admin``.

Several services (PEPs) may share one bastion, each with its own key, and a record keeps what
the service asked, its ``context`` included (which a PEP fills with its own users' data). Ids are
the process's prefix and a count, so one id of its own tells a key every other id: another key's
record must be answered exactly as an id no record holds, or the ids could be probed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from tests.server.conftest import ServerProcess, entity, role

SECRET = {"patient": "Ada Lovelace", "diagnosis": "confidential"}
ALLOWED = {"actor": "User:alice", "action": "read", "resource": "Repo:anvil"}


@pytest.fixture
def server(served, tmp_path) -> Iterator[ServerProcess]:
    started = served(str(tmp_path / "bastion.db"))
    with started.client() as admin:
        admin.post("/v1/facts", json={"facts": [role("alice", "reader", "Repo", "anvil")]})
    yield started


def key(server: ServerProcess, name: str, *scopes: str) -> httpx.Client:
    with server.client() as admin:
        created = admin.post("/v1/keys", json={"name": name, "scopes": list(scopes)})
        assert created.status_code == 201, created.text
    return httpx.Client(
        base_url=server.url,
        headers={"authorization": f"Bearer {created.json()['key']}"},
        timeout=60,
    )


def direct_answers(http: httpx.Client) -> int:
    found = re.search(r"^bastion_direct_answers_total (\S+)$", http.get("/metrics").text, re.M)
    assert found, "no bastion_direct_answers_total in /metrics"
    return int(float(found[1]))


def decide_everywhere(http: httpx.Client) -> list[str]:
    """The ids of decisions the key asks through each API that records one, with ``SECRET`` in
    the context of those that keep one: /v1 (through the application and in the protocol),
    AuthZEN (one and a batch), and Oso Cloud's API (whose answer names no id: found by walking)."""

    def post(path: str, body: dict) -> httpx.Response:
        answer = http.post(path, json=body)
        assert answer.status_code == 200, answer.text
        return answer

    ids = []
    before = direct_answers(http)
    for _ in range(2):  # the first through the application; once the key is known, the protocol
        ids.append(post("/v1/authorize", {**ALLOWED, "context": SECRET}).json()["decision_id"])
    assert direct_answers(http) > before, "no decision was answered in the protocol"
    batch = post("/v1/authorize/batch", {"checks": [ALLOWED], "context": SECRET}).json()
    ids += [r["decision_id"] for r in batch["results"]]
    chain = {"principals": ["User:alice"], "action": "read", "resource": "Repo:anvil"}
    ids.append(post("/v1/authorize", {**chain, "context": SECRET}).json()["decision_id"])
    alice = entity("User", "alice")
    listed = {"actor": alice, "action": "read", "resource_type": "Repo", "context": SECRET}
    ids.append(post("/v1/list", listed).json()["decision_id"])
    acts = {"actor": alice, "resource": entity("Repo", "anvil"), "context": SECRET}
    ids.append(post("/v1/actions", acts).json()["decision_id"])
    query = {"predicate": "has_permission", "args": [alice, "read", {"var": "r"}]}
    ids.append(post("/v1/query", query).json()["decision_id"])
    question = {
        "subject": alice,
        "action": {"name": "read"},
        "resource": entity("Repo", "anvil"),
        "context": SECRET,
    }
    ids.append(post("/access/v1/evaluation", question).headers["X-Bastion-Decision-Id"])
    many = post("/access/v1/evaluations", {**question, "evaluations": [{}, {}]})
    first, last = many.headers["X-Bastion-Decision-Ids"].split("..")
    prefix, start = first.rsplit("-", 1)
    ids += [first, last]
    oso = {
        "actor_type": "User",
        "actor_id": "alice",
        "action": "read",
        "resource_type": "Repo",
        "resource_id": "anvil",
    }
    post("/api/authorize", oso)
    # The Oso Cloud decision is the next of the count (nothing else decides meanwhile).
    ids.append(f"{prefix}-{int(last.rsplit('-', 1)[1]) + 1}")
    return ids


def unknown(http: httpx.Client, decision_id: str, path: str = "") -> tuple[int, dict]:
    """What the key is answered for an id of this process that no record holds, as if it
    were ``decision_id``."""
    prefix = decision_id.rsplit("-", 1)[0]
    made_up = f"{prefix}-999999999"
    answer = http.get(f"/v1/decisions/{made_up}{path}")
    body = answer.text.replace(made_up, decision_id)
    return answer.status_code, httpx.Response(200, content=body).json()


def test_a_key_cannot_read_or_explain_another_keys_decisions_by_id_or_by_walking_the_ids(server):
    with (
        key(server, "pep-a", "decide", "facts:read", "authzen", "oso:read") as a,
        key(server, "pep-b", "decide", "facts:read") as b,
    ):
        theirs = decide_everywhere(a)
        assert len(set(theirs)) == len(theirs) == 11
        for decision_id in theirs:
            for path in ("", "/explanation"):
                answer = b.get(f"/v1/decisions/{decision_id}{path}")
                assert (answer.status_code, answer.json()) == unknown(b, decision_id, path), (
                    decision_id,
                    path,
                )
        # One id of its own tells the key the prefix and where the count stands: every id up
        # to it and past it reads as unknown but its own.
        own = b.post("/v1/authorize", json={**ALLOWED, "context": {"mine": 1}}).json()
        prefix, count = own["decision_id"].rsplit("-", 1)
        readable = []
        for n in range(1, int(count) + 5):
            answer = b.get(f"/v1/decisions/{prefix}-{n}")
            if answer.status_code == 200:
                readable.append(answer.json()["decision_id"])
                assert "Ada Lovelace" not in answer.text
            else:
                assert (answer.status_code, answer.json()) == unknown(b, f"{prefix}-{n}")
        assert readable == [own["decision_id"]]


def test_a_key_reads_and_explains_its_own_decisions_and_admin_reads_every_one(server):
    with (
        key(server, "pep-a", "decide", "facts:read", "authzen", "oso:read") as a,
        key(server, "pep-b", "decide") as b,
        server.client() as admin,
    ):
        mine = decide_everywhere(a)
        ids = {k["name"]: k["id"] for k in admin.get("/v1/keys").json()["keys"]}
        for decision_id in mine:
            record = a.get(f"/v1/decisions/{decision_id}")
            assert record.status_code == 200, (decision_id, record.text)
            assert record.json()["decision_id"] == decision_id
            # Which key asked is part of the record, for whoever explains it later.
            assert record.json()["asked_by"] == ids["pep-a"], (decision_id, record.text)
            assert admin.get(f"/v1/decisions/{decision_id}").json() == record.json()
        kept = a.get(f"/v1/decisions/{mine[0]}").json()
        assert kept["request"]["context"] == SECRET
        for decision_id in (mine[0], mine[1], mine[3], mine[7], mine[-1]):  # authorize, each API
            explained = a.get(f"/v1/decisions/{decision_id}/explanation")
            assert explained.status_code == 200, (decision_id, explained.text)
            assert explained.json()["explanation"]["allowed"] is True
            by_admin = admin.get(f"/v1/decisions/{decision_id}/explanation")
            assert by_admin.json()["explanation"] == explained.json()["explanation"]
        # A list is no authorize decision: its owner is told so, as before.
        assert a.get(f"/v1/decisions/{mine[4]}/explanation").status_code == 409
        theirs = b.post("/v1/authorize", json=ALLOWED).json()["decision_id"]
        assert b.get(f"/v1/decisions/{theirs}").json()["asked_by"] == ids["pep-b"]
        assert admin.get(f"/v1/decisions/{theirs}").status_code == 200
        assert a.get(f"/v1/decisions/{theirs}").status_code == 404
        # The admin key's own decisions are its own: a decide key reads none of them.
        admins = admin.post("/v1/authorize", json=ALLOWED).json()["decision_id"]
        assert admin.get(f"/v1/decisions/{admins}").status_code == 200
        assert b.get(f"/v1/decisions/{admins}").status_code == 404


def test_a_decision_that_rested_on_context_facts_is_not_explained_without_them(server):
    """Oso Cloud's context facts hold for their one question and the record keeps only how many
    there were: explained again later without them, an allow that rested on one would read as a
    refusal called exact. Such a record is answered 409, saying why."""
    with key(server, "pep", "decide", "facts:read", "oso:read") as pep:
        own = pep.post("/v1/authorize", json=ALLOWED).json()["decision_id"]
        prefix, count = own.rsplit("-", 1)
        bob = {"type": "User", "id": "bob"}
        asked = {
            "actor_type": "User",
            "actor_id": "bob",
            "action": "read",
            "resource_type": "Repo",
            "resource_id": "anvil",
            "context_facts": [
                {"predicate": "has_role", "args": [bob, {"type": "String", "id": "reader"},
                                                   {"type": "Repo", "id": "anvil"}]}
            ],
        }  # fmt: skip
        answer = pep.post("/api/authorize", json=asked)
        assert answer.status_code == 200 and answer.json() == {"allowed": True}, answer.text
        decision_id = f"{prefix}-{int(count) + 1}"
        assert pep.get(f"/v1/decisions/{decision_id}").json()["result"] is True
        explained = pep.get(f"/v1/decisions/{decision_id}/explanation")
        assert explained.status_code == 409, explained.text
        assert "context facts" in explained.json()["detail"]


def test_an_explanation_needs_facts_read_besides_decide(server):
    """An explanation shows the stored facts its proofs rest on (here alice's role ``reader``
    on the repository), which a key reads only with ``facts:read``, as ``/v1/query`` of a fact
    predicate and the facts routes keep them. A key with ``decide`` alone that asks for one (``"explain":
    true``, one actor or a chain, through the application or in the protocol; or the
    explanation of a decision of its own, asked through any API) is refused 403 naming the
    scope, before anything is decided or recorded; with ``facts:read`` too it is explained."""
    chain = {"principals": ["User:alice"], "action": "read", "resource": "Repo:anvil"}
    with (
        key(server, "pep", "decide", "authzen", "oso:read") as pep,
        key(server, "auditor", "decide", "facts:read") as auditor,
        server.client() as admin,
    ):
        mine = decide_everywhere(pep)
        # What an explanation would show: the stored fact the allow rests on.
        shown = admin.get(f"/v1/decisions/{mine[0]}/explanation")
        assert shown.status_code == 200 and "reader" in shown.text, shown.text
        first = pep.post("/v1/authorize", json=ALLOWED).json()["decision_id"]
        for body in (ALLOWED, chain, ALLOWED, chain):  # the key is known: the protocol tries too
            refused = pep.post("/v1/authorize", json={**body, "explain": True})
            assert refused.status_code == 403, (body, refused.status_code, refused.text)
            assert "'facts:read'" in refused.json()["detail"], refused.text
            assert "reader" not in refused.text and "explanation" not in refused.json()
        last = pep.post("/v1/authorize", json=ALLOWED).json()["decision_id"]
        prefix, count = first.rsplit("-", 1)
        assert last == f"{prefix}-{int(count) + 1}", "a refused request was decided and recorded"
        for decision_id in (mine[0], mine[1], mine[3], mine[7], mine[-1], last):
            refused = pep.get(f"/v1/decisions/{decision_id}/explanation")
            assert refused.status_code == 403, (decision_id, refused.status_code, refused.text)
            assert "'facts:read'" in refused.json()["detail"], refused.text
            assert "reader" not in refused.text
        for body in (ALLOWED, chain):
            answer = auditor.post("/v1/authorize", json={**body, "explain": True})
            assert answer.status_code == 200, answer.text
            assert "reader" in answer.json()["explanation"]["text"], answer.text
            explained = auditor.get(f"/v1/decisions/{answer.json()['decision_id']}/explanation")
            assert explained.status_code == 200, explained.text
            assert explained.json()["explanation"] == answer.json()["explanation"]
