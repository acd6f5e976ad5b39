"""A real `bastion serve` for the official `oso-cloud` SDK (tests/oso_cloud), with API keys of
each /api scope, on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import httpx
import pytest
from oso_cloud import Oso

from tests.conftest import POSTGRES_URL, require_service
from tests.server.conftest import ADMIN_KEY, ServerProcess

POLICY = """
actor User {}
actor Agent {}

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

resource Tool {}

declare is_public(Repo);
declare has_label(Repo, String, Integer);

allow(actor, action, resource) if has_permission(actor, action, resource);
allow(_user: User, "read", repo: Repo) if is_public(repo);

# bastion's guardrail: deny wins over allow, in authorize and in a query of allow alike.
declare is_archived(Repo);
deny(_user: User, "push", repo: Repo) if is_archived(repo);

# What agents did, as their events report it (context.behavior, docs/oso-cloud.md).
allow(agent: Agent, "call", _tool: Tool) if
  context.behavior.agent.calls.minute.count < 5 and
  context.behavior.agent.destructive.hour.count = 0 and
  context.behavior.agent.refusals.hour.count < 2 and
  context.behavior.agent.targets.hour.count < 3 and
  context.behavior.tool.bytes.hour.count < 1000;
allow(user: User, "call", _tool: Tool) if context.behavior.user.calls.hour.count < 2;
"""


@dataclass
class Running:
    server: ServerProcess
    keys: dict[str, str]

    @property
    def url(self) -> str:
        return self.server.url

    def oso(self, *scopes: str) -> Oso:
        """The SDK with a key of these scopes (made once per set of scopes)."""
        name = ",".join(sorted(scopes))
        if name not in self.keys:
            with self.server.client() as admin:
                r = admin.post("/v1/keys", json={"name": name, "scopes": sorted(scopes)})
                r.raise_for_status()
                self.keys[name] = r.json()["key"]
        return Oso(url=self.url, api_key=self.keys[name])


def _schema_url() -> tuple[str, str]:
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return schema, f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"


def start(tmp_path, database: str, policy: str = POLICY) -> Running:
    path = tmp_path / "policy.polar"
    path.write_text(policy)
    server = ServerProcess(database, tmp_path, str(path)).start()
    return Running(server, {})


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def bastion(request, tmp_path_factory):
    """One server per module and database, with the policy above."""
    tmp = tmp_path_factory.mktemp("oso-cloud")
    schema = None
    if request.param == "sqlite":
        database = str(tmp / "bastion.db")
    else:
        require_service("PostgreSQL", "127.0.0.1", 5432)
        schema, database = _schema_url()
    running = start(tmp, database)
    yield running
    running.server.stop()
    if schema is not None:
        import psycopg

        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(scope="module")
def oso(bastion) -> Oso:
    """The SDK with a read-write key, as an application holds one."""
    return bastion.oso("oso:read", "oso:write")


def admin(bastion) -> httpx.Client:
    return httpx.Client(
        base_url=bastion.url, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30
    )
