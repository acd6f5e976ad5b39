"""Delegated grants on both databases (a real SQLite file, a real PostgreSQL schema): each
exchanged token's grant is a child of its subject token's grant, and revoking any grant above it
(the grant, the user, the client) revokes every descendant at once, through the same paths as
any revocation (the store's subscribers, PostgreSQL NOTIFY, the gateway's remembered tokens).
Also the ``task`` parameter, with a tasks object given to the authorization server."""

from __future__ import annotations

import time

from bastion.db import Database
from bastion.decide import Authorizer
from bastion.delegation.tasks import Tasks
from bastion.facts.model import Entity
from bastion.facts.store import FactStore
from bastion.oauth.errors import InvalidToken
from bastion.oauth.store import OAuthStore
from bastion.oauth.token_exchange import DelegationPolicy
from bastion.oauth.verifier import VerifiedTokens, delegation_chain
from tests.oauth.support import Bastion, allow_introspection, running_bastion
from tests.oauth.test_grants_of_disabled_users import elsewhere_right_after
from tests.waits import eventually

from .support import ACCESS_TOKEN, EXCHANGE, claims

IAT = {"Authorization": "Bearer initial-access-token-for-tests"}
POLICY = """
actor User {}
actor Agent {}
resource McpServer {}
declare trusted(Agent);
may_delegate(_from: Agent, to: Agent, _server: McpServer) if trusted(to);
delegated_scope(_user: User, _from: Agent, _to: Agent, _server: McpServer, "tools:read");
"""


def policy_for(bastion: Bastion, trusted: list[str]) -> None:
    authz = Authorizer(POLICY)
    for client_id in trusted:
        authz.facts.insert(("trusted", Entity("Agent", client_id)))
    bastion.server.delegation = DelegationPolicy(
        authorizer=lambda: authz,
        server_of=lambda uri: Entity("McpServer", "tools") if uri == bastion.resource else None,
    )


def coding_agent(bastion: Bastion) -> dict:
    return bastion.register(
        grant_types=["authorization_code", "refresh_token", EXCHANGE],
        scope="tools:read tools:call",
    )


def sub_agent(bastion: Bastion) -> dict:
    response = bastion.http.post(
        f"{bastion.url}/register",
        json={
            "client_name": "sub-agent",
            "token_endpoint_auth_method": "client_secret_basic",
            "grant_types": ["client_credentials", EXCHANGE],
            "redirect_uris": [],
            "scope": "tools:read",
        },
        headers=IAT,
    )
    assert response.status_code == 201, response.text
    return response.json()


def own_token(bastion: Bastion, agent: dict) -> str:
    response = bastion.http.post(
        f"{bastion.url}/token",
        data={"grant_type": "client_credentials", "resource": bastion.resource},
        auth=(agent["client_id"], agent["client_secret"]),
    )
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


def exchange(bastion: Bastion, agent: dict, subject: str, actor: str, **more):
    data = {
        "grant_type": EXCHANGE,
        "subject_token": subject,
        "subject_token_type": ACCESS_TOKEN,
        "actor_token": actor,
        "actor_token_type": ACCESS_TOKEN,
        **more,
    }
    if "client_secret" in agent:
        return bastion.http.post(
            f"{bastion.url}/token", data=data, auth=(agent["client_id"], agent["client_secret"])
        )
    return bastion.http.post(f"{bastion.url}/token", data={**data, "client_id": agent["client_id"]})


def chain_of_three(bastion: Bastion) -> tuple[dict, list[str]]:
    """alice's coding agent -> sub-agent -> sub-sub-agent: the coding agent's tokens and the
    two delegated tokens."""
    coder, first, second = coding_agent(bastion), sub_agent(bastion), sub_agent(bastion)
    policy_for(bastion, [first["client_id"], second["client_id"]])
    tokens = bastion.tokens_for(coder)
    one = exchange(bastion, coder, tokens["access_token"], own_token(bastion, first))
    assert one.status_code == 200, one.text
    two = exchange(bastion, first, one.json()["access_token"], own_token(bastion, second))
    assert two.status_code == 200, two.text
    return tokens, [one.json()["access_token"], two.json()["access_token"]]


def refused(bastion: Bastion, token: str) -> bool:
    try:
        bastion.server.verifier.verify(token, bastion.resource, audit=False)
    except InvalidToken as e:
        return e.check == "revoked"
    return False


