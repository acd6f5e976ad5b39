"""An obligation whose condition cannot be decided applies at the gateway: a tool argument of
another kind (``"amount": "5000"`` against ``context.arguments.amount > 1000``) never lets a call
through without the approval, the read-only mode, the mask, the rate limit or the scope that the
same amount as a number would have asked for. One whose answers cannot be named at all refuses
the call, and the record says which rule."""

from __future__ import annotations

import anyio
import pytest

from bastion.audit.decisions import DecisionRecords
from bastion.db import Database
from bastion.decide import Authorizer
from bastion.facts.model import Entity
from bastion.gateway.enforce import Caller, Enforcer, StepUp, Verdict
from bastion.gateway.jsonrpc import RpcError

POLICY = """
actor User {}
actor Agent {}
resource Tool {}
resource McpServer {}
allow(_actor, "call", _tool: Tool);
requires_approval(_: User, "call", Tool{"desk/pay"}) if context.arguments.amount > 1000;
read_only(_: User, McpServer{"ro"}) if context.arguments.amount > 1000;
mask(_: User, "call", Tool{"desk/mask"}, "ssn") if context.arguments.amount > 1000;
rate_limit(_: User, "call", Tool{"desk/limit"}, 1, 60) if context.arguments.amount > 1000;
requires_scope("call", Tool{"desk/scope"}, "pay:large") if context.arguments.amount > 1000;
rate_limit(_: User, "call", Tool{"desk/per"}, n, 60) if n = 1000 / context.arguments.per;
requires_scope("call", Tool{"desk/scoped"}, s) if s = context.arguments.scope;
"""

CALLER = Caller("sam", "agent", frozenset(), "127.0.0.1", "2025-11-25", "g-1", "s-1")


def enforcer(tmp_path) -> Enforcer:
    records = DecisionRecords(Database(str(tmp_path / "records.db")))
    authz = Authorizer(POLICY)
    return Enforcer(lambda: authz, records)


def call(gate: Enforcer, tool: str, arguments: dict) -> Verdict | Exception:
    """The gateway's decision on a call of ``tool`` (``server/name``) with ``arguments``: the
    verdict, or what it raised (a refusal, a step-up)."""
    server = tool.split("/")[0]
    resource = Entity("Tool", tool)

    async def decide() -> Verdict:
        context = gate.context(CALLER, server, "tools/call", arguments=arguments)
        verdict = await gate.decide(
            CALLER, server, "tools/call", "call", resource, context, arguments
        )
        gate.write(verdict.record)
        return verdict

    try:
        return anyio.run(decide)
    except (RpcError, StepUp) as refusal:
        return refusal


def reason(outcome: Verdict | Exception) -> str | None:
    """The reason a refusal gives (None for an allowed call); "step_up" and its scopes for one."""
    if isinstance(outcome, StepUp):
        return f"step_up {' '.join(outcome.scopes)}"
    if isinstance(outcome, RpcError):
        return outcome.data["reason"]
    return None


def masked(outcome: Verdict | Exception) -> tuple[str, ...] | None:
    return outcome.obligations.masks if isinstance(outcome, Verdict) else None


def twice(gate: Enforcer, tool: str, arguments: dict) -> str | None:
    """The reason the second of two calls is refused for (a limit of one call a minute)."""
    assert reason(call(gate, tool, arguments)) is None
    return reason(call(gate, tool, arguments))


# Each obligation: the tool it is put on, how a call's outcome shows it, and what it shows when
# it applies. No approval service here: a call that must be approved is refused (fail closed).
OBLIGATIONS = {
    "requires_approval": (
        "desk/pay",
        lambda g, t, a: reason(call(g, t, a)),
        "approval_unavailable",
    ),
    "read_only": ("ro/write", lambda g, t, a: reason(call(g, t, a)), "read_only"),
    "requires_scope": ("desk/scope", lambda g, t, a: reason(call(g, t, a)), "step_up pay:large"),
    "mask": ("desk/mask", lambda g, t, a: masked(call(g, t, a)), ("ssn",)),
    "rate_limit": ("desk/limit", twice, "rate_limited"),
}


@pytest.mark.parametrize("amount", [5000, "5000", True, [5000]])
@pytest.mark.parametrize("obligation", OBLIGATIONS)
def test_an_amount_of_another_kind_gets_the_obligation_a_large_amount_gets(
    tmp_path, obligation, amount
):
    tool, outcome, applied = OBLIGATIONS[obligation]
    assert outcome(enforcer(tmp_path), tool, {"amount": amount}) == applied


def test_a_small_amount_gets_none_of_them(tmp_path):
    gate = enforcer(tmp_path)
    for tool in ("desk/pay", "ro/write", "desk/scope", "desk/limit", "desk/limit"):
        assert reason(call(gate, tool, {"amount": 50})) is None, tool
    masked = call(gate, "desk/mask", {"amount": 50})
    assert isinstance(masked, Verdict) and masked.obligations.masks == ()


def test_an_obligation_whose_values_cannot_be_named_refuses_and_is_recorded(tmp_path):
    """``n = 1000 / context.arguments.per`` with ``per`` 0: no limit can be named, so the call
    is refused with reason "undecided", the record and the error naming ``rate_limit``."""
    gate = enforcer(tmp_path)
    assert reason(call(gate, "desk/per", {"per": 10})) is None
    refused = call(gate, "desk/per", {"per": 0})
    assert reason(refused) == "undecided"
    assert isinstance(refused, RpcError) and "rate_limit rule cannot be decided" in refused.message
    gate.records.flush()
    written = [r for _, r in gate.records.after(0)]
    assert [(r.result, r.reason) for r in written] == [("allow", ""), ("deny", "undecided")]
    assert written[-1].obligations["undecided"] == "rate_limit"


@pytest.mark.parametrize("scope", [7, ["pay:large"], True])
def test_a_required_scope_that_is_no_text_refuses_the_call_and_is_recorded(tmp_path, scope):
    """A scope the rule names that is no text cannot be asked of any token: dropped, the call
    would need none. It is refused with reason "undecided", the record naming the rule."""
    gate = enforcer(tmp_path)
    assert reason(call(gate, "desk/scoped", {"scope": "pay:large"})) == "step_up pay:large"
    assert reason(call(gate, "desk/scoped", {})) is None
    refused = call(gate, "desk/scoped", {"scope": scope})
    assert reason(refused) == "undecided"
    assert isinstance(refused, RpcError)
    assert "requires_scope rule cannot be decided" in refused.message
    gate.records.flush()
    written = [r for _, r in gate.records.after(0)]
    assert (written[-1].result, written[-1].reason) == ("deny", "undecided")
    assert written[-1].obligations["undecided"] == "requires_scope"
