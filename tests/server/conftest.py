"""Fixtures for the decision service: an in-process app, and real `bastion serve` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from bastion.server.app import create_app
from bastion.server.config import ServerConfig
from tests import clients
from tests.ports import free_port  # noqa: F401 (re-exported for tests/server)
from tests.waits import PATIENCE, until_ready

ADMIN_KEY = "test-admin-key-" + "x" * 32

POLICY = """
actor User {}

resource Org {
  roles = ["member", "admin"];
  permissions = ["read", "manage"];
  "read" if "member";
  "manage" if "admin";
  "member" if "admin";
}

resource Repo {
  roles = ["reader", "maintainer"];
  permissions = ["read", "push"];
  relations = { parent: Org };
  "read" if "reader";
  "push" if "maintainer";
  "reader" if "maintainer";
  "reader" if "member" on "parent";
}

allow(actor, action, resource) if has_permission(actor, action, resource);
"""


def entity(type_: str, id_: str) -> dict:
    return {"type": type_, "id": id_}


def role(user: str, name: str, type_: str, id_: str) -> dict:
    return {"predicate": "has_role", "args": [entity("User", user), name, entity(type_, id_)]}


@pytest.fixture
def config(sqlite_url, tmp_path) -> ServerConfig:
    policy = tmp_path / "policy.polar"
    policy.write_text(POLICY)
    return ServerConfig(database=sqlite_url, admin_key=ADMIN_KEY, policy_file=str(policy))


@pytest.fixture
def api(config):
    """A TestClient on the whole app (lifespan included), authenticated as admin."""
    with TestClient(create_app(config)) as client:
        client.headers["authorization"] = f"Bearer {ADMIN_KEY}"
        yield client


class ServerProcess:
    """A real ``bastion serve`` subprocess on a free loopback port."""

    def __init__(
        self,
        database: str,
        tmp: Path,
        policy_file: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.database = database
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"serve-{self.port}.log"
        self.policy_file = policy_file
        # Where the process journals its decisions: the test's folder, with PostgreSQL too
        # (not the working directory, shared by every test).
        self.env = {"BASTION_DECISION_JOURNAL_DIR": str(tmp / "decisions"), **(env or {})}
        # Run in the child before `bastion serve` starts: a resource limit it is to run under.
        self.preexec_fn: Callable[[], None] | None = None
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        env = {**os.environ, "BASTION_ADMIN_KEY": ADMIN_KEY, "BASTION_CONFIG": "/nonexistent"}
        env.update(self.env)
        cmd = [sys.executable, "-m", "bastion.cli", "serve", "--database", self.database]
        cmd += ["--port", str(self.port)]
        if self.policy_file:
            cmd += ["--policy-file", self.policy_file]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=self.preexec_fn
            )
        until_ready(self.proc, lambda: clients.ready(self.url), self.log)
        return self

    def client(self) -> httpx.Client:
        return clients.client(
            base_url=self.url, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=60
        )

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(PATIENCE)
            except subprocess.TimeoutExpired:
                self.kill()


def serve_policy(tmp: Path, text: str = POLICY, **env: str) -> ServerProcess:
    """A started `ServerProcess` on a new database in ``tmp``, under the policy ``text``."""
    policy = tmp / "policy.polar"
    policy.write_text(text)
    return ServerProcess(str(tmp / "bastion.db"), tmp, str(policy), env).start()


@pytest.fixture
def serve(tmp_path):
    """Start servers with ``serve(database, **env)`` (``env``: more environment variables, such
    as ``BASTION_MAX_STALENESS_SECONDS="2"``); all are stopped after the test."""
    started: list[ServerProcess] = []
    policy = tmp_path / "policy.polar"
    policy.write_text(POLICY)

    def start(database: str, **env: str) -> ServerProcess:
        server = ServerProcess(database, tmp_path, str(policy), env).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
