"""The decision service's answers after a write that another replica took: that write returns
only once every replica has heard of it ("Writes confirmed by every process"), and a replica
that has heard of a change it has not applied yet waits for it before it decides, on every
decision route, as the gateway and the token endpoint do. Real `bastion serve` processes on
PostgreSQL; everything PostgreSQL sends the deciding one arrives half a second late (a relay),
so that the moment between hearing of a change and having read it is long and certain."""

from __future__ import annotations

import pytest

from tests.delayed_relay import DelayedRelay

from .conftest import entity, role

ALICE = entity("User", "alice")
READ_ANVIL = {"actor": ALICE, "action": "read", "resource": entity("Repo", "anvil")}
ASKED = {
    "/v1/authorize": READ_ANVIL,
    "/access/v1/evaluation": {
        "subject": {"type": "User", "id": "alice"},
        "action": {"name": "read"},
        "resource": {"type": "Repo", "id": "anvil"},
    },
    "/api/authorize": {
        "actor_type": "User",
        "actor_id": "alice",
        "action": "read",
        "resource_type": "Repo",
        "resource_id": "anvil",
    },
}


def allowed(route: str, answer) -> bool:
    assert answer.status_code in (200, 503), answer.text
    if answer.status_code == 503:
        return False  # refused until the change is read: never decided on the facts before it
    body = answer.json()
    return body["allowed"] if route != "/access/v1/evaluation" else body["decision"]


@pytest.mark.parametrize("route", sorted(ASKED))
@pytest.mark.parametrize("revoke", ["suspend", "delete"])
def test_a_replica_that_heard_of_a_revocation_decides_nothing_before_it_applies_it(
    postgres_url, serve, route, revoke
):
    with DelayedRelay() as relay:
        a, b = serve(postgres_url), serve(relay.url(postgres_url))
        with a.client() as ca, b.client() as cb:
            seq = ca.post("/v1/facts", json={"facts": [role("alice", "reader", "Repo", "anvil")]})
            at_least = {**READ_ANVIL, "at_least": seq.json()["sequence"]}
            assert cb.post("/v1/authorize", json=at_least).json()["allowed"]
            relay.delay = 0.5
            if revoke == "suspend":
                r = ca.post("/v1/suspensions", json={"kind": "user", "id": "alice"})
            else:
                r = ca.post(
                    "/v1/facts/delete",
                    json={"patterns": [{"predicate": "has_role", "args": [ALICE, None, None]}]},
                )
            assert r.status_code in (200, 201), r.text
            # The write returned: b has heard of it, and must not decide without it.
            assert not allowed(route, cb.post(route, json=ASKED[route]))
