"""Replicas whose clocks differ, on one real PostgreSQL: two `bastion serve` processes, the
second one's wall clock moved (`tests/skewed_clock.py`: its `time.time`, as a machine whose clock
has drifted; PostgreSQL's and the first one's are the machine's).

Expiries written by one replica and compared by another (tokens' iat/exp, DPoP jtis kept until
their proof can no longer be accepted, codes, approvals) tolerate a difference of clocks up to
the token leeway (30 s) at best, and some not at all. A replica whose clock is further from the
database's than ``max_clock_skew_seconds`` (2 s) is therefore not ready and decides nothing,
issues no token and spends no proof, until its clock is back (docs/operations.md, "Clocks")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from bastion.db import Database, schema_and_clock
from bastion.facts import store
from bastion.server.app import create_app
from bastion.server.config import ServerConfig
from tests import clients
from tests.conftest import postgres_schema
from tests.delegation.agent_support import ASSERTION_TYPE, assertion, new_key, public_jwks
from tests.gateway.support import ROOT, bastion_serve, start
from tests.identity.test_dpop import SERVER, Holder, bound_tokens, call
from tests.oauth.support import free_socket
from tests.oauth.test_access_tokens import claims_of
from tests.server.conftest import ADMIN_KEY, POLICY
from tests.waits import PATIENCE, eventually

CONFIG = """\
[server]
host = "127.0.0.1"
port = {port}
database = "{database}"
policy_file = "{root}/policy.polar"

[oauth]
issuer = "{issuer}"
key_dir = "{root}/keys"

