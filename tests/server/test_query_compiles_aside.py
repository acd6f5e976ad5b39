"""A new shape of question asked through `/v1/query` or Oso Cloud's `/api/evaluate_query` is
compiled on a worker thread, never on the event loop: while it compiles, the server goes on
deciding (a large policy's new shape may compile for seconds, and a client may ask many)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from bastion.policy.compile import CompiledPolicy
from tests.server.conftest import POLICY, entity, role
from tests.waits import PATIENCE

ALICE, ANVIL = entity("User", "alice"), entity("Repo", "anvil")

# `has_permission` with its actor and resource open is compiled by neither a decision nor
# `list` nor `actions`: asking it is the first time it is needed.
QUESTIONS = {
    "/v1/query": (
        {"predicate": "has_permission", "args": [{"var": "who"}, "push", {"var": "what"}]},
        lambda answer: answer["results"] == [["has_permission", ALICE, "push", ANVIL]],
    ),
    "/api/evaluate_query": (
        {
            "predicate": ["has_permission", ["who", "action", "what"]],
            "constraints": {
                "who": {"type": "User", "ids": None},
                "action": {"type": "String", "ids": ["push"]},
                "what": {"type": "Repo", "ids": None},
            },
        },
        lambda answer: answer["results"] == [{"who": "alice", "action": "push", "what": "anvil"}],
    ),
}


@pytest.mark.parametrize("path", sorted(QUESTIONS))
def test_a_new_shape_of_question_compiles_while_decisions_go_on(api, monkeypatch, path):
    facts = {"facts": [role("alice", "maintainer", "Repo", "anvil")]}
    api.post("/v1/facts", json=facts).raise_for_status()
    question, answered_right = QUESTIONS[path]
    compiling, go_on = threading.Event(), threading.Event()
    released: list[bool] = []  # per generated group: let go by the test (True) or its deadline
    define = CompiledPolicy._define

    def held(self, text, filename, location):
        compiling.set()
        released.append(go_on.wait(PATIENCE))
        return define(self, text, filename, location)

    monkeypatch.setattr(CompiledPolicy, "_define", held)
    decision = {"actor": ALICE, "action": "read", "resource": ANVIL}
    with ThreadPoolExecutor(2) as pool:
        asked = pool.submit(api.post, path, json=question)
        assert compiling.wait(PATIENCE), "the question compiled nothing"
        # On the event loop, the compile would hold this decision until its deadline.
        decided = pool.submit(api.post, "/v1/authorize", json=decision).result(timeout=PATIENCE)
        go_on.set()
        answer = asked.result(timeout=PATIENCE)
    assert decided.status_code == 200 and decided.json()["allowed"] is True
    assert released and all(released), "the decision waited for the compile to time out"
    assert answer.status_code == 200, answer.text
    assert answered_right(answer.json()), answer.json()
    # Compiled once: asked again, nothing more is generated.
    compiling.clear()
    assert answered_right(api.post(path, json=question).json())
    assert not compiling.is_set()


def test_a_shape_that_cannot_be_compiled_is_refused_alike_each_time_and_compiled_once(
    api, monkeypatch
):
    """Compiling it failed on the worker thread: asked again, the same refusal, from what was
    kept (`Authorizer.prepare`), not a compile started again on the event loop."""
    tries: list[str] = []
    compiled = CompiledPolicy._compiled

    def counted(self, name, arity, mask, *strict):
        tries.append(f"{name}/{arity} {mask}")
        return compiled(self, name, arity, mask, *strict)

    monkeypatch.setattr(CompiledPolicy, "_compiled", counted)
    # Both arguments of `twin` open, and nothing binds them (docs/policy-language.md).
    api.put("/v1/policy", json={"text": POLICY + "twin(a, b) if a = b;\n"}).raise_for_status()
    question = {"predicate": "twin", "args": [{"var": "a"}, {"var": "b"}]}
    answers = [api.post("/v1/query", json=question) for _ in range(3)]
    assert [a.status_code for a in answers] == [422, 422, 422], answers[0].text
    assert len({a.json()["detail"] for a in answers}) == 1
    assert "never bound" in answers[0].json()["detail"]
    assert tries.count("twin/2 ff") == 1, tries
