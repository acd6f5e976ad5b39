"""`/v1/authorize` and its batch decide for a chain of principals (the user, the agent acting for
them, its sub-agents) as the gateway does: allowed only if every principal is, ``refused_by``
names the first that is not, an allowed answer carries every principal's obligations. The
Python client and the in-process `Authorizer` have the same method, `authorize_chain`. A real
`bastion serve`, real HTTP."""

from __future__ import annotations

import httpx
import pytest

from bastion import Authorizer
from bastion.client import Client
from bastion.decide.contract import ChainDecision
from bastion.facts.model import Entity
from bastion.policy.parser import parse_fact
from tests.server.conftest import ADMIN_KEY, serve_policy

POLICY = """
actor User {}
actor Agent {}

resource Doc {
  roles = ["reader", "writer"];
  permissions = ["read", "write"];
  "read" if "reader";
  "write" if "writer";
  "reader" if "writer";
}

allow(actor, action, resource) if has_permission(actor, action, resource);

# What an agent reads of a document, its salary field is masked.
mask(_agent: Agent, "read", _doc: Doc, "salary");
requires_scope("write", _doc: Doc, "docs:write");

resource Tool {
  roles = ["caller"];
  permissions = ["call"];
  "call" if "caller";
}
resource McpServer {}
# The coder agent is downgraded to read-only on the prod server.
read_only(Agent{"coder"}, McpServer{"prod"});
"""
FACTS = """
has_role(User{"sam"}, "writer", Doc{"plan"})
has_role(User{"sam"}, "reader", Doc{"secret"})
has_role(Agent{"coder"}, "writer", Doc{"plan"})
has_role(User{"mallory"}, "reader", Doc{"other"})
has_role(User{"sam"}, "caller", Tool{"prod/deploy"})
has_role(Agent{"coder"}, "caller", Tool{"prod/deploy"})
"""
SAM, MALLORY = Entity("User", "sam"), Entity("User", "mallory")
CODER, SVG = Entity("Agent", "coder"), Entity("Agent", "svg")
PLAN, SECRET = Entity("Doc", "plan"), Entity("Doc", "secret")
DEPLOY = Entity("Tool", "prod/deploy")


def ent(e: Entity) -> dict:
    return {"type": e.type, "id": e.id}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = serve_policy(tmp_path_factory.mktemp("chains"), POLICY)
    try:
        with Client(running.url, ADMIN_KEY) as client:
            client.facts.insert_many([parse_fact(line) for line in FACTS.split("\n") if line])
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def http(server):
    with server.client() as client:
        yield client


def authorize(http: httpx.Client, principals, action: str, resource: Entity, **more) -> dict:
    body = {"principals": [ent(p) for p in principals], "action": action, "resource": ent(resource)}
    answer = http.post("/v1/authorize", json={**body, **more})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_a_chain_is_allowed_when_every_principal_is_with_each_ones_obligations(http):
    answer = authorize(http, [SAM, CODER], "read", PLAN)
    assert answer["allowed"] is True and answer["refused_by"] is None
    assert answer["obligations"]["masks"] == ["salary"]  # the agent's mask applies to the chain


def test_an_agent_never_exceeds_the_user_it_acts_for(http):
    # sam may read the secret; his agent may not: the chain is refused, and says who refused.
    assert authorize(http, [SAM], "read", SECRET)["allowed"] is True
    answer = authorize(http, [SAM, CODER], "read", SECRET)
    assert answer["allowed"] is False and answer["refused_by"] == ent(CODER)
    assert "obligations" not in answer
    # The agent may read the plan; mallory, whom it acts for, may not.
    answer = authorize(http, [MALLORY, CODER], "read", PLAN)
    assert answer["allowed"] is False and answer["refused_by"] == ent(MALLORY)


def test_a_sub_agent_never_exceeds_its_parent(http):
    answer = authorize(http, [SAM, CODER, SVG], "read", PLAN)
    assert answer["allowed"] is False and answer["refused_by"] == ent(SVG)


def test_the_callers_scopes_are_held_to_requires_scope(http):
    answer = authorize(http, [SAM, CODER], "write", PLAN, scopes=["docs:read"])
    assert answer["allowed"] is False and answer["reason"] == "insufficient_scope"
    assert answer["missing_scopes"] == ["docs:write"]
    assert authorize(http, [SAM, CODER], "write", PLAN, scopes=["docs:write"])["allowed"] is True


def test_read_only_is_asked_of_the_server_the_target_is_on_whatever_the_context_names(http):
    """The gateway sets ``context.server``; here the caller writes the context. A context that
    named no server, or another one, left the agent's downgrade out of the obligations of a
    call of a tool on prod: an allowed answer that said nothing of it."""
    for context in ({"server": "prod"}, None, {}, {"server": "dev"}, {"server": 7}):
        more = {} if context is None else {"context": context}
        answer = authorize(http, [SAM, CODER], "call", DEPLOY, **more)
        assert answer["allowed"] is True
        assert answer["obligations"]["read_only"] is True, context
        check = {"principals": [ent(SAM), ent(CODER)], "action": "call", "resource": ent(DEPLOY)}
        batch = http.post("/v1/authorize/batch", json={"checks": [{**check, **more}]})
        assert batch.json()["results"][0]["obligations"]["read_only"] is True, context
    assert authorize(http, [SAM], "call", DEPLOY)["obligations"]["read_only"] is False


def test_a_refused_chain_is_explained_for_the_principal_that_refused(http):
    answer = authorize(http, [SAM, CODER], "read", SECRET, explain=True)
    assert answer["explanation"]["allowed"] is False
    later = http.get(f"/v1/decisions/{answer['decision_id']}/explanation")
    assert later.status_code == 200, later.text
    assert later.json()["request"]["refused_by"] == ent(CODER)
    assert later.json()["explanation"]["allowed"] is False


