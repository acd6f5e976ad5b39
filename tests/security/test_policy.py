"""Attacks on the policy engine through a real `bastion serve` (issue 9, defects 3 and 4).

A key that may only read policies (``policy:read``) sends policies built to be slow to compile,
too large, or nested too deep; a policy writer stores a policy whose evaluation would never end,
or that runs away on the facts. Each is refused with a clear answer, and the server goes on
answering everyone else meanwhile.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from mcp.shared.exceptions import MCPError

from bastion.facts.model import Entity
from bastion.facts.store import FactStore
from tests import clients
from tests.gateway import support
from tests.policy.test_limits import RUNAWAY as RUNAWAY_SEARCH
from tests.server.conftest import POLICY, ServerProcess, entity, serve_policy
from tests.waits import PATIENCE, eventually

GROW = "actor User {}\ngrow(x) if grow([x, x]);\nallow(a, _b, _c) if grow(a);\n"


@pytest.fixture
def server(tmp_path):
    running = serve_policy(tmp_path)
    yield running
    running.stop()


def key_for(server: ServerProcess, *scopes: str) -> httpx.Client:
    """A client with a new API key holding only ``scopes`` (close it, or use it in a ``with``)."""
    with server.client() as admin:
        created = admin.post("/v1/keys", json={"name": "-".join(scopes), "scopes": list(scopes)})
        assert created.status_code == 201, created.text
    return clients.client(
        base_url=server.url,
        headers={"authorization": f"Bearer {created.json()['key']}"},
        timeout=300,
    )


def conjunction(n: int, rule: int = 0) -> str:
    """One rule of ``n`` conjuncts, each a role check (``allow``, no specializers)."""
    body = " and\n  ".join(f'has_role(actor, "r{i}", resource)' for i in range(n))
    return f'allow(actor, "a{rule}", resource) if\n  {body};\n'


def wide(n: int, rules: int = 1) -> str:
    roles = ", ".join(f'"r{i}"' for i in range(n))
    return f"actor User {{}}\nresource Doc {{ roles = [{roles}]; }}\n" + "".join(
        conjunction(n, r) for r in range(rules)
    )


# Twelve rules at the limit of 1,000 conjuncts (487 kB): 0.8 s of compiling alone on the
# two-core machine, 2-4 s in a server that answers requests meanwhile; six rules (0.4 s) left
# too few answers inside the window when CI's other worker was busy.
SLOW_TO_COMPILE = wide(1000, rules=12)


def assert_refused(response: httpx.Response, *words: str) -> list[dict]:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    diagnostics = response.json()["diagnostics"]
    text = " ".join(d["message"] for d in diagnostics)
    for word in words:
        assert word in text
    assert all(d["line"] >= 1 and d["column"] >= 1 for d in diagnostics)
    return diagnostics


# -- defect 3: compiling -----------------------------------------------------------------------


def test_the_server_answers_while_a_large_policy_is_validated(server):
    answered_at: list[float] = []
    validated: dict = {}

    def validate() -> None:
        text = SLOW_TO_COMPILE
        with key_for(server, "policy:read") as reader:
            validated["response"] = reader.post("/v1/policy/validate", json={"text": text})
        validated["at"] = time.monotonic()

    worker = threading.Thread(target=validate)
    worker.start()
    with httpx.Client(base_url=server.url, timeout=60) as anyone:
        while worker.is_alive():
            assert anyone.get("/healthz").status_code == 200
            answered_at.append(time.monotonic())
            time.sleep(0.05)
    worker.join()
    assert validated["response"].status_code == 200, validated["response"].text
    assert validated["response"].json()["valid"] is True
    # Health checks were answered while the policy was being compiled, not only after.
    assert len([t for t in answered_at if t < validated["at"]]) >= 3


def push_slow_policy(server: ServerProcess) -> tuple[int, float]:
    """Store `SLOW_TO_COMPILE` from another process (as `bastion policy push` on the database
    does): ``server`` only hears of it from the change log, and compiles it to put it in force.
    Returns its version and when it was written."""
    store = FactStore.open(server.database)
    try:
        version, _ = store.put_policy(SLOW_TO_COMPILE, source="wide.polar", actor="test")
    finally:
        store.close()
    return version, time.monotonic()


# Asked of the policy in force before the slow one (which declares Repo; the slow one does not).
CHECK = {"actor": entity("User", "a"), "action": "read", "resource": entity("Repo", "r")}


def decide_until_applied(server: ServerProcess, version: int) -> tuple[list, float]:
    """Ask `CHECK` (and `/healthz`) every 50 ms until ``version`` is in force; the answers
    before then, with when each came, and when it was seen in force."""
    answers = []
    deadline = time.monotonic() + PATIENCE  # a bound against a hang (it looped for ever)
    with httpx.Client(base_url=server.url, timeout=120) as anyone, server.client() as admin:
        while True:
            assert anyone.get("/healthz").status_code == 200
            decided = admin.post("/v1/authorize", json=CHECK)
            if (applied := admin.get("/v1/policy").json()["applied"]) == version:
                return answers, time.monotonic()
            assert time.monotonic() < deadline, f"version {version} never applied ({applied})"
            answers.append((time.monotonic(), decided))
            time.sleep(0.05)


def test_the_server_answers_while_its_replica_compiles_a_new_policy(server):
    version, written = push_slow_policy(server)
    answers, applied = decide_until_applied(server, version)
    for _, decided in answers:
        # Decided under the policy in force; or, once the compile has outlasted the staleness
        # bound (5 s: CI's busy runs), refused as stale, naming the policy compiling.
        if decided.status_code != 200:
            assert decided.status_code == 503, decided.text
            assert f"policy version {version} compiling" in decided.json()["detail"]
    decided_at = [t for t, decided in answers if decided.status_code == 200]
    # Health checks and decisions were answered while the replica compiled the new one (it
    # starts within a poll interval of the write).
    assert len([t for t in decided_at if written + 0.5 < t < applied]) >= 3


def test_a_compile_that_outlasts_the_staleness_bound_stops_decisions_until_it_is_done(tmp_path):
    # The changes after a policy wait for it to be put in force, so a replica whose compile
    # outlasts `max_staleness_seconds` (here 0.5 s; the compile takes seconds) stops deciding on
    # what it held before, says why, and goes on answering everything else.
    server = serve_policy(tmp_path, BASTION_MAX_STALENESS_SECONDS="0.5")
    try:
        version, _ = push_slow_policy(server)
        answers, _ = decide_until_applied(server, version)
        refused = [decided for _, decided in answers if decided.status_code != 200]
        assert refused, "no decision was refused while the policy compiled"
        for decided in refused:
            assert decided.status_code == 503, decided.text
            detail = decided.json()["detail"]
            assert "max_staleness_seconds is 0.5" in detail
            assert f"(policy version {version} compiling) has been going in force" in detail
        # It confirms it is current with its next read of the log, and decides again.
        with httpx.Client(base_url=server.url) as anyone, server.client() as admin:
            deadline = time.monotonic() + PATIENCE
            while (ready := anyone.get("/readyz")).status_code != 200:
                assert time.monotonic() < deadline, ready.text
                time.sleep(0.05)
            assert ready.json()["policy_version"] == version
            decided = admin.post("/v1/authorize", json=CHECK)
        # Decided under the new policy, which does not declare Repo.
        assert decided.status_code == 422, decided.text
        assert "entity type 'Repo', which the policy does not declare" in decided.json()["detail"]
    finally:
        server.stop()


def test_a_rule_of_two_thousand_conjuncts_is_refused_naming_the_limit(server):
    with key_for(server, "policy:read") as reader:
        response = reader.post("/v1/policy/validate", json={"text": wide(2000)})
    (diagnostic,) = assert_refused(response, "policy_max_rule_literals = 1000")
    assert (diagnostic["line"], diagnostic["column"]) == (3, 1)


def test_a_rule_at_the_conjunct_limit_validates(server):
    with key_for(server, "policy:read") as reader:
        response = reader.post("/v1/policy/validate", json={"text": wide(1000)})
    assert response.status_code == 200, response.text
    assert response.json()["valid"] is True


@pytest.mark.parametrize(
    "nested",
    [
        "allow(a, b, c) if " + "(" * 5000 + "a = b" + ")" * 5000 + " and b = c;",
        "allow(a, b, c) if " + "not " * 5000 + "a = b and b = c;",
        "allow(a, b, c) if a in " + "[" * 5000 + "]" * 5000 + " and b = c;",
    ],
    ids=["parentheses", "not", "lists"],
)
def test_deeply_nested_policy_text_is_refused_naming_the_limit(server, nested):
    with key_for(server, "policy:read") as reader:
        response = reader.post("/v1/policy/validate", json={"text": nested})
    assert_refused(response, "policy_max_nesting")
    with server.client() as admin:
        assert_refused(admin.put("/v1/policy", json={"text": nested}), "policy_max_nesting")


# -- defect 4: evaluation ----------------------------------------------------------------------


def test_a_policy_that_would_grow_without_end_is_refused_when_validated_or_put(server):
    with server.client() as admin:
        before = admin.get("/v1/policy").json()["version"]
        for path, method in (("/v1/policy/validate", "POST"), ("/v1/policy", "PUT")):
            response = admin.request(method, path, json={"text": GROW})
            (diagnostic,) = assert_refused(response, "never end")
            assert (diagnostic["line"], diagnostic["column"]) == (2, 12)
        assert admin.get("/v1/policy").json()["version"] == before
        check = {"actor": entity("User", "a"), "action": "read", "resource": entity("Repo", "r")}
        assert admin.post("/v1/authorize", json=check).status_code == 200


def test_a_policy_file_that_would_grow_without_end_stops_the_server_at_start(tmp_path):
    policy = tmp_path / "grow.polar"
    policy.write_text(GROW)
    process = ServerProcess(str(tmp_path / "bastion.db"), tmp_path, str(policy))
    with pytest.raises(AssertionError, match="never end"):
        process.start()
    process.stop()


def test_a_policy_file_with_a_warning_is_served_and_its_warning_logged_once(tmp_path):
    # policy_file answers nobody: its warnings (a mask path that withholds whole results) go to
    # the log when it is stored, as `PUT /v1/policy` lists them.
    policy = tmp_path / "warned.polar"
    policy.write_text(POLICY + 'mask(_u: User, "read", _r: Repo, "$..email");\n')
    warning = f"policy_file: {policy}:"
    server = ServerProcess(str(tmp_path / "bastion.db"), tmp_path, str(policy)).start()
    try:
        with server.client() as admin:
            assert admin.get("/v1/policy").json()["version"] == 1
        assert "warning: the mask path '$..email' cannot be read" in server.log.read_text()
        assert server.log.read_text().count(warning) == 1
    finally:
        server.stop()
    # Started again on the same store, the policy is stored already: nothing stored, nothing told.
    again = ServerProcess(str(tmp_path / "bastion.db"), tmp_path, str(policy)).start()
    again.stop()
    assert again.log != server.log
    assert warning not in again.log.read_text()


CHAIN = """
actor User {}
resource Hop {
  roles = ["viewer"];
  permissions = ["view"];
  relations = { parent: Hop };
  "viewer" if "viewer" on "parent";
  "view" if "viewer";
}
"""

SEARCH = """
actor User {}
resource Doc { roles = ["r"]; }
declare blocked(User, User, User, User);
allow(_u: User, "read", _d: Doc) if
  has_role(a, "r", _x) and has_role(b, "r", _y) and has_role(c, "r", _z) and
  has_role(d, "r", _w) and blocked(a, b, c, d);
