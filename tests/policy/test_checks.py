"""Load-time checks: every problem is refused with its file, line and column, and a policy that
fails to load never replaces the one in force."""

from __future__ import annotations

import pytest

from bastion import Authorizer, Entity, PolicyError
from bastion.facts.model import FactError
from bastion.policy import load
from tests.waits import PATIENCE

BASE = """
actor User {}
resource Org {
  roles = ["member"];
  permissions = ["read"];
  "read" if "member";
}
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(PolicyError) as err:
        Authorizer(text, source="p.polar")
    return [str(d) for d in err.value.diagnostics]


def test_syntax_error_says_what_was_expected_and_where():
    (message,) = errors_of('allow(actor, "read", resource) if is_public(resource) is_admin(actor);')
    assert message.startswith("p.polar:1:55: error: expected 'and', 'or' or ';'")
    assert "found 'is_admin'" in message


def test_unterminated_string_is_reported_at_its_start():
    (message,) = errors_of('actor User {}\nfoo(x) if x = "abc;')
    assert message.startswith("p.polar:2:15:") and "unterminated string" in message


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('allow(a, "r", b) if a = "x\x00y";', "p.polar:1:27:"),
        ("# a \x00 note\nf(1);", "p.polar:1:5:"),
    ],
)
def test_a_nul_anywhere_is_refused_where_it_is(text, where):
    """In a string it made Python's compiler fail ("split it into smaller rules"); in a comment it
    was taken, and PostgreSQL stores no NUL in the policy's text. The API refuses it before
    (docs/security.md, "NUL"); a policy file is read here."""
    (message,) = errors_of(text)
    assert message.startswith(where) and "U+0000 (NUL)" in message


def test_shorthand_naming_an_undeclared_role_is_refused():
    text = BASE.replace('"read" if "member";', '"read" if "membr";')
    (message,) = errors_of(text)
    assert "p.polar:6:13" in message
    assert "Org declares no role, permission or relation 'membr' (did you mean member?)" in message


def test_shorthand_head_must_be_a_declared_role_or_permission():
    (message,) = errors_of(BASE.replace('"read" if "member";', '"write" if "member";'))
    assert "p.polar:6:3" in message and "no role or permission 'write'" in message


def test_shorthand_through_an_undeclared_relation_is_refused():
    text = BASE + 'resource Repo { roles = ["reader"]; "reader" if "member" on "parnt"; }'
    (message,) = errors_of(text)
    assert "Repo declares no relation 'parnt'" in message


def test_relation_to_an_undeclared_type_is_refused():
    (message,) = errors_of(BASE + "resource Repo { relations = { parent: Organisation }; }")
    assert "p.polar:8:39" in message
    assert "points to Organisation, which no actor or resource block declares" in message


def errors_of_strict(text: str) -> list[str]:
    with pytest.raises(PolicyError) as err:
        load([("p.polar", text)], strict=True)
    return [str(d) for d in err.value.diagnostics]


def warnings_of(text: str) -> list[str]:
    return [str(d) for d in load([("p.polar", text)]).warnings]


MISSPELT = BASE + "declare is_blocked(User);\ndeny(actor, _a, _r) if is_blokced(actor);"


def test_call_to_an_undefined_predicate_is_a_warning_with_a_suggestion():
    (message,) = warnings_of(MISSPELT)
    assert message.startswith("p.polar:9:24: warning:")
    assert (
        "is_blokced/1 is not defined by any rule, builtin or declaration (did you mean is_blocked?)"
        in message
    )
    assert "--strict" in message


def test_call_to_an_undefined_predicate_is_refused_under_strict():
    (message,) = errors_of_strict(MISSPELT)
    assert message.startswith("p.polar:9:24: error:") and "is_blokced/1" in message


def test_an_inferred_fact_type_refuses_facts_that_do_not_fit_its_calls():
    """``suspended`` is inferred from a call on a User: a fact about an Org, or about a value,
    is refused, and the store is unchanged."""
    authz = Authorizer(BASE + "deny(actor: User, _a, _r) if suspended(actor);")
    authz.facts.insert(("suspended", Entity("User", "eve")))
    for bad in [("suspended", Entity("Org", "o")), ("suspended", "eve")]:
        with pytest.raises(FactError, match="does not fit any suspended fact"):
            authz.facts.insert(bad)
    assert authz.facts.get(("suspended", None)) == [("suspended", Entity("User", "eve"))]


def test_call_with_the_wrong_number_of_arguments_is_a_warning_or_refused_under_strict():
    text = BASE + "declare is_blocked(User);\ndeny(actor, _a, _r) if is_blocked(actor, 1);"
    (message,) = warnings_of(text)
    assert "is_blocked takes 1 arguments elsewhere, not 2" in message
    (message,) = errors_of_strict(text)
    assert "is_blocked takes 1 arguments elsewhere, not 2" in message


def test_unknown_type_in_a_specializer_is_a_warning_or_refused_under_strict():
    text = BASE + "allow(actor: Usr, _a, _r) if actor = actor;"
    (message,) = warnings_of(text)
    assert "type Usr is not declared by any actor or resource block (did you mean User?)" in message
    (message,) = errors_of_strict(text)
    assert "type Usr is not declared" in message


def test_negation_through_recursion_is_refused():
    text = "resource N {}\ndeclare e(N, N);\np(x: N, y: N) if e(x, y) and not p(y, x);"
    (message,) = errors_of(text)
    assert "negation through recursion" in message


def test_a_variable_that_is_never_bound_is_refused():
    (message,) = errors_of(BASE + "allow(_actor, _action, _resource) if x > 3;")
    assert "variable(s) x are never bound" in message


@pytest.mark.parametrize(
    "body",
    [
        "x - 1 matches Integer",
        "x * 2 matches Integer and lim(o, n) and n > 0",
        "lim(o, n) and n - x matches Integer",
        "[x] matches List",
        "not x - 1 matches Integer",
        "forall(lim(o, n), n - x matches Integer)",
        "(x - 1 matches Integer or lim(o, 1))",
    ],
)
def test_a_type_check_of_a_value_that_can_never_be_computed_is_refused(body):
    # Found by test_oso_polar's noisy fragments: it crashed the compiler (KeyError 'x').
    (message,) = errors_of(
        BASE + f'declare lim(Org, Integer);\nallow(_u: User, "read", o: Org) if {body};'
    )
    assert "variable(s) x are never bound" in message and "p.polar:9:" in message


def test_a_type_check_of_arithmetic_waits_for_its_variables():
    authz = Authorizer(
        BASE + 'declare lim(Org, Integer);\nallow(_u: User, "read", o: Org) if'
        " n - 1 matches Integer and lim(o, n) and n > 1;"
    )
    alice, acme = Entity("User", "alice"), Entity("Org", "acme")
    assert not authz.authorize(alice, "read", acme)
    authz.facts.insert(("lim", acme, 2))
    assert authz.authorize(alice, "read", acme)


def test_singleton_variable_is_a_warning_not_an_error():
    authz = Authorizer(
        BASE + "declare is_blocked(User);\ndeny(actor, action, _r) if is_blocked(actor);",
        source="p.polar",
    )
    messages = [str(w) for w in authz.policy.warnings]
    assert messages == [
        "p.polar:9:1: warning: variable action is used only once in deny; name it _action or _ if that is intended"
    ]


def test_a_policy_that_fails_to_load_never_replaces_the_one_in_force():
    authz = Authorizer(BASE)
    alice, acme = Entity("User", "alice"), Entity("Org", "acme")
    authz.facts.insert(("has_role", alice, "member", acme))
    assert authz.authorize(alice, "read", acme)
    with pytest.raises(PolicyError):
        authz.load_policy("actor User {} allow(actor, _, _) if ;")
    assert authz.authorize(alice, "read", acme)
    assert 'roles = ["member"]' in authz.policy_text


def test_every_error_is_reported_not_just_the_first():
    text = BASE + 'resource Repo { roles = ["r"]; "r" if "x"; "y" if "r"; }'
    assert len(errors_of(text)) == 2


def test_builtins_cannot_be_redefined():
    (message,) = errors_of("cidr_contains(_a, _b) if 1 = 1;")
    assert "cidr_contains is a builtin" in message


def test_a_helper_rule_that_can_never_run_is_refused_at_load():
    (message,) = errors_of(
        BASE + "declare level(Org, Integer);\nhigh(o: Org) if level(o, m) and m > n;"
    )
    assert "variable(s) n are never bound" in message and "p.polar:9:" in message


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("starts_with(context.uri, 5)", "argument 2 of starts_with must be a String, not Integer"),
        ('ends_with(true, "x")', "argument 1 of ends_with must be a String, not Boolean"),
        ('contains(["a"], "a")', "argument 1 of contains must be a String, not a list"),
        ('contains(o, "a")', "argument 1 of contains must be a String, not Org"),
        ('lower(User{"a"}, x) and x = "a"', "argument 1 of lower must be a String, not User"),
    ],
)
def test_a_string_builtin_given_another_type_is_refused_at_load(body, expected):
    (message,) = errors_of(BASE + f'allow(_u: User, "read", o: Org) if {body};')
    assert expected in message and "p.polar:8:" in message


def test_lower_with_its_text_unbound_is_refused_at_load():
    (message,) = errors_of(BASE + 'allow(_u: User, "read", _o: Org) if lower(t, "a") and t = t;')
    assert "variable(s) t are never bound" in message


def test_a_replaced_policy_is_freed_without_the_garbage_collector():
    """A replica keeps its facts out of the collector's sight (`gc.freeze`), so a replaced
    policy must not wait for a collector pass to be freed: its compiled code lets go of itself
    (`CompiledPolicy.close`), and what is left is freed by reference counting."""
    import gc
    import weakref

    authz = Authorizer(BASE)
    alice, acme = Entity("User", "alice"), Entity("Org", "acme")
    authz.facts.insert(("has_role", alice, "member", acme))
    assert authz.authorize(alice, "read", acme)
    replaced = weakref.ref(authz._active.compiled)
    was = gc.isenabled()
    gc.disable()
    try:
        authz.load_policy(BASE + "\n# the next version\n")
        assert replaced() is None
    finally:
        if was:
            gc.enable()
    assert authz.authorize(alice, "read", acme)
    assert authz.list(alice, "read", "Org") == ["acme"]
    assert authz.actions(alice, acme) == {"read"}


def test_an_authorizer_let_go_of_is_freed_with_its_facts_without_the_garbage_collector():
    """An `Authorizer` holds no cycle (its `facts` are made on each use; its compiled policy lets
    go of itself when it goes), so once nothing refers to it, it and every fact it held are
    freed at once, even out of the collector's sight, as a replica's facts are; and
    `Authorizer.let_go` empties its facts beforehand, a part at a time."""
    import gc
    import weakref

    from bastion.turns import Turns

    alice, acme = Entity("User", "alice"), Entity("Org", "acme")
    was = gc.isenabled()
    gc.disable()
    try:
        for emptied in (False, True):
            authz = Authorizer(BASE)
            authz.facts.insert(("has_role", alice, "member", acme))
            assert authz.authorize(alice, "read", acme)
            gone = [weakref.ref(o) for o in (authz, authz._index, authz._active.compiled)]
            facts = authz.facts
            del facts  # a FactSet made and let go of keeps nothing alive
            if emptied:
                authz.let_go(Turns())
                assert len(authz.facts) == 0 and not authz.authorize(alice, "read", acme)
            del authz
            assert [ref() for ref in gone] == [None, None, None]
    finally:
        if was:
            gc.enable()


def test_decisions_taken_while_the_policy_changes_each_run_one_policy_whole():
    """Every decision takes the policy in force under the fact lock, so none runs a policy that
    was replaced (and closed) while it waited for the lock: decisions on other threads while
    the policy is replaced over and over all answer, and answer right."""
    import threading

    authz = Authorizer(BASE)
    alice, acme = Entity("User", "alice"), Entity("Org", "acme")
    authz.facts.insert(("has_role", alice, "member", acme))
    failures: list[BaseException] = []
    stop = threading.Event()

    def decide() -> None:
        try:
            while not stop.is_set():
                assert authz.authorize(alice, "read", acme)
                assert authz.list(alice, "read", "Org") == ["acme"]
                assert authz.actions(alice, acme) == {"read"}
                with authz.session() as s:
                    assert s.allowed(alice, "read", acme)
        except BaseException as e:  # noqa: BLE001 - reported below
            failures.append(e)

    threads = [threading.Thread(target=decide) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for version in range(40):
            authz.load_policy(BASE + f"\n# version {version}\n")
    finally:
        stop.set()
        for t in threads:
            t.join(PATIENCE)
    assert failures == []


NEGATED_CONTEXT = """actor User {}
resource Tool {}
allow(_u: User, "call", _t: Tool) if not context.device.compromised = true;
"""


def test_an_allow_that_reads_a_context_field_only_under_not_is_warned_of():
    """A request that leaves the field out makes the negated condition false, so the 'not'
    holds and the rule allows: the check meant to refuse a compromised device lets through a
    request that says nothing of its device."""
    (message,) = warnings_of(NEGATED_CONTEXT)
    assert message.startswith("p.polar:3:38: warning: context.device.compromised is read only")
    assert "so the rule allows" in message
    authz = Authorizer(NEGATED_CONTEXT)  # what the warning is about, as decided
    assert authz.authorize(Entity("User", "a"), "call", Entity("Tool", "t"), {})


@pytest.mark.parametrize(
    "rule",
    [
        # Read outside the 'not' too: a request without it is refused by that condition.
        'allow(_u: User, "call", _t: Tool) if context.device.compromised = false;',
        'allow(_u: User, "call", _t: Tool) if context.device.compromised matches Boolean and'
        " not context.device.compromised = true;",
        # A guardrail: a 'not' over a missing field makes it refuse, which is closed.
        'deny(_u: User, "call", _t: Tool) if not context.device.managed = true;\n'
        'allow(_u: User, "call", _t: Tool);',
        # The time is always there.
        'allow(_u: User, "call", _t: Tool) if'
        ' not in_time_window(context.time, "Sat,Sun", "00:00", "24:00", "UTC");',
    ],
)
def test_a_context_field_read_outside_the_not_or_in_a_guardrail_is_not_warned_of(rule):
    assert warnings_of("actor User {}\nresource Tool {}\n" + rule + "\n") == []


def test_a_rule_that_allow_calls_is_checked_as_allow_is_and_one_it_negates_is_not():
    text = """actor User {}