def test_revoking_the_root_grant_revokes_every_descendant(database_url, tmp_path):
    with running_bastion(database_url, tmp_path) as bastion:
        tokens, delegated = chain_of_three(bastion)
        grants = [
            bastion.server.store.access_token_state(claims(t)["jti"]).grant_id for t in delegated
        ]
        parent = bastion.server.store.grant(grants[1]).parent_grant_id
        assert parent == grants[0]
        root = bastion.server.store.grant(grants[0]).parent_grant_id
        heard: list[str] = []
        bastion.server.store.on_revoked(heard.append)
        assert not any(refused(bastion, t) for t in delegated)
        assert bastion.server.store.revoke_grant(root, bastion.clock(), "test", actor="test")
        assert all(refused(bastion, t) for t in delegated)
        assert set(grants) <= set(heard)  # every descendant announced (subscribers, NOTIFY)


def test_revoking_the_user_or_the_client_revokes_the_delegations(database_url, tmp_path):
    with running_bastion(database_url, tmp_path) as bastion:
        _, delegated = chain_of_three(bastion)
        bastion.server.store.revoke_user_grants(
            "alice", bastion.clock(), "offboarded", actor="test"
        )
        assert all(refused(bastion, t) for t in delegated)
        tokens, delegated = chain_of_three(bastion)
        assert not any(refused(bastion, t) for t in delegated)
        coder = claims(tokens["access_token"])["client_id"]
        assert bastion.server.store.revoke_client(coder, bastion.clock(), actor="test")
        assert all(refused(bastion, t) for t in delegated)


def test_a_disabled_users_token_is_not_exchanged_even_while_its_grant_lives_on(
    database_url, tmp_path
):
    with running_bastion(database_url, tmp_path) as bastion:
        coder, first = coding_agent(bastion), sub_agent(bastion)
        policy_for(bastion, [first["client_id"]])
        tokens = bastion.tokens_for(coder)
        # As a disable that missed the grant would leave it: the user disabled, the grant live.
        bastion.db.execute(
            "UPDATE oauth_users SET disabled_at = ? WHERE username = 'alice'", (bastion.clock(),)
        )
        response = exchange(bastion, coder, tokens["access_token"], own_token(bastion, first))
        assert response.status_code == 400, response.text
        assert "disabled" in response.json()["error_description"]


def test_the_gateways_remembered_tokens_forget_every_descendant(database_url, tmp_path):
    with running_bastion(database_url, tmp_path) as bastion:
        tokens, delegated = chain_of_three(bastion)
        remembered = VerifiedTokens(bastion.server.verifier, database_url)
        try:
            # PostgreSQL: until the revocation listener listens.
            assert eventually(lambda: remembered.local), "the revocation listener did not start"
            for token in delegated:
                remembered.verify(token, bastion.resource)
                assert remembered.remembered(token, bastion.resource) is not None
            revoked = bastion.http.post(
                f"{bastion.url}/revoke",
                data={
                    "token": tokens["refresh_token"],
                    "client_id": claims(tokens["access_token"])["client_id"],
                },
            )
            assert revoked.status_code == 200
            for token in delegated:
                assert remembered.remembered(token, bastion.resource) is None
        finally:
            remembered.close()


def test_a_delegation_cannot_be_made_under_a_revoked_grant(database_url, tmp_path):
    with running_bastion(database_url, tmp_path) as bastion:
        coder, sub = coding_agent(bastion), sub_agent(bastion)
        policy_for(bastion, [sub["client_id"]])
        tokens = bastion.tokens_for(coder)
        grant_id = bastion.server.store.access_token_state(
            claims(tokens["access_token"])["jti"]
        ).grant_id
        bastion.server.store.revoke_grant(grant_id, bastion.clock(), "test", actor="test")
        answer = exchange(bastion, coder, tokens["access_token"], own_token(bastion, sub))
        assert answer.status_code == 400 and answer.json()["error"] == "invalid_request"
        rows = bastion.db.execute(
            "SELECT COUNT(*) FROM oauth_grants WHERE parent_grant_id = ?", (grant_id,)
        )
        assert rows[0][0] == 0


