"""An entity whose id is a value of the request: ``Device{context.device.id}``, ``Device{x}``.

The entity of that type whose id is that string; any other value (a missing field, a number, a
boolean, a list, an object, an empty string) makes the condition that reads it false, never an
error and never a match. An id known at load time not to be a string is a load error where it
is written.
"""

from __future__ import annotations

import pytest

from bastion import Authorizer, Entity, PolicyError
from bastion.policy import ast, load
from bastion.policy.parser import parse
from bastion.policy.program import context_roots

POLICY = """
actor User {}
resource Tool {}
resource Device {}

declare device_compliance(Device, String);
declare signal(Device, String, Boolean, String, Integer);
declare owns(User, Device);

# Guardrail: a call from a device reported not compliant is refused.
deny(_u: User, "call", _t: Tool) if device_compliance(Device{context.device.id}, "not-compliant");
# Fail closed: reading needs a device known to be compliant.
allow(_u: User, "read", _t: Tool) if device_compliance(Device{context.device.id}, "compliant");
allow(_u: User, "call", _t: Tool);
# An entity passed to a rule, compared, and type-checked.
allow(u: User, "manage", _t: Tool) if
  d = Device{context.device.id} and d matches Device and own_device(u, d);
own_device(u: User, d: Device) if owns(u, d);
# From a bound variable, and read from a signal.
allow(_u: User, "sync", _t: Tool) if
  id = context.device.id and signal(Device{id}, "encrypted", true, "mdm", _at);
"""

SAM, TOOL = Entity("User", "sam"), Entity("Tool", "desk/delete")
LAPTOP, PHONE = Entity("Device", "laptop-7"), Entity("Device", "phone-2")


@pytest.fixture
def authz() -> Authorizer:
    authz = Authorizer(POLICY, source="p.polar")
    authz.facts.apply(
        [
            ("device_compliance", LAPTOP, "not-compliant"),
            ("device_compliance", PHONE, "compliant"),
            ("owns", SAM, PHONE),
            ("signal", PHONE, "encrypted", True, "mdm", 1800000000),
        ],
        [],
    )
    return authz


def device(value) -> dict:
    return {"device": {"id": value}}


def test_the_parser_reads_an_entity_whose_id_is_a_context_field_or_a_variable():
    (rule,) = parse('f(x) if g(Device{context.device.id}, Device{x}, Device{"a"});').rules
    made, from_var, literal = rule.body.args
    assert made == ast.EntityOf("Device", ast.ContextPath(("device", "id"), None), None)
    assert from_var == ast.EntityOf("Device", ast.Var("x", None), None)
    assert literal == ast.Const(Entity("Device", "a"), None)  # a literal stays a constant


def test_a_call_from_a_device_reported_not_compliant_is_refused(authz):
    assert not authz.authorize(SAM, "call", TOOL, device("laptop-7"))
    assert authz.authorize(SAM, "call", TOOL, device("phone-2"))
    assert authz.authorize(SAM, "call", TOOL, device("tablet-1"))


def test_reading_needs_a_device_known_to_be_compliant(authz):
    assert authz.authorize(SAM, "read", TOOL, device("phone-2"))
    assert not authz.authorize(SAM, "read", TOOL, device("laptop-7"))
    assert not authz.authorize(SAM, "read", TOOL, device("tablet-1"))
    assert not authz.authorize(SAM, "read", TOOL, {"device": {}})
    assert not authz.authorize(SAM, "read", TOOL, None)


@pytest.mark.parametrize(
    "value",
    ["", 7, 0, True, False, 1.5, ["phone-2"], ["Device", "phone-2"], {"id": "phone-2"}, None],
)
def test_an_id_that_is_not_a_non_empty_string_matches_no_entity(authz, value):
    assert not authz.authorize(SAM, "read", TOOL, device(value))
    assert not authz.authorize(SAM, "manage", TOOL, device(value))
    assert not authz.authorize(SAM, "sync", TOOL, device(value))
    assert authz.authorize(SAM, "call", TOOL, device(value))  # the guardrail does not hold
    assert authz.actions(SAM, TOOL, device(value)) == {"call"}


def test_the_entity_is_a_value_like_any_other(authz):
    assert authz.authorize(SAM, "manage", TOOL, device("phone-2"))
    assert not authz.authorize(SAM, "manage", TOOL, device("laptop-7"))
    assert authz.authorize(SAM, "sync", TOOL, device("phone-2"))
    assert not authz.authorize(SAM, "sync", TOOL, device("laptop-7"))
    assert authz.actions(SAM, TOOL, device("phone-2")) == {"call", "read", "manage", "sync"}
    assert authz.list(SAM, "read", "Tool", device("phone-2")) == []  # no fact names a tool


