"""A bastion with approvals for the API and CLI tests: a policy with approvers, a bastion.toml with
[oauth] and [gateway] (which bring approvals), and held calls made as the gateway makes them, by
an `Approvals` on the same database and key directory."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from bastion import Authorizer, Entity
from bastion.approvals.service import BINDING_KEY, SEALING_KEY, Approvals, Call
from bastion.approvals.settings import ApprovalSettings
from bastion.approvals.store import ApprovalRequest, ApprovalStore
from bastion.audit.log import AuditLog
from bastion.db import Database
from bastion.facts.store import FactStore
from bastion.oauth.keys import deployment_secret
from bastion.oauth.store import OAuthStore
from bastion.policy.parser import parse_fact

# Users, agents and tools; who may call a tool is a role on it; sam's manager is a fact.
POLICY_HEAD = """
actor User {}
actor Agent {}
resource Tool {
  roles = ["caller"];
  permissions = ["call"];
  "call" if "caller";
}
declare manager(User, User);
declare approval_grant(User, Agent, String, Tool);

allow(actor, action, resource) if has_permission(actor, action, resource);
"""

POLICY = (
    POLICY_HEAD
    + """allow(_agent: Agent, "call", _tool: Tool);
requires_approval(_user: User, "call", Tool{"crm/send"});
requires_approval(_user: User, "call", Tool{"crm/delete"});
requires_review(_user: User, "call", Tool{"crm/report"});
approver(boss: User, user: User, "call", Tool{"crm/send"}) if manager(user, boss);
approver(boss: User, user: User, "call", Tool{"crm/report"}) if manager(user, boss);
approver(User{"cfo"}, _user: User, "call", Tool{"crm/report"});
mask(User{"cfo"}, "call", Tool{"crm/report"}, "customers.*.email");
approval_window(_user: User, "call", Tool{"crm/send"}, 30);
# Large amounts for 5 minutes at most: an amount that cannot be compared ("5000") too.
approval_window(_user: User, "call", Tool{"crm/send"}, 5) if context.arguments.amount > 1000;
"""
)

FACTS = """
manager(User{"sam"}, User{"avery"})
has_role(User{"sam"}, "caller", Tool{"crm/send"})
has_role(User{"sam"}, "caller", Tool{"crm/delete"})
has_role(User{"sam"}, "caller", Tool{"crm/report"})
"""

SEND, DELETE, REPORT = (
    Entity("Tool", "crm/send"),
    Entity("Tool", "crm/delete"),
    Entity("Tool", "crm/report"),
)


def facts() -> list[tuple]:
    return [parse_fact(line) for line in FACTS.strip().splitlines()]


def config(url: str, database: str, key_dir: Path) -> str:
    """bastion.toml of a server at ``url`` with a gateway (no upstream is needed to hold calls
    in these tests) and so approvals."""
    return f"""
[server]
database = "{database}"

[oauth]
issuer = "{url}"
key_dir = "{key_dir}"

[[oauth.resources]]
uri = "{url}/mcp/crm"
scopes = ["crm"]

[gateway]
upstreams = []
"""


def store_policy_and_facts(database: str) -> None:
    """What `bastion serve --policy-file` and `bastion facts insert` would store."""
    db = Database(database)
    try:
        store = FactStore(db)
        if store.policy() is None:
            store.put_policy(POLICY, source="policy.polar", actor="test")
        store.apply(facts())
    finally:
        db.close()


_calls = itertools.count(1)


class Holder:
    """Holds calls as the gateway does, on the deployment's database and key directory."""

    def __init__(self, database: str, key_dir: Path, issuer: str, clock=time.time) -> None:
        self.db = Database(database)
        authz = Authorizer(POLICY)
        authz.facts.apply(facts(), [])
        self.approvals = Approvals(
            ApprovalStore(self.db, deployment_secret(key_dir, SEALING_KEY), clock),
            FactStore(self.db),
            lambda: authz,
            lambda: 1,
            # A module's tests hold many calls of one agent, each waiting as a test left it.
            ApprovalSettings(max_pending_per_agent=10_000),
            issuer,
            deployment_secret(key_dir, BINDING_KEY),
            AuditLog(self.db, clock),
            clock,
            user_state=OAuthStore(self.db).user_state,  # as a server's approvals read it
        )

    def hold(
        self,
        tool: Entity,
        arguments: dict | None = None,
        *,
        kind: str = "approval",
        result=None,
        agents: tuple[str, ...] = (),
        subject: str = "sam",
        client_id: str = "bot",
        task: str = "",
    ) -> ApprovalRequest:
        """A new held call of sam's agent ``bot`` (distinct arguments each time unless given);
        ``agents``, a delegated token's chain ending with ``bot``; ``subject`` and
        ``client_id`` the same name for an agent acting as itself; ``task``, the token's."""
        if arguments is None:
            arguments = {"to": f"customer{next(_calls)}@example.com"}
        call = Call(
            kind,
            subject,
            client_id,
            "crm",
            "tools/call",
            "call",
            tool,
            arguments,
            repr(sorted(arguments.items())),
            agents,
            task,
        )
        rule = "requires_review" if kind == "review" else "requires_approval"
        return self.approvals.hold(call, "decision-1", (f"{rule}(...)",), {}, result=result)

    def close(self) -> None:
        self.db.close()