def test_a_subject_token_past_its_exp_is_refused_even_within_the_leeway(database_url, tmp_path):
    with running_bastion(database_url, tmp_path) as bastion:
        coder, sub = coding_agent(bastion), sub_agent(bastion)
        policy_for(bastion, [sub["client_id"]])
        tokens = bastion.tokens_for(coder)
        actor = own_token(bastion, sub)
        bastion.clock.advance(bastion.server.settings.access_token_seconds + 5)
        answer = exchange(bastion, coder, tokens["access_token"], actor)
        assert answer.status_code == 400, answer.text
        assert "expired" in answer.json()["error_description"]


def test_a_task_binds_the_delegated_grant_and_travels_in_the_token(database_url, tmp_path):
    with running_bastion(database_url, tmp_path) as bastion:
        coder, sub = coding_agent(bastion), sub_agent(bastion)
        policy_for(bastion, [sub["client_id"]])
        tasks = Tasks(FactStore(bastion.db), bastion.server.store, bastion.server.audit)

        def grant(folder: str) -> dict:
            agent = {"type": "Agent", "id": sub["client_id"]}
            return {
                "predicate": "has_role",
                "args": [agent, "writer", {"type": "Folder", "id": folder}],
            }

        task = tasks.open("alice", sub["client_id"], "icons", time.time() + 60, [grant("a")], "t")
        elsewhere = tasks.open(
            "bob", sub["client_id"], "icons", time.time() + 60, [grant("b")], "t"
        )
        bastion.server.tasks = tasks
        tokens = bastion.tokens_for(coder)
        wrong = exchange(
            bastion, coder, tokens["access_token"], own_token(bastion, sub), task=elsewhere.id
        )
        assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_request"
        assert "not on behalf of user" in wrong.json()["error_description"]
        grants = bastion.db.execute("SELECT COUNT(*) FROM oauth_grants")[0][0]
        answer = exchange(
            bastion, coder, tokens["access_token"], own_token(bastion, sub), task=task.id
        )
        assert answer.status_code == 200, answer.text
        token = answer.json()["access_token"]
        assert claims(token)["task"] == task.id and claims(token)["exp"] <= task.expires_at
        verified = bastion.server.verifier.verify(token, bastion.resource, audit=False)
        assert verified.task == task.id
        assert verified.agents == (claims(tokens["access_token"])["client_id"], sub["client_id"])
        assert tasks.get(task.id).grants == (verified.grant_id,)
        # Ending the task revokes the delegated grant.
        tasks.end(task.id, "test")
        assert bastion.server.store.grant(verified.grant_id).revoked_at is not None
        # The refused binding saved nothing: one grant more (the sub-agent's own token's and
        # this delegation's), not two.
        assert bastion.db.execute("SELECT COUNT(*) FROM oauth_grants")[0][0] == grants + 2


def test_an_agent_acting_as_itself_binds_its_delegation_to_its_own_task(sqlite_url, tmp_path):
    """A nightly job (client_credentials: it is its own user) hands a sub-agent a token bound to
    the job's task; a task of anyone else is still refused."""
    with running_bastion(sqlite_url, tmp_path) as bastion:
        job, sub = sub_agent(bastion), sub_agent(bastion)
        policy_for(bastion, [sub["client_id"]])
        tasks = Tasks(FactStore(bastion.db), bastion.server.store, bastion.server.audit)
        agent = {"type": "Agent", "id": sub["client_id"]}

        def fact(folder: str) -> dict:
            return {
                "predicate": "has_role",
                "args": [agent, "writer", {"type": "Folder", "id": folder}],
            }

        expires = time.time() + 60
        mine = tasks.open(job["client_id"], sub["client_id"], "report", expires, [fact("a")], "t")
        theirs = tasks.open(sub["client_id"], sub["client_id"], "x", expires, [fact("b")], "t")
        bastion.server.tasks = tasks
        subject = own_token(bastion, job)
        refused_task = exchange(bastion, job, subject, own_token(bastion, sub), task=theirs.id)
        assert refused_task.status_code == 400, refused_task.text
        assert "not on behalf of user" in refused_task.json()["error_description"]
        answer = exchange(bastion, job, subject, own_token(bastion, sub), task=mine.id)
        assert answer.status_code == 200, answer.text
        verified = bastion.server.verifier.verify(
            answer.json()["access_token"], bastion.resource, audit=False
        )
        assert verified.task == mine.id and verified.subject == job["client_id"]
        assert tasks.get(mine.id).grants == (verified.grant_id,)
        tasks.end(mine.id, "test")
        assert refused(bastion, answer.json()["access_token"])