def test_a_batch_mixes_single_actors_and_chains(http):
    checks = [
        {"actor": ent(SAM), "action": "read", "resource": ent(SECRET)},
        {"principals": [ent(SAM), ent(CODER)], "action": "read", "resource": ent(SECRET)},
        {"principals": [ent(SAM), ent(CODER)], "action": "read", "resource": ent(PLAN)},
    ]
    answer = http.post("/v1/authorize/batch", json={"checks": checks})
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r["allowed"] for r in results] == [True, False, True]
    assert results[1]["refused_by"] == ent(CODER)
    assert results[2]["obligations"]["masks"] == ["salary"]


@pytest.mark.parametrize(
    "body, status, words",
    [
        (
            {
                "actor": "User:sam",
                "principals": ["User:sam"],
                "action": "read",
                "resource": "Doc:plan",
            },
            400,
            "not both",
        ),
        ({"principals": [], "action": "read", "resource": "Doc:plan"}, 400, "1 to 8"),
        ({"principals": ["User:sam"] * 9, "action": "read", "resource": "Doc:plan"}, 400, "1 to 8"),
        ({"principals": "User:sam", "action": "read", "resource": "Doc:plan"}, 400, "list"),
        (
            {"principals": ["User:sam", 7], "action": "read", "resource": "Doc:plan"},
            400,
            "principals[1]",
        ),
        ({"principals": ["Robot:r2"], "action": "read", "resource": "Doc:plan"}, 422, "Robot"),
        (
            {"principals": ["User:sam"], "action": "read", "resource": "Doc:plan", "scopes": "x"},
            400,
            "scopes",
        ),
    ],
)
def test_a_bad_chain_gets_a_problem_that_says_what_to_fix(http, body, status, words):
    answer = http.post("/v1/authorize", json=body)
    assert answer.status_code == status, answer.text
    assert words in answer.json()["detail"]
    batch = http.post("/v1/authorize/batch", json={"checks": [body]})
    assert batch.status_code == status and "checks[0]" in batch.json()["detail"]


def test_a_chain_needs_the_decide_scope(http, server):
    created = http.post("/v1/keys", json={"name": "reader", "scopes": ["facts:read"]})
    assert created.status_code == 201, created.text
    with httpx.Client(base_url=server.url) as other:
        other.headers["authorization"] = f"Bearer {created.json()['key']}"
        answer = other.post(
            "/v1/authorize",
            json={"principals": ["User:sam"], "action": "read", "resource": "Doc:plan"},
        )
    assert answer.status_code == 403


def test_the_client_and_the_in_process_authorizer_answer_alike(server):
    local = Authorizer(POLICY)
    for line in FACTS.split("\n"):
        if line:
            local.facts.insert(line)
    with Client(server.url, ADMIN_KEY) as remote:
        for chain, action, resource in [
            ([SAM, CODER], "read", PLAN),
            ([SAM, CODER], "read", SECRET),
            ([MALLORY, CODER], "read", PLAN),
            ([SAM, CODER, SVG], "read", PLAN),
        ]:
            here = local.authorize_chain(chain, action, resource)
            there = remote.authorize_chain(chain, action, resource)
            assert isinstance(here, ChainDecision)
            assert (here.allowed, here.refused_by) == (there.allowed, there.refused_by)
            assert there.principals == tuple(chain)
        allowed = remote.authorize_chain([SAM, CODER], "read", PLAN)
        assert allowed.obligations["masks"] == ["salary"]
        assert local.authorize_chain([SAM, CODER], "read", PLAN).obligations.masks == ("salary",)
        scoped = remote.authorize_chain([SAM, CODER], "write", PLAN, scopes=["docs:read"])
        assert scoped.missing_scopes == ("docs:write",) and not scoped.allowed
        assert remote.authorize_many(
            [([SAM, CODER], "read", SECRET), (SAM, "read", SECRET), ([SAM, CODER], "read", PLAN)]
        ) == [False, True, True]


def test_a_chains_record_keeps_the_scopes_and_what_the_answer_said(http):
    """What a chain's answer turned on is in its record: the scopes it was asked with, the
    scopes missing, and the obligations an allowed chain was given to enforce. Before, the
    record of an ``insufficient_scope`` refusal named neither the scopes given nor those
    missing, and an allowed chain's record none of the masks its caller was told to apply."""
    refused = authorize(http, [SAM, CODER], "write", PLAN, scopes=["docs:read"])
    record = http.get(f"/v1/decisions/{refused['decision_id']}").json()
    assert record["request"]["scopes"] == ["docs:read"]
    assert record["reason"] == "insufficient_scope"
    assert record["missing_scopes"] == ["docs:write"]
    allowed = authorize(http, [SAM, CODER], "read", PLAN)
    record = http.get(f"/v1/decisions/{allowed['decision_id']}").json()
    assert record["result"] is True and "scopes" not in record["request"]
    assert record["obligations"] == allowed["obligations"]
    assert record["obligations"]["masks"] == ["salary"]
    check = {"principals": [ent(SAM), ent(CODER)], "action": "write", "resource": ent(PLAN)}
    batch = http.post("/v1/authorize/batch", json={"checks": [{**check, "scopes": ["x"]}]})
    record = http.get(f"/v1/decisions/{batch.json()['results'][0]['decision_id']}").json()
    assert record["request"]["scopes"] == ["x"]
    assert record["missing_scopes"] == ["docs:write"]