[[oauth.resources]]
uri = "{issuer}/mcp/desk"
scopes = ["customers:read"]
"""


@dataclass
class Replicas:
    right: str  # the URL of the replica whose clock is the machine's
    skewed: str  # the URL of the one whose clock is moved
    issuer: str
    client: tuple[str, str]  # a confidential client: client_credentials, may introspect
    http: httpx.Client
    log: Path  # what the skewed one wrote


def _config(root: Path, name: str, port: int, database: str, issuer: str) -> Path:
    """The configuration of one replica, in ``root / name``."""
    (root / name).mkdir()
    config = root / name / "bastion.toml"
    config.write_text(CONFIG.format(port=port, database=database, root=root, issuer=issuer))
    return config


def _serve_skewed(config: Path, url: str, skew: float) -> subprocess.Popen:
    """`bastion serve` with its clock ``skew`` seconds off, once its `/readyz` answers what it
    will go on answering: ready, or not ready for its clock. (Just started, it is not ready
    for a moment for another reason: its notification connection is not up yet.)"""
    log = config.parent / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "tests.skewed_clock", str(skew), "serve"]
            + ["--config", str(config)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "BASTION_ADMIN_KEY": ADMIN_KEY},
        )

    def settled() -> bool:
        if server.poll() is not None:
            return True
        try:
            ready = clients.get(f"{url}/readyz", timeout=1)
        except httpx.HTTPError:
            return False
        if ready.status_code == 503:
            return ready.json().get("reason", "").startswith("clock_skew: ")
        return ready.status_code == 200

    if not eventually(settled, every=0.05) or server.poll() is not None:
        server.kill()
        raise AssertionError(f"bastion serve did not come up:\n{log.read_text()}")
    return server


class Cluster:
    """One replica whose clock is the machine's, and beside it one whose clock is moved per
    skew a test asks for, started on first demand and kept for the tests that ask for the same
    skew. Each test reads what it is given (readiness, decisions, the tokens it is issued) and
    spends only proofs of its own; a skewed replica past the bound purges nothing."""

    def __init__(self, root: Path, database: str, stack: ExitStack) -> None:
        self.root, self.database = root, database
        (root / "policy.polar").write_text(POLICY)
        port = free_socket().getsockname()[1]
        self.issuer = f"http://127.0.0.1:{port}"
        config = _config(root, "right", port, database, self.issuer)
        made = subprocess.run(
            [sys.executable, "-m", "bastion.cli", "clients", "create", "--name", "nightly agent"]
            + ["--confidential", "--introspection", "*", "--scope", "customers:read"]
            + ["--config", str(config)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert made.returncode == 0, made.stderr
        said = json.loads(made.stdout)
        self.client = (said["client_id"], said["client_secret"])
        self.processes: list[subprocess.Popen] = []
        stack.callback(_stop_all, self.processes)
        right, self.right = bastion_serve(config, self.issuer, {"BASTION_ADMIN_KEY": ADMIN_KEY})
        self.processes.append(right)
        self.http = stack.enter_context(httpx.Client(timeout=20))
        self.skewed: dict[float, str] = {}

    def with_skew(self, skew: float) -> Replicas:
        if skew not in self.skewed:
            port = free_socket().getsockname()[1]
            config = _config(self.root, _name(skew), port, self.database, self.issuer)
            url = f"http://127.0.0.1:{port}"
            self.processes.append(_serve_skewed(config, url, skew))
            self.skewed[skew] = url
        log = self.root / _name(skew) / "serve.log"
        return Replicas(self.right, self.skewed[skew], self.issuer, self.client, self.http, log)


def _stop_all(processes: list[subprocess.Popen]) -> None:
    """Stop every replica as `stop` does (SIGTERM, or kill), told all at once: each takes a
    while to stop."""
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(PATIENCE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _name(skew: float) -> str:
    return f"skewed{skew:+g}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    with postgres_schema() as database, ExitStack() as stack:
        yield Cluster(tmp_path_factory.mktemp("clocks"), database, stack)


def token(replicas: Replicas, at: str, proof: str | None = None) -> httpx.Response:
    form = {"grant_type": "client_credentials", "resource": f"{replicas.issuer}/mcp/desk"}
    headers = {} if proof is None else {"DPoP": proof}
    return replicas.http.post(f"{at}/token", data=form, auth=replicas.client, headers=headers)


def introspected(replicas: Replicas, at: str, access_token: str) -> httpx.Response:
    return replicas.http.post(
        f"{at}/introspect", data={"token": access_token}, auth=replicas.client
    )


@pytest.mark.parametrize("skew", [-300, 30, 300])
def test_a_replica_whose_clock_is_off_past_the_bound_is_not_ready_and_decides_nothing(
    cluster, skew
):
    running = cluster.with_skew(skew)
    ready = running.http.get(f"{running.skewed}/readyz")
    assert ready.status_code == 503, ready.text
    reason = ready.json()["reason"]
    assert reason.startswith("clock_skew: "), reason
    assert "max_clock_skew_seconds" in reason and "2" in reason
    assert ("ahead of" if skew > 0 else "behind") in reason
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    question = {"actor": "User:alice", "action": "read", "resource": "Org:acme"}
    decided = running.http.post(f"{running.skewed}/v1/authorize", json=question, headers=admin)
    assert decided.status_code == 503, decided.text
    assert "clock" in decided.text
    minted = token(running, running.skewed)
    assert (minted.status_code, minted.json()["error"]) == (503, "temporarily_unavailable")
    # The replica whose clock is right is unaffected.
    assert running.http.get(f"{running.right}/readyz").status_code == 200
    assert token(running, running.right).status_code == 200
    log = running.log.read_text()
    assert "max_clock_skew_seconds" in log, log


@pytest.mark.parametrize("skew", [-1, 1])
def test_a_replica_whose_clock_is_off_within_the_bound_serves_and_its_tokens_are_taken_elsewhere(
    cluster, skew
):
    running = cluster.with_skew(skew)
    ready = running.http.get(f"{running.skewed}/readyz")
    assert ready.status_code == 200, ready.text
    for issuer, checker in ((running.skewed, running.right), (running.right, running.skewed)):
        issued = token(running, issuer)
        assert issued.status_code == 200, issued.text
        shown = introspected(running, checker, issued.json()["access_token"])
        assert shown.json()["active"] is True, (issuer, shown.text)


def test_five_minutes_between_two_replicas_clocks_refuse_no_token_and_replay_no_proof(cluster):
    """What a replica five minutes ahead did before it was held back: its tokens were issued
    in the future for the other (inactive there, ``iat``), and its once-a-minute purge of spent
    DPoP jtis forgot those of proofs the other replica still accepted, so a proof spent there
    was taken again. Now it issues nothing and purges nothing: every token issued is active on
    every replica that answers, and a spent proof stays spent."""
    running = cluster.with_skew(300)
    for issuer, checker in ((running.skewed, running.right), (running.right, running.skewed)):
        issued = token(running, issuer)
        if issued.status_code != 200:
            continue
        shown = introspected(running, checker, issued.json()["access_token"])
        if shown.status_code == 200:
            assert shown.json()["active"] is True, (
                issuer,
                claims_of(issued.json()["access_token"])[1],
                shown.text,
            )
    holder = Holder()
    url = f"{running.issuer}/token"
    spent = holder.proof("POST", url)
    first = token(running, running.right, spent)
    assert first.status_code == 200, first.text
    # A proof the skewed replica takes as new (its clock says now): it spends it, and may
    # forget the jtis it thinks expired.
    token(running, running.skewed, holder.proof("POST", url, iat=int(time.time()) + 300))
    again = token(running, running.right, spent)
    assert again.status_code == 400, again.text
    assert "already used" in again.json()["error_description"]


@pytest.mark.parametrize("skew", [-300, 300])
def test_the_clock_is_compared_with_postgresqls_and_sqlite_has_no_other(
    database_url, monkeypatch, skew
):
    db = Database(database_url)
    try:
        db.migrate("facts", store._MIGRATIONS)
        machine = time.time
        monkeypatch.setattr(time, "time", lambda: machine() + skew)
        newer, measured = schema_and_clock(db)
    finally:
        db.close()
    assert newer is None
    if db.is_postgres:
        assert measured is not None and abs(measured) > 2 and (measured > 0) == (skew > 0)
    else:
        assert measured is None  # one machine, one clock: nothing to compare


def test_a_replica_decides_again_once_its_clock_is_back_within_the_bound(
    tmp_path, postgres_url, monkeypatch
):
    """The check runs at start and every second, off the event loop: a clock that jumps stops
    the replica, and one set right again (NTP) lets it decide again, without a restart."""
    policy = tmp_path / "policy.polar"
    policy.write_text(POLICY)
    config = ServerConfig(database=postgres_url, admin_key=ADMIN_KEY, policy_file=str(policy))
    question = {"actor": "User:alice", "action": "read", "resource": "Org:acme"}
    machine = time.time
    with TestClient(create_app(config)) as api:
        api.headers["authorization"] = f"Bearer {ADMIN_KEY}"

        def reason() -> str:
            ready = api.get("/readyz")
            return "" if ready.status_code == 200 else ready.json()["reason"]

        assert api.post("/v1/authorize", json=question).status_code == 200
        monkeypatch.setattr(time, "time", lambda: machine() - 10)
        assert eventually(lambda: reason().startswith("clock_skew: ")), reason()
        assert "behind the database's" in reason()
        refused = api.post("/v1/authorize", json=question)
        assert refused.status_code == 503, refused.text
        assert "max_clock_skew_seconds" in refused.text
        monkeypatch.setattr(time, "time", machine)
        assert eventually(lambda: reason() == ""), reason()
        assert api.post("/v1/authorize", json=question).status_code == 200


def test_a_skewed_replica_refuses_before_it_spends_a_proof_or_an_assertion(
    tmp_path, postgres_url, monkeypatch
):
    """A replica past max_clock_skew_seconds decides nothing; it refused a gateway call with a
    DPoP proof, and a token request authenticated by a client assertion, only after it had
    recorded the proof's (the assertion's) jti as spent, so the client's retry of the very same
    request on a healthy replica was refused as a replay. Now it refuses first and spends
    nothing: the retry goes through. (Both replicas run in this process, so both clocks move,
    and the retry waits for them to come back; a jti spent is spent on every replica.)"""
    initial = "initial-access-token-of-the-skew-test"
    with start(
        tmp_path, replicas=1, database=postgres_url, oauth={"initial_access_tokens": [initial]}
    ) as bastion:
        holder = Holder()
        token = bound_tokens(bastion, holder)[1]["access_token"]
        key = new_key("skewed")
        registered = bastion.http.post(
            f"{bastion.url}/register",
            headers={"Authorization": f"Bearer {initial}"},
            json={
                "client_name": "agent signing its requests",
                "token_endpoint_auth_method": "private_key_jwt",
                "grant_types": ["client_credentials"],
                "scope": "customers:read",
                "jwks": public_jwks(key),
            },
        )
        assert registered.status_code == 201, registered.text
        client_id = registered.json()["client_id"]
        proof = holder.proof("POST", bastion.mcp_url(SERVER), token)
        form = {
            "grant_type": "client_credentials",
            "resource": bastion.mcp_url(SERVER),
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion(key, client_id, bastion.url),
        }

        def reasons() -> list[str]:
            answers = [
                bastion.http.get(f"{url}/readyz") for url in (bastion.url, *bastion.replicas)
            ]
            return ["" if a.status_code == 200 else a.json()["reason"] for a in answers]

        machine = time.time
        monkeypatch.setattr(time, "time", lambda: machine() - 10)
        assert eventually(lambda: all(r.startswith("clock_skew: ") for r in reasons()))
        refused = call(bastion, token, [proof])
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"] == "temporarily_unavailable"
        assert "the DPoP proof is not spent" in refused.json()["error_description"]
        # Refused before any decision, so in no decision record: audited as such a refusal is.
        refusals = bastion.app.state.oauth.audit.events("mcp.refused", 1000)
        assert [(e.detail["reason"], e.detail["server"]) for e in refusals] == [
            ("facts_stale", SERVER)
        ], refusals
        minted = bastion.http.post(f"{bastion.url}/token", data=form)
        assert (minted.status_code, minted.json()["error"]) == (503, "temporarily_unavailable")

        monkeypatch.setattr(time, "time", machine)
        assert eventually(lambda: reasons() == ["", ""]), reasons()
        healthy = bastion.replicas[0]
        retried = call(bastion, token, [proof], url=f"{healthy}/mcp/{SERVER}")
        assert retried.status_code == 200, retried.text
        minted = bastion.http.post(f"{healthy}/token", data=form)
        assert minted.status_code == 200, minted.text