def test_a_token_bound_to_a_task_is_not_delegated_into_another_task(sqlite_url, tmp_path):
    with running_bastion(sqlite_url, tmp_path) as bastion:
        coder, first, second = coding_agent(bastion), sub_agent(bastion), sub_agent(bastion)
        policy_for(bastion, [first["client_id"], second["client_id"]])
        tasks = Tasks(FactStore(bastion.db), bastion.server.store, bastion.server.audit)
        bastion.server.tasks = tasks

        def task_of(agent: dict, folder: str):
            who = {"type": "Agent", "id": agent["client_id"]}
            fact = {
                "predicate": "has_role",
                "args": [who, "writer", {"type": "Folder", "id": folder}],
            }
            return tasks.open("alice", agent["client_id"], "icons", time.time() + 60, [fact], "t")

        # Both tasks are alice's, each of the agent that binds it: only the rule refuses.
        one, two = task_of(first, "a"), task_of(second, "b")
        tokens = bastion.tokens_for(coder)
        bound = exchange(
            bastion, coder, tokens["access_token"], own_token(bastion, first), task=one.id
        )
        assert bound.status_code == 200, bound.text
        bound = bound.json()["access_token"]
        moved = exchange(bastion, first, bound, own_token(bastion, second), task=two.id)
        assert moved.status_code == 400 and moved.json()["error"] == "invalid_request"
        assert f"bound to task {one.id!r}" in moved.json()["error_description"]
        assert tasks.get(two.id).grants == ()
        # Without a task the delegation stays in the subject token's.
        stays = exchange(bastion, first, bound, own_token(bastion, second))
        assert stays.status_code == 200, stays.text
        assert claims(stays.json()["access_token"])["task"] == one.id


def test_an_actor_token_for_another_resource_is_refused(sqlite_url, tmp_path):
    with running_bastion(sqlite_url, tmp_path) as bastion:
        coder, sub = coding_agent(bastion), sub_agent(bastion)
        policy_for(bastion, [sub["client_id"]])
        tokens = bastion.tokens_for(coder)
        elsewhere = bastion.http.post(
            f"{bastion.url}/token",
            data={"grant_type": "client_credentials", "resource": bastion.other_resource},
            auth=(sub["client_id"], sub["client_secret"]),
        )
        assert elsewhere.status_code == 200, elsewhere.text
        answer = exchange(bastion, coder, tokens["access_token"], elsewhere.json()["access_token"])
        assert answer.status_code == 400 and answer.json()["error"] == "invalid_request"
        assert "actor_token" in answer.json()["error_description"]
        answer = exchange(bastion, coder, tokens["access_token"], own_token(bastion, sub))
        assert answer.status_code == 200, answer.text


def test_max_delegation_depth_zero_refuses_every_exchange(sqlite_url, tmp_path):
    with running_bastion(sqlite_url, tmp_path, max_delegation_depth=0) as bastion:
        coder, sub = coding_agent(bastion), sub_agent(bastion)
        policy_for(bastion, [sub["client_id"]])
        tokens = bastion.tokens_for(coder)
        answer = exchange(bastion, coder, tokens["access_token"], own_token(bastion, sub))
        assert answer.status_code == 400 and answer.json()["error"] == "invalid_request"
        assert "max_delegation_depth" in answer.json()["error_description"]


def test_without_a_policy_to_decide_every_exchange_is_refused(sqlite_url, tmp_path):
    with running_bastion(sqlite_url, tmp_path) as bastion:
        coder, sub = coding_agent(bastion), sub_agent(bastion)
        tokens = bastion.tokens_for(coder)
        answer = exchange(bastion, coder, tokens["access_token"], own_token(bastion, sub))
        assert answer.status_code == 400 and answer.json()["error"] == "invalid_target"


