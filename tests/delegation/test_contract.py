"""`decide_delegation`: the two contract rules of token exchange, asked of a real Authorizer.
Deny by default, scopes only where ``delegated_scope`` holds, and a refusal (fail closed) when
the evaluation spends its budget."""

from __future__ import annotations

from bastion.decide import Authorizer
from bastion.decide.contract import decide_delegation
from bastion.facts.model import Entity

CODER, BOT, STUDIO = Entity("Agent", "coder"), Entity("Agent", "bot"), Entity("McpServer", "studio")
SAM = Entity("User", "sam")

RULES = """
actor User {}
actor Agent {}
resource McpServer {}
declare trusted(Agent, McpServer);
may_delegate(_from: Agent, to: Agent, server: McpServer) if trusted(to, server);
delegated_scope(_u: User, _f: Agent, _t: Agent, _s: McpServer, "files:read");
delegated_scope(_u: User, _f: Agent, _t: Agent, _s: McpServer, "svg:write") if
  context.network.zone = "corp";
"""

# may_delegate holds only at the end of a chain of hops longer than the evaluation budget.
DEEP = """
actor Agent {}
resource McpServer {}
declare hop(Agent, Agent);
reach(a, b) if hop(a, b);
reach(a, b) if hop(a, c) and reach(c, b);
may_delegate(from: Agent, to: Agent, _s: McpServer) if reach(from, to);
"""


def test_without_rules_nobody_may_delegate():
    decision = decide_delegation(Authorizer("actor Agent {}"), SAM, CODER, BOT, STUDIO, ["a"])
    assert not decision.allowed and decision.scopes == ()


def test_may_delegate_decides_and_delegated_scope_trims_in_the_context():
    authz = Authorizer(RULES)
    assert not decide_delegation(authz, SAM, CODER, BOT, STUDIO, ["files:read"]).allowed
    authz.facts.insert(("trusted", BOT, STUDIO))
    wanted = ["files:read", "svg:write", "admin"]
    outside = decide_delegation(authz, SAM, CODER, BOT, STUDIO, wanted, {"network": {"zone": "x"}})
    assert outside.allowed and outside.scopes == ("files:read",)
    inside = decide_delegation(
        authz, SAM, CODER, BOT, STUDIO, wanted, {"network": {"zone": "corp"}}
    )
    assert inside.scopes == ("files:read", "svg:write")
    other = Entity("McpServer", "elsewhere")
    assert not decide_delegation(authz, SAM, CODER, BOT, other, wanted).allowed


def test_a_delegation_whose_evaluation_spends_its_budget_is_refused():
    authz = Authorizer(DEEP)
    hops = [("hop", Entity("Agent", f"a{i}"), Entity("Agent", f"a{i + 1}")) for i in range(400)]
    authz.facts.apply(hops, [])
    far = Entity("Agent", "a400")
    decision = decide_delegation(authz, SAM, Entity("Agent", "a0"), far, STUDIO, ["files:read"])
    assert not decision.allowed and decision.reason == "evaluation_limit"
    near = decide_delegation(
        authz, SAM, Entity("Agent", "a0"), Entity("Agent", "a5"), STUDIO, ["files:read"]
    )
    assert near.allowed and near.scopes == ()
