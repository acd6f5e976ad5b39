"""What a ``/api/batch`` body changes (`bastion.server.api.oso_cloud._changesets`, worked out in a
worker thread): inserts, less those a later delete takes back, whether it names one fact whole
(looked up at once) or with wildcards; a fact's value is never taken for another that Python
calls equal (``True`` and ``1``)."""

from __future__ import annotations

from bastion.decide import Authorizer
from bastion.server.api.oso_cloud import _changesets
from tests.oso_cloud.conftest import POLICY


def value(type_: str | None, id_: str | None) -> dict:
    return {"type": type_, "id": id_}


def label(name: str, n: str, type_: str = "Integer") -> dict:
    return {
        "predicate": "has_label",
        "args": [value("Repo", "anvil"), value("String", name), value(type_, n)],
    }


def test_deletes_take_back_earlier_inserts_whole_or_by_wildcard_and_nothing_else():
    authz = Authorizer(POLICY)
    body = [
        {"inserts": [label("a", "1"), label("b", "1"), label("c", "2"), label("d", "1")]},
        {"deletes": [label("a", "1")]},  # named whole
        {"deletes": [label("b", "true", "Boolean")]},  # another value: True is not 1
        {"deletes": [{"predicate": "has_label",
                      "args": [value("Repo", "anvil"), value("String", "c"), value(None, None)]}]},
    ]  # fmt: skip
    inserts, patterns = _changesets(authz, body)
    kept = sorted(fact[2] for fact in inserts)
    assert kept == ["b", "d"]
    assert len(patterns) == 3