resource Tool {}
allow(u: User, "call", _t: Tool) if trusted(u);
trusted(_u: User) if not context.risk.high = true;
"""
    (message,) = warnings_of(text)
    assert "context.risk.high is read only under 'not'" in message
    # An optional statement of the request, the stored data deciding when it is left out.
    negated = """actor User {}
resource Doc {}
declare status(Doc, String);
archived(_d: Doc) if context.resource.status = "archived";
archived(d: Doc) if status(d, "archived");
allow(_u: User, "write", d: Doc) if not archived(d);
"""
    assert warnings_of(negated) == []


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            'in_time_window(context.time, "Sat,Sun", "00:00", "24:00", "Europe/Pariss")',
            "argument 5 of in_time_window: 'Europe/Pariss' is not an IANA time zone",
        ),
        (
            'in_time_window(context.time, "Sat,Sun", "00:00", "24:00", "")',
            "argument 5 of in_time_window: '' is not an IANA time zone",
        ),
        (
            'in_time_window(context.time, "Sat-Snu", "00:00", "24:00", "UTC")',
            "argument 2 of in_time_window: 'Sat-Snu' is not a set of days",
        ),
        (
            'in_time_window(context.time, "*", "9h00", "17:00", "UTC")',
            "argument 3 of in_time_window: '9h00' is not a time of day",
        ),
        (
            'in_time_window(context.time, "*", "09:00", "25:00", "UTC")',
            "argument 4 of in_time_window: '25:00' is not a time of day",
        ),
        (
            'in_time_window(context.time, "*", 9, "17:00", "UTC")',
            "argument 3 of in_time_window: 9 is not a time of day",
        ),
        (
            'time_after(context.time, "2027-13-01T00:00:00Z")',
            "argument 2 of time_after: '2027-13-01T00:00:00Z' is not a time",
        ),
        (
            'time_before("tomorrow", context.time)',
            "argument 1 of time_before: 'tomorrow' is not a time",
        ),
    ],
)
def test_a_time_builtin_given_a_window_or_time_that_cannot_be_is_refused_at_load(body, expected):
    """A literal the time builtins cannot read would make them false on every request: a
    business-hours allow that never allows, and worse, a guardrail that never refuses (a
    weekend freeze in a misspelt zone lets every weekend call through). Refused when the
    policy loads, with the argument and what it must be."""
    (message,) = errors_of(BASE + f'deny(_u: User, "read", _o: Org) if {body};')
    assert expected in message and "p.polar:8:" in message


def test_time_builtins_over_request_values_load_and_are_false_for_what_is_not_a_time():
    """Only literals are checked at load: a window read from the request is checked when asked."""
    authz = Authorizer(
        BASE + 'allow(_u: User, "read", _o: Org) if in_time_window(context.time, "*",'
        ' "00:00", "24:00", context.zone) and time_after(context.time, "2026-01-01");'
    )
    user, org = Entity("User", "a"), Entity("Org", "o")
    assert authz.authorize(
        user, "read", org, {"time": "2026-11-30T09:00:00Z", "zone": "Asia/Tokyo"}
    )
    assert not authz.authorize(user, "read", org, {"time": "2026-11-30T09:00:00Z", "zone": "Mars"})


def test_time_zones_need_no_zone_database_on_the_machine(tmp_path):
    """bastion brings the IANA zone database (the tzdata package) rather than relying on the
    machine's (absent on Windows and in slim containers): with no system zones at all, a
    business-hours policy still loads and decides."""
    import os
    import subprocess
    import sys

    script = (
        "from bastion import Authorizer, Entity\n"
        'a = Authorizer(\'actor User {}\\nresource Doc {}\\nallow(_u: User, "read", _d: Doc) if'
        ' in_time_window(context.time, \\"Mon-Fri\\", \\"09:00\\", \\"18:00\\",'
        ' \\"Europe/Paris\\");\')\n'
        "u, d = Entity('User', 'a'), Entity('Doc', 'd')\n"
        "assert a.authorize(u, 'read', d, {'time': '2026-11-30T08:30:00Z'})\n"  # 09:30 in Paris
        "assert not a.authorize(u, 'read', d, {'time': '2026-11-30T07:30:00Z'})\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONTZPATH": str(tmp_path)}  # an empty folder: no system zones
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr[-2000:]
