"""The gateway's decision contract: every principal of a chain must be allowed; obligations."""

from __future__ import annotations

from bastion import Authorizer, Entity
from bastion.decide.contract import RateLimit, decide_chain

POLICY = """
actor User {}
actor Agent {}
resource Tool {
  roles = ["caller"];
  permissions = ["call"];
  "call" if "caller";
}
declare pii_tool(Tool);

requires_scope("call", tool: Tool, "crm.write") if tool = Tool{"crm/delete"};
mask(_actor, "call", tool: Tool, "$.customers[*].email") if pii_tool(tool);
rate_limit(_agent: Agent, "call", _tool: Tool, 5, 60);
requires_approval(_user: User, "call", Tool{"crm/delete"});
"""

ann, bot = Entity("User", "ann"), Entity("Agent", "bot")
search, delete = Entity("Tool", "crm/search"), Entity("Tool", "crm/delete")


def authz() -> Authorizer:
    a = Authorizer(POLICY)
    a.facts.apply(
        [
            ("has_role", ann, "caller", search),
            ("has_role", ann, "caller", delete),
            ("has_role", bot, "caller", search),
            ("pii_tool", search),
        ],
        [],
    )
    return a


def test_agent_cannot_exceed_the_user_it_acts_for():
    a = authz()
    a.facts.delete(("has_role", ann, None, search))
    decision = decide_chain(a, [ann, bot], "call", search)
    assert not decision.allowed and decision.refused_by == ann


def test_user_cannot_lend_an_agent_what_the_agent_lacks():
    decision = decide_chain(authz(), [ann, bot], "call", delete, granted_scopes=["crm.write"])
    assert not decision.allowed and decision.refused_by == bot


def test_an_empty_chain_is_refused():
    assert not decide_chain(authz(), [], "call", search).allowed


def test_obligations_masks_and_rate_limits_per_principal():
    decision = decide_chain(authz(), [ann, bot], "call", search, granted_scopes=[])
    assert decision.allowed
    assert decision.obligations.masks == ("$.customers[*].email",)
    assert decision.obligations.rate_limits == (RateLimit(bot, 5, 60),)
    assert not decision.obligations.requires_approval


def test_missing_scope_refuses_with_the_scope_to_step_up_to():
    a = authz()
    a.facts.insert(("has_role", bot, "caller", delete))
    refused = decide_chain(a, [ann, bot], "call", delete, granted_scopes=["crm.read"])
    assert (
        not refused.allowed
        and refused.missing_scopes == ("crm.write",)
        and refused.refused_by is None
    )
    granted = decide_chain(a, [ann, bot], "call", delete, granted_scopes=["crm.read", "crm.write"])
    assert granted.allowed and granted.obligations.required_scopes == ("crm.write",)
    assert granted.obligations.requires_approval


def test_a_policy_without_obligation_rules_has_none():
    a = Authorizer(
        'actor User {}\nresource Tool { roles = ["r"]; permissions = ["call"]; "call" if "r"; }'
    )
    a.facts.insert(("has_role", ann, "r", search))
    decision = decide_chain(a, [ann], "call", search, granted_scopes=[])
    assert (
        decision.allowed
        and decision.obligations.masks == ()
        and decision.obligations.rate_limits == ()
    )


def test_a_mask_whose_path_is_not_text_masks_everything_rather_than_nothing():
    # A rule that fires with a number or a boolean for its path still asks for a mask: dropping it
    # would send the result unmasked. It stands for a path that cannot be read (the whole
    # value, see bastion.gateway.masks.compile_paths).
    a = Authorizer(
        'actor User {}\nresource Tool {}\nallow(_u: User, "call", _t: Tool);\n'
        'mask(_u: User, "call", _t: Tool, path) if path = context.path;'
    )
    for path in (0, 1.5, True):
        decision = decide_chain(a, (ann,), "call", search, {"path": path})
        assert decision.allowed and decision.obligations.masks == ("",), path


def test_a_rate_limit_that_cannot_be_counted_refuses_rather_than_lets_through():
    # A limit whose numbers are not whole (5.0 calls, a 60.5 s window), not numbers, or a window
    # of no time, is still a limit asked for: dropping it would admit every call.
    for numbers in ("5, 60.5", "5.0, 60", '"5", 60', "5, 0", "true, 60"):
        a = Authorizer(
            'actor User {}\nresource Tool {}\nallow(_u: User, "call", _t: Tool);\n'
            f'rate_limit(_u: User, "call", _t: Tool, {numbers});'
        )
        decision = decide_chain(a, (ann,), "call", search, {})
        assert decision.obligations.rate_limits == (RateLimit(ann, 0, 1),), numbers