def test_introspection_shows_the_chain_and_stops_at_a_revoked_parent(database_url, tmp_path):
    with running_bastion(database_url, tmp_path) as bastion:
        resource_server = sub_agent(bastion)
        allow_introspection(bastion, resource_server["client_id"])
        tokens, delegated = chain_of_three(bastion)

        def introspect(token: str) -> dict:
            return bastion.http.post(
                f"{bastion.url}/introspect",
                data={"token": token},
                auth=(resource_server["client_id"], resource_server["client_secret"]),
            ).json()

        answer = introspect(delegated[1])
        assert answer["active"] is True and answer["act"] == claims(delegated[1])["act"]
        assert answer["act"]["act"]["act"]["sub"] == claims(tokens["access_token"])["client_id"]
        assert "act" not in introspect(tokens["access_token"])
        grant_id = bastion.server.store.access_token_state(
            claims(tokens["access_token"])["jti"]
        ).grant_id
        bastion.server.store.revoke_grant(grant_id, bastion.clock(), "test", actor="test")
        assert introspect(delegated[1]) == {"active": False}
        # Each answer's audit row names who asked, the user and the whole chain, oldest first.
        rows = list(reversed(bastion.server.audit.events("token.introspected")))
        chain = list(delegation_chain(claims(delegated[1])))
        assert len(chain) == 3 and chain[0] == claims(tokens["access_token"])["client_id"]
        assert [(e.detail["active"], e.detail["agents"]) for e in rows] == [
            (True, chain),
            (True, chain[:1]),
            (False, chain),
        ]
        assert rows[2].detail["reason"] == "revoked"
        assert {(e.client_id, e.subject) for e in rows} == {(resource_server["client_id"], "alice")}


def test_revoking_an_access_token_revokes_the_delegations_exchanged_from_it(database_url, tmp_path):
    """The coding agent revokes the access token it delegated from (RFC 7009, at /revoke): every
    token exchanged from it, at every depth, is refused at once and announced, while a
    delegation made from another token of the same grant lives on."""
    with running_bastion(database_url, tmp_path) as bastion:
        coder, first, second = coding_agent(bastion), sub_agent(bastion), sub_agent(bastion)
        policy_for(bastion, [first["client_id"], second["client_id"]])
        tokens = bastion.tokens_for(coder)
        one = exchange(bastion, coder, tokens["access_token"], own_token(bastion, first))
        two = exchange(bastion, first, one.json()["access_token"], own_token(bastion, second))
        delegated = [one.json()["access_token"], two.json()["access_token"]]
        # Another access token of the same grant (a refresh), with a delegation of its own.
        refreshed = bastion.token(
            grant_type="refresh_token",
            refresh_token=tokens["refresh_token"],
            client_id=coder["client_id"],
        ).json()["access_token"]
        sibling = exchange(bastion, coder, refreshed, own_token(bastion, first))
        assert sibling.status_code == 200, sibling.text
        heard: list[str] = []
        bastion.server.store.on_revoked(heard.append)

        revoked = bastion.http.post(
            f"{bastion.url}/revoke",
            data={
                "token": tokens["access_token"],
                "token_type_hint": "access_token",
                "client_id": coder["client_id"],
            },
        )
        assert revoked.status_code == 200, revoked.text
        assert all(refused(bastion, t) for t in delegated)
        grants = [
            bastion.server.store.access_token_state(claims(t)["jti"]).grant_id for t in delegated
        ]
        assert set(grants) <= set(heard)  # announced: the gateways forget the tokens
        again = exchange(bastion, first, delegated[0], own_token(bastion, second))
        assert again.status_code == 400 and again.json()["error"] == "invalid_request"
        assert not refused(bastion, sibling.json()["access_token"])
        assert not refused(bastion, refreshed)
        reasons = [
            e.detail["reason"]
            for e in bastion.server.audit.events(kind="grant.revoked")
            if e.detail["grant_id"] == grants[0]
        ]
        assert reasons == ["the access token it was exchanged from was revoked"]