def test_the_explanation_prints_the_deciding_rule_as_written(authz):
    denied = authz.decide(SAM, "call", TOOL, device("laptop-7")).explanation
    assert not denied.allowed
    text = str(denied)
    assert 'device_compliance(Device{context.device.id}, "not-compliant")' in text
    assert 'device_compliance(Device{"laptop-7"}, "not-compliant")' in text
    allowed = str(authz.decide(SAM, "read", TOOL, device("phone-2")).explanation)
    assert 'device_compliance(Device{"phone-2"}, "compliant")' in allowed
    refused = authz.decide(SAM, "read", TOOL, device(7)).explanation
    assert not refused.allowed and "missing" in str(refused)


def test_a_rule_reading_the_id_counts_as_reading_that_context_field():
    authz = Authorizer(POLICY)
    assert "device" in context_roots(authz.policy.program)


def test_an_entity_made_from_a_value_does_not_change_the_fact_types_it_reads():
    # device_compliance(Device, String) is inferred from the call, as for Device{"x"}.
    authz = Authorizer(
        'actor User {}\nresource Device {}\nresource Tool {}\nallow(_: User, "call", _: Tool)'
        ' if device_compliance(Device{context.device.id}, "compliant");'
    )
    authz.facts.apply([("device_compliance", LAPTOP, "compliant")], [])
    assert authz.authorize(SAM, "call", TOOL, device("laptop-7"))
    with pytest.raises(Exception, match="device_compliance"):
        authz.facts.apply([("device_compliance", SAM, "compliant")], [])


# -- load-time checks -------------------------------------------------------------------------

BASE = "actor User {}\nresource Device {}\nresource Tool {}\n"


def errors_of(text: str, strict: bool = False) -> list[str]:
    with pytest.raises(PolicyError) as err:
        load([("p.polar", BASE + text)], strict=strict)
    return [str(d) for d in err.value.diagnostics if d.severity == "error"]


@pytest.mark.parametrize(
    ("body", "found"),
    [
        ("f(Device{1})", "Integer"),
        ("f(Device{true})", "Boolean"),
        ("f(Device{1.5})", "Float"),
        ('f(Device{["a"]})', "a list"),
        ('f(Device{User{"a"}})', "User"),
        ("f(Device{Device{context.x}})", "Device"),
        ("f(Device{context.n + 1})", "a number"),
        ("x matches Integer and f(Device{x})", "Integer"),
    ],
)
def test_an_id_known_not_to_be_a_string_is_refused_where_it_is_written(body, found):
    (message,) = errors_of(f'allow(_: User, "call", _t: Tool) if {body};')
    assert message.startswith("p.polar:4:"), message
    assert f"the id of a Device must be a String, not {found}" in message


@pytest.mark.parametrize("type_name", ["Float", "Actor", "Resource"])
def test_an_entity_of_a_type_no_entity_has_is_refused(type_name):
    (message,) = errors_of(f'allow(_: User, "call", _t: Tool) if f({type_name}{{context.x}});')
    assert message.startswith("p.polar:4:") and f"{type_name} is not an entity type" in message


def test_an_undeclared_type_is_a_warning_and_an_error_under_strict():
    text = 'allow(_: User, "call", _t: Tool) if f(Devcie{context.x});'
    authz = Authorizer(BASE + text, source="p.polar")
    (warning,) = [str(w) for w in authz.policy.warnings if "Devcie" in str(w)]
    assert "type Devcie is not declared" in warning and "did you mean Device?" in warning
    assert any("type Devcie is not declared" in e for e in errors_of(text, strict=True))


def test_an_entity_made_from_a_value_is_not_a_rule_parameter():
    (message,) = errors_of("f(Device{x}) if x = context.x;")
    assert message.startswith("p.polar:4:3:") and "a rule parameter is a variable or a value" in (
        message
    )


def test_reading_the_id_only_under_not_in_an_allow_rule_is_warned_of():
    authz = Authorizer(
        BASE + 'declare device_compliance(Device, String);\nallow(_: User, "call", _t: Tool) if'
        ' not device_compliance(Device{context.device.id}, "not-compliant");',
        source="p.polar",
    )
    (warning,) = [str(w) for w in authz.policy.warnings]
    assert "context.device.id is read only under 'not'" in warning
    # What it warns of: a request that says nothing of its device is allowed.
    assert authz.authorize(SAM, "call", TOOL, {})