"""


def hop(i: int) -> dict:
    return entity("Hop", f"h{i}")


def put(admin: httpx.Client, text: str, facts: list[dict]) -> int:
    response = admin.put("/v1/policy", json={"text": text})
    assert response.status_code == 200, response.text
    response = admin.post("/v1/facts", json={"facts": facts})
    assert response.status_code == 200, response.text
    return response.json()["sequence"]


def test_recursion_past_the_budget_is_refused_and_recorded_and_the_server_goes_on(server):
    with server.client() as admin:
        chain = [
            {"predicate": "has_relation", "args": [hop(i + 1), "parent", hop(i)]}
            for i in range(400)
        ]
        viewer = {"predicate": "has_role", "args": [entity("User", "ann"), "viewer", hop(0)]}
        seq = put(admin, CHAIN, [*chain, viewer])
        ann = entity("User", "ann")
        check = {"actor": ann, "action": "view", "resource": hop(400), "at_least": seq}
        answer = admin.post("/v1/authorize", json=check).json()
        assert answer["allowed"] is False
        assert (answer["reason"], answer["limit"]) == ("evaluation_limit", "evaluation_max_depth")
        record = admin.get(f"/v1/decisions/{answer['decision_id']}").json()
        assert (record["result"], record["reason"]) == (False, "evaluation_limit")
        explained = admin.post("/v1/authorize", json={**check, "explain": True}).json()
        assert explained["allowed"] is False and explained["reason"] == "evaluation_limit"
        assert "evaluation_max_depth = 200" in explained["explanation"]["text"]
        later = admin.get(f"/v1/decisions/{answer['decision_id']}/explanation").json()
        assert "evaluation_max_depth" in later["explanation"]["text"]
        batch = admin.post("/v1/authorize/batch", json={"checks": [check]}).json()
        assert batch["results"][0]["reason"] == "evaluation_limit"
        actions = admin.post("/v1/actions", json={"actor": ann, "resource": hop(400)}).json()
        assert actions["actions"] == [] and actions["reason"] == "evaluation_limit"
        args = [ann, "view", hop(400)]
        query = admin.post("/v1/query", json={"predicate": "has_permission", "args": args})
        assert query.json()["reason"] == "evaluation_limit"
        # Everyone else is still answered, and the same chain within the budget is allowed.
        assert admin.get("/healthz").status_code == 200
        near = {**check, "resource": hop(50)}
        assert admin.post("/v1/authorize", json=near).json()["allowed"] is True


def roles(n: int) -> list[dict]:
    return [
        {"predicate": "has_role", "args": [entity("User", f"u{i}"), "r", entity("Doc", f"d{i}")]}
        for i in range(n)
    ]


def test_a_search_past_the_budget_is_refused_and_the_server_goes_on(tmp_path):
    # On a time bound no machine reaches: this is the step budget's test (its million steps
    # take about a tenth of a second to a few tenths, around the default time bound).
    server = serve_policy(tmp_path, BASTION_EVALUATION_MAX_MILLISECONDS="60000")
    try:
        search_past_the_budget(server)
    finally:
        server.stop()


def search_past_the_budget(server: ServerProcess) -> None:
    with server.client() as admin:
        seq = put(admin, SEARCH, roles(100))  # a million ways to look for a blocked foursome
        check = {
            "actor": entity("User", "u1"),
            "action": "read",
            "resource": entity("Doc", "d1"),
            "at_least": seq,
        }
        answer = admin.post("/v1/authorize", json=check).json()
        assert (answer["reason"], answer["limit"]) == ("evaluation_limit", "evaluation_max_steps")
        listed = admin.post(
            "/v1/list",
            json={"actor": entity("User", "u1"), "action": "read", "resource_type": "Doc"},
        ).json()
        assert listed["ids"] == [] and listed["reason"] == "evaluation_limit"
        assert admin.get("/healthz").status_code == 200


def test_a_runaway_past_the_time_bound_is_refused_naming_it_and_the_server_goes_on(tmp_path):
    server = serve_policy(
        tmp_path, BASTION_EVALUATION_MAX_STEPS="5000000", BASTION_EVALUATION_MAX_MILLISECONDS="1"
    )
    try:
        with server.client() as admin:
            seq = put(admin, RUNAWAY_SEARCH, roles(100))  # seconds on the step budget below
            u1, d1 = entity("User", "u1"), entity("Doc", "d1")
            check = {"actor": u1, "action": "read", "resource": d1, "at_least": seq}
            answer = admin.post("/v1/authorize", json=check).json()
            assert answer["allowed"] is False
            assert (answer["reason"], answer["limit"]) == (
                "evaluation_limit",
                "evaluation_max_milliseconds",
            )
            record = admin.get(f"/v1/decisions/{answer['decision_id']}").json()
            assert (record["result"], record["reason"]) == (False, "evaluation_limit")
            # 15,000 steps of search, one chunk and a half: answered alone (its clock starts,
            # and it ends before the clock is read again), refused after the runaway in one
            # batch, whose checks share one clock as they share one budget.
            scan = {
                **check,
                "action": "scan",
                "context": {"items": [str(i) for i in range(15_000)]},
            }
            alone = admin.post("/v1/authorize", json=scan).json()
            assert alone["allowed"] is False and "reason" not in alone
            batch = admin.post("/v1/authorize/batch", json={"checks": [check, scan]}).json()
            assert [(r["reason"], r["limit"]) for r in batch["results"]] == [
                ("evaluation_limit", "evaluation_max_milliseconds")
            ] * 2
            listing = {"actor": u1, "action": "read", "resource_type": "Doc"}
            listed = admin.post("/v1/list", json=listing).json()
            assert listed["ids"] == [] and listed["reason"] == "evaluation_limit"
            assert admin.get("/healthz").status_code == 200
    finally:
        server.stop()


# -- the gateway: fail closed, never fail dead -------------------------------------------------


def Hop(name: str) -> Entity:  # noqa: N802 (an entity type, as in the policy)
    return Entity("Hop", name)


RUNAWAY = """
resource Hop { relations = { next: Hop }; }
reaches(a: Hop, b: Hop) if has_relation(a, "next", b);
reaches(a: Hop, c: Hop) if has_relation(a, "next", b) and reaches(b, c);
deny(_user: User, "call", _tool: Tool) if
  context.tool = "search_customers" and reaches(Hop{"h0"}, Hop{"end"});