def test_an_exchange_racing_the_revocation_of_its_subject_token_saves_nothing(
    database_url, tmp_path
):
    """The subject token is revoked after the exchange checked it and before it saves the new
    grant (here, while the policy decides): the exchange is refused and no delegation is left
    behind that the revocation did not see."""
    with running_bastion(database_url, tmp_path) as bastion:
        coder, sub = coding_agent(bastion), sub_agent(bastion)
        policy_for(bastion, [sub["client_id"]])
        tokens = bastion.tokens_for(coder)
        jti = claims(tokens["access_token"])["jti"]
        deciding = bastion.server.delegation.authorizer

        def revoked_meanwhile():
            bastion.server.store.revoke_access_token(jti, bastion.clock())
            return deciding()

        bastion.server.delegation.authorizer = revoked_meanwhile
        answer = exchange(bastion, coder, tokens["access_token"], own_token(bastion, sub))
        assert answer.status_code == 400 and answer.json()["error"] == "invalid_request"
        assert "revoked" in answer.json()["error_description"]
        rows = bastion.db.execute("SELECT COUNT(*) FROM oauth_grants WHERE parent_jti = ?", (jti,))
        assert rows[0][0] == 0


def test_a_delegation_racing_the_revocation_of_a_grant_above_its_parent_is_revoked_with_it(
    postgres_url, tmp_path, monkeypatch
):
    """alice's coding agent -> first -> second: the coding agent's grant is revoked (by another
    replica) while first delegates to second, after the new grant is written and before it
    commits. The revocation reads the grants below the coding agent's and waits for the row of
    first's grant, which the exchange holds; whatever it read before that wait, the new grant
    is revoked with the rest once the exchange commits. (On SQLite the exchange holds the one
    write lock: nothing to force there.)"""
    with running_bastion(postgres_url, tmp_path) as bastion:
        coder, first, second = coding_agent(bastion), sub_agent(bastion), sub_agent(bastion)
        policy_for(bastion, [first["client_id"], second["client_id"]])
        tokens = bastion.tokens_for(coder)
        one = exchange(bastion, coder, tokens["access_token"], own_token(bastion, first))
        assert one.status_code == 200, one.text
        root = bastion.server.store.access_token_state(
            claims(tokens["access_token"])["jti"]
        ).grant_id
        actor = own_token(bastion, second)

        def revoke_the_coding_agents_grant(store) -> None:
            assert store.revoke_grant(root, time.time(), "test", actor="test")

        with elsewhere_right_after(
            monkeypatch,
            bastion,
            "create_grant",
            revoke_the_coding_agents_grant,
            inside_transaction=True,
        ):
            two = exchange(bastion, first, one.json()["access_token"], actor)
        live = bastion.db.execute(
            "WITH RECURSIVE tree (grant_id) AS (SELECT grant_id FROM oauth_grants"
            " WHERE parent_grant_id = ? UNION SELECT g.grant_id FROM oauth_grants g"
            " JOIN tree t ON g.parent_grant_id = t.grant_id) SELECT t.grant_id FROM tree t"
            " JOIN oauth_grants g ON g.grant_id = t.grant_id WHERE g.revoked_at IS NULL",
            (root,),
        )
        assert live == [], "a delegation outlived the grant it descends from"
        if two.status_code == 200:
            assert refused(bastion, two.json()["access_token"])


def test_a_delegation_to_a_client_revoked_meanwhile_is_revoked_with_it(
    postgres_url, tmp_path, monkeypatch
):
    """The sub-agent's client is revoked (by another replica) after the exchange checked its
    actor token and wrote the new grant, before it commits: the revocation either waits for
    the grant and revokes it, or the exchange finds the client revoked and saves nothing. No
    grant of a revoked client is left live. (On SQLite the exchange holds the one write lock.)"""
    with running_bastion(postgres_url, tmp_path) as bastion:
        coder, sub = coding_agent(bastion), sub_agent(bastion)
        policy_for(bastion, [sub["client_id"]])
        tokens = bastion.tokens_for(coder)
        actor = own_token(bastion, sub)

        def revoke_the_sub_agent(store) -> None:
            assert store.revoke_client(sub["client_id"], time.time(), actor="test")

        with elsewhere_right_after(
            monkeypatch, bastion, "create_grant", revoke_the_sub_agent, inside_transaction=True
        ):
            answer = exchange(bastion, coder, tokens["access_token"], actor)
        live = bastion.db.execute(
            "SELECT grant_id FROM oauth_grants WHERE client_id = ? AND revoked_at IS NULL",
            (sub["client_id"],),
        )
        assert live == [], "a grant of a revoked client is live"
        if answer.status_code == 200:
            assert refused(bastion, answer.json()["access_token"])


