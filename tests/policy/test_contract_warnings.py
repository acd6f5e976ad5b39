"""A policy's obligations that the gateway can never act on, as written, are warned of when the
policy is checked (`bastion.decide.contract_warnings`): a rule whose head can only match an
action and resource where its obligation does nothing. Warnings only: the policy loads, and
decides, as it did."""

from __future__ import annotations

import pytest

from bastion.decide import Authorizer
from bastion.facts.model import Entity

HEADER = (
    "actor User {}\nresource McpServer {}\nresource Tool {}\nresource McpResource {}\n"
    "resource Prompt {}\nresource Repo {}\n"
    'allow(_u: User, "connect", McpServer{"desk"});\n'
)


def warnings_of(rules: str) -> list[str]:
    """The warnings of the header and ``rules``, as ``policy check`` and ``PUT /v1/policy``
    give them."""
    return [str(d) for d in Authorizer().check_policy(HEADER + rules, source="p.polar")]


# Each rule written on line 8, the first after the header; each warning names it and its place.
UNENFORCED = [
    (
        'mask(_u: User, "connect", McpServer{"desk"}, "ssn");',
        "a connect has no result to mask",
    ),
    # The resource not typed: "connect" is asked of a McpServer only.
    ('mask(_u: User, "connect", _r, "ssn");', "a connect has no result to mask"),
    (
        'requires_review(_u: User, "connect", _s: McpServer);',
        "a connect has no result to hold for review",
    ),
    # The action a variable bound to "connect" alone.
    (
        'mask(_u: User, action, _s: McpServer, "ssn") if action = "connect";',
        "a connect has no result to mask",
    ),
    (
        'requires_review(_u: User, action, s: McpServer) if s = McpServer{"desk"} and'
        ' action in ["connect"];',
        "a connect has no result to hold for review",
    ),
    ('label(McpServer{"desk"}, "secret");', "no label of a McpServer is ever added"),
    ('label(_s: McpServer, "secret");', "no label of a McpServer is ever added"),
    (
        'label(s, "secret") if s = McpServer{"desk"};',
        "no label of a McpServer is ever added",
    ),
    # A list page is filtered by allow and deny alone.
    ('rate_limit(_u: User, "list", _t: Tool, 3, 60);', "a list page is filtered"),
    ('mask(_u: User, "list", McpResource{"desk/a://b"}, "x");', "a list page is filtered"),
    ('requires_approval(_u: User, "list", _p: Prompt);', "a list page is filtered"),
    ('requires_scope("list", _t: Tool, "desk:see");', "a list page is filtered"),
    ('requires_recent_auth(_u: User, "list", _t: Tool, 60);', "a list page is filtered"),
    ('requires_review(_u: User, "list", _t: Tool);', "a list page is filtered"),
    # An action the gateway never asks of that entity.
    (
        'requires_approval(_u: User, "read", Tool{"desk/send"});',
        'the gateway never asks "read" of a Tool',
    ),
    ('mask(_u: User, "call", _s: McpServer, "x");', 'the gateway never asks "call" of a McpServer'),
    ('rate_limit(_u: User, "connect", _t: Tool, 1, 1);', 'never asks "connect" of a Tool'),
    ("read_only(_u: User, _t: Tool);", "read_only is asked of a McpServer only"),
    ('read_only(_u: User, Tool{"desk/send"});', "read_only is asked of a McpServer only"),
]


@pytest.mark.parametrize(("rule", "why"), UNENFORCED)
def test_a_rule_whose_obligation_the_gateway_never_acts_on_is_warned_of(rule, why):
    found = warnings_of(rule + "\n")
    assert len(found) == 1, found
    head = rule.split(" if ")[0].rstrip(";")
    assert found[0].startswith(f"p.polar:8:1: warning: {head} ")
    assert why in found[0]


ENFORCED = [
    # A variable action also matches the upstream's requests to the client, whose answers the
    # gateway masks.
    'mask(_u: User, _action, _s: McpServer, "ssn");',
    'mask(_u: User, action, McpServer{"desk"}, "ssn") if action = "connect" or'
    ' action = "elicitation/create";',
    'mask(_u: User, action, _s: McpServer, "x") if action in ["connect", "sampling/createMessage"];',
    'mask(_u: User, "elicitation/create", McpServer{"desk"}, "content.secret");',
    "requires_review(_u: User, _action, _s: McpServer);",
    # Obligations connect acts on.
    'requires_approval(_u: User, "connect", McpServer{"desk"});',
    'rate_limit(_u: User, "connect", _s: McpServer, 10, 60);',
    'requires_scope("connect", McpServer{"desk"}, "desk:use");',
    'requires_recent_auth(_u: User, "connect", _s: McpServer, 600);',
    # Results and their labels.
    'mask(_u: User, "call", Tool{"desk/report"}, "ssn");',
    'requires_review(_u: User, "read", _r: McpResource);',
    'label(Tool{"desk/report"}, "pii");',
    'label(_p: Prompt, "internal");',
    'read_only(_u: User, McpServer{"desk"});',
    # Not the gateway's entities, or an action asked of other entities too: another
    # enforcement point may act on them.
    'mask(_u: User, "list", _r: Repo, "x");',
    'rate_limit(_u: User, "list", _r, 3, 60);',
    'requires_approval(_u: User, "read", _r);',
    'label(Repo{"vault"}, "secret");',
    'label(_r, "secret");',
    "read_only(_u: User, _r);",
    'mask(_u: User, "connect", _r: Repo, "x");',
]


@pytest.mark.parametrize("rule", ENFORCED)
def test_a_rule_the_gateway_may_act_on_is_not_warned_of(rule):
    assert warnings_of(rule + "\n") == []


def test_the_policy_loads_and_decides_as_before_even_under_strict():
    rules = (
        'mask(_u: User, "connect", McpServer{"desk"}, "ssn");\n'
        'requires_review(_u: User, "connect", _s: McpServer);\n'
        'label(McpServer{"desk"}, "secret");\n'
    )
    authz = Authorizer()
    authz.check_policy(HEADER + rules, strict=True)  # no PolicyError
    found = authz.load_policy(HEADER + rules, source="p.polar")
    assert [str(w).split(": warning: ")[0] for w in found] == [
        "p.polar:8:1",
        "p.polar:9:1",
        "p.polar:10:1",
    ]
    assert authz.authorize(Entity("User", "sam"), "connect", Entity("McpServer", "desk"))
