"""Rotating the connection keys as docs/identity.md ("Keys, sealing and rotation") says: a new
key first, `rekey`, then the old key removed. Every value sealed under the old key is sealed
again by `rekey` (the connections, the revocations still to make, bastion's registrations at
the authorization servers, the connections being made), so that once the old key is gone
nothing stored is left that no key opens: a registration left under it made every refresh and
every new connection of that upstream fail for good ("bastion's registration with ... cannot be
opened"), with no way back short of editing the database.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import anyio
import httpx
from cryptography.fernet import Fernet, InvalidToken

from tests.connections.test_revocation_outbox import _connected, lab  # noqa: F401 (the fixture)

# Each table holding sealed values, and its sealed column.
SEALED = {
    "upstream_connections": "sealed",
    "upstream_connection_flows": "sealed",
    "upstream_oauth_clients": "sealed",
    "upstream_revocations": "sealed",
}


def _unopenable(db, key: bytes) -> dict[str, int]:
    """How many sealed values of each table ``key`` alone does not open."""
    fernet = Fernet(key)
    left = {}
    for table, column in SEALED.items():
        for (sealed,) in db.execute(f"SELECT {column} FROM {table}"):
            try:
                fernet.decrypt(sealed.encode())
            except InvalidToken:
                left[table] = left.get(table, 0) + 1
    return left


def test_after_a_rotation_the_old_key_is_needed_for_nothing(lab):  # noqa: F811
    server, now, replica = lab
    before = replica()
    _connected(before)  # alice: bastion registered its client at the server, under the old key
    link = anyio.run(lambda: before.start("bob", "tracker", browser="bobs"))  # bob, under way
    with httpx.Client(timeout=10) as browser:
        answer = parse_qs(urlsplit(browser.get(link).headers["location"]).query)

    new = Fernet.generate_key()
    replica(keys=[new, replica.key]).rekey()  # steps 1 and 2
    assert _unopenable(before.store.db, new) == {}
    after = replica(keys=[new])  # step 3: the old key removed, and restarted

    state, code = answer["state"][0], answer["code"][0]
    done = anyio.run(lambda: after.finish("bob", "tracker", state, code, browser="bobs"))
    assert done.subject == "bob"
    now[0] += 3600  # alice's access token is due for a refresh, with bastion's registration
    fresh = anyio.run(lambda: after.access_token("alice", "tracker"))
    assert fresh is not None and fresh.startswith("access-of-as-"), fresh
    _connected(after, "carol")  # a new connection, with the registration kept
    assert sorted(c.subject for c in after.listed()) == ["alice", "bob", "carol"]