def test_an_exchange_whose_actor_client_is_revoked_just_before_its_grant_blames_the_actor(
    postgres_url, tmp_path, monkeypatch
):
    """The sub-agent's client is revoked (by another replica, committed) after its actor token
    was checked and before the delegated grant is written: the exchange is refused, naming the
    actor token, not the subject token (the coding agent's token is as good as before), and
    nothing is saved. (On SQLite the exchange holds the one write lock from its first write.)"""
    with running_bastion(postgres_url, tmp_path) as bastion:
        coder, sub = coding_agent(bastion), sub_agent(bastion)
        policy_for(bastion, [sub["client_id"]])
        tokens = bastion.tokens_for(coder)
        actor = own_token(bastion, sub)
        store = bastion.server.store
        create_grant = store.create_grant

        def revoked_first(*args, **kwargs):
            other = Database(bastion.db.url)
            try:
                assert OAuthStore(other).revoke_client(sub["client_id"], time.time(), actor="t")
            finally:
                other.close()
            return create_grant(*args, **kwargs)

        monkeypatch.setattr(store, "create_grant", revoked_first)
        answer = exchange(bastion, coder, tokens["access_token"], actor)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"] == "invalid_request"
        description = answer.json()["error_description"]
        assert description.startswith("actor_token: ") and "revoked" in description, description
        delegated = bastion.db.execute(
            "SELECT grant_id FROM oauth_grants WHERE client_id = ? AND parent_grant_id IS NOT NULL",
            (sub["client_id"],),
        )
        assert delegated == [], "a delegated grant was saved for the revoked actor"


def test_a_refused_exchange_changes_nothing(sqlite_url, tmp_path):
    with running_bastion(sqlite_url, tmp_path) as bastion:
        coder, sub, stranger = coding_agent(bastion), sub_agent(bastion), sub_agent(bastion)
        policy_for(bastion, [sub["client_id"]])
        tokens = bastion.tokens_for(coder)
        actor, outsider = own_token(bastion, sub), own_token(bastion, stranger)
        before = bastion.rows()
        for answer in (
            exchange(bastion, coder, tokens["access_token"], outsider),  # the policy refuses
            exchange(bastion, coder, tokens["access_token"], actor, scope="tools:call"),
            exchange(
                bastion, coder, tokens["access_token"], actor, resource=bastion.other_resource
            ),
            exchange(bastion, coder, tokens["access_token"], actor, task="t-1"),
            exchange(bastion, sub, tokens["access_token"], actor),
        ):
            assert answer.status_code == 400, answer.text
        assert bastion.rows() == before


def test_an_exchange_waits_for_a_fact_change_its_process_heard_of(sqlite_url, tmp_path):
    """As the gateway's messages: a delegation is decided once every fact change the process
    has heard of is applied; one not applied in time refuses it (503), changing nothing."""
    with running_bastion(sqlite_url, tmp_path) as bastion:
        coder, sub = coding_agent(bastion), sub_agent(bastion)
        policy_for(bastion, [sub["client_id"]])
        tokens = bastion.tokens_for(coder)
        actor = own_token(bastion, sub)
        heard: list[bool] = []

        async def applied_in_time() -> bool:
            return heard.pop()

        bastion.server.facts_heard = lambda: applied_in_time() if heard else None
        heard.append(False)
        before = bastion.rows()
        answer = exchange(bastion, coder, tokens["access_token"], actor)
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"] == "temporarily_unavailable"
        assert bastion.rows() == before and not heard
        heard.append(True)
        answer = exchange(bastion, coder, tokens["access_token"], actor)
        assert answer.status_code == 200, answer.text
        assert not heard  # asked, and waited for


def test_a_delegated_token_carries_its_subject_tokens_sign_in_never_another(database_url, tmp_path):
    with running_bastion(database_url, tmp_path) as bastion:
        tokens, delegated = chain_of_three(bastion)
        root = claims(tokens["access_token"])
        assert root["amr"] == ["pwd"] and "acr" not in root  # alice typed her password
        for token in delegated:
            # The actors' own tokens (client credentials) say nothing of a sign-in: each
            # exchange carries the subject's, and a policy sees the person's sign-in all along.
            assert claims(token)["amr"] == ["pwd"] and "acr" not in claims(token)
            seen = bastion.server.verifier.verify(token, bastion.resource, audit=False)
            assert seen.sign_in.amr == ("pwd",)