"""


@pytest.fixture
def gateway(tmp_path):
    with support.start(tmp_path) as running:
        yield running


def test_the_gateway_refuses_a_runaway_decision_and_goes_on_serving(gateway):
    version, _ = gateway.store.put_policy(support.test_policy() + RUNAWAY, source="runaway.polar")
    replica = gateway.app.state.replica
    assert eventually(lambda: replica.policy_version == version, every=0.02), (
        "the replica did not take the policy"
    )
    # A chain of 400 hops with no end: deeper than the budget's 200 recursive calls.
    hops = [("has_relation", Hop(f"h{i}"), "next", Hop(f"h{i + 1}")) for i in range(400)]
    gateway.apply(inserts=hops)

    async def script(client, seen):
        try:
            await client.call_tool("search_customers", {"query": "a"})
        except MCPError as e:
            seen["error"] = e
        seen["tools"] = (await client.list_tools()).tools
        seen["prompt"] = await client.get_prompt("apology", {"customer_name": "Ada"})

    seen = gateway.sdk("sam", "deskhttp", "legacy", script)
    data = seen["error"].error.data
    assert data["reason"] == "evaluation_limit"
    assert seen["tools"] and "Ada" in seen["prompt"].messages[0].content.text
    gateway.flush()
    record = gateway.records.get(data["decision_id"])
    assert (record.result, record.reason) == ("deny", "evaluation_limit")


def test_a_question_the_policy_cannot_answer_is_a_422_naming_the_rule(server):
    # /v1/query compiles each new shape of question when first asked. A shape that the rules
    # cannot answer (here: twin with both arguments open, bound by nothing) is a diagnostic.
    with server.client() as admin:
        put(admin, POLICY + "twin(a, b) if a = b;\n", [])
        with key_for(server, "decide") as decider:
            open_ = {"predicate": "twin", "args": [{"var": "a"}, {"var": "b"}]}
            answer = decider.post("/v1/query", json=open_)
            assert answer.status_code == 422, answer.text
            assert answer.headers["content-type"].startswith("application/problem+json")
            assert "never bound" in answer.json()["detail"]
            bound = {"predicate": "twin", "args": ["x", {"var": "b"}]}
            assert decider.post("/v1/query", json=bound).json()["results"] == [["twin", "x", "x"]]
        assert admin.get("/healthz").status_code == 200


def test_a_list_or_object_in_the_context_is_an_answer_not_a_server_error(server):
    # The context is the caller's: a list or object where the policy looks a fact up was a
    # TypeError (unhashable) and a 500.
    policy = (
        POLICY
        + 'allow(actor, "audit", resource) if r in context.roles and has_role(actor, r, resource);\n'
    )
    with server.client() as admin:
        put(admin, policy, [])
        with key_for(server, "decide", "facts:read") as decider:  # an explanation shows facts
            for roles in ([["admin"]], [{"role": "admin"}], ["member", ["admin"]]):
                check = {
                    "actor": entity("User", "ann"),
                    "action": "audit",
                    "resource": entity("Org", "o"),
                    "context": {"roles": roles},
                }
                answer = decider.post("/v1/authorize", json=check)
                assert answer.status_code == 200, answer.text
                assert answer.json()["allowed"] is False
                explained = decider.post("/v1/authorize", json={**check, "explain": True})
                assert explained.status_code == 200 and explained.json()["allowed"] is False


def test_validations_queued_by_a_read_only_key_do_not_hold_up_a_policy_write(server):
    # Compiles are one at a time, so that a flood of validations cannot take every thread; but
    # a key that may only read policies must not be able to keep a writer waiting behind them.
    finished: dict[str, float] = {}
    keys = [key_for(server, "policy:read") for _ in range(3)]  # made first: asked at once

    def validate(n: int) -> None:
        with keys[n] as reader:
            response = reader.post("/v1/policy/validate", json={"text": wide(1000, rules=4)})
            assert response.status_code == 200, response.text
        finished[f"validate{n}"] = time.monotonic()

    readers = [threading.Thread(target=validate, args=(n,)) for n in range(3)]
    with server.client() as admin:
        for reader in readers:
            reader.start()
        # One validation has had its compile (seconds long; one at a time): the other two,
        # asked with it, are compiling or waiting their turn.
        assert eventually(lambda: finished or not all(r.is_alive() for r in readers))
        assert finished, "a validation failed (see its thread's error above)"
        written = admin.put("/v1/policy", json={"text": POLICY + "# a small change\n"})
        finished["put"] = time.monotonic()
        assert written.status_code == 200, written.text
    for reader in readers:
        reader.join()
    # The write did not wait for all three: it had a turn of its own.
    assert finished["put"] < max(finished[f"validate{n}"] for n in range(3))
