"""Oso Cloud's Polar, unchanged: each construct bastion accepts for compatibility, what it means,
and what it refuses. Constructs that evaluate are also checked against the reference evaluator
(tests/policy/reference.py) on random facts."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion import Authorizer, Entity, PolicyError
from bastion.facts.model import FactError
from bastion.policy import load
from bastion.policy.testing import run_tests
from tests.policy.reference import _MISSING as _REF_MISSING
from tests.policy.reference import Reference
from tests.policy.reference import _arith as _reference_arith

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def U(i: str) -> Entity:
    return Entity("User", i)


def put(authz: Authorizer, facts: list[tuple]) -> None:
    authz.facts.apply(facts, [])


def errors_of(text: str, strict: bool = False) -> list[str]:
    with pytest.raises(PolicyError) as err:
        load([("p.polar", text)], strict=strict)
    return [str(d) for d in err.value.diagnostics]


def results_of(text: str) -> dict[str, object]:
    return {r.name: r for r in run_tests(load([("p.polar", text)]))}


# -- 1. fact types inferred from the rules ------------------------------------------------------

INFERRED = """
actor User {}
resource Repo {}
allow(user: User, "read", repo: Repo) if
  level matches Integer and
  clearance(user, level) and
  sensitivity(repo, "label", level);
allow(_: User, "read", repo: Repo) if tagged(repo, _tag);
"""


def test_fact_types_come_from_specializers_matches_and_literals():
    sigs = load([("p", INFERRED)]).program.fact_signatures
    assert sigs[("clearance", 2)] == [
        (("types", frozenset({"User"})), ("types", frozenset({"Integer"})))
    ]
    assert sigs[("sensitivity", 3)] == [
        (
            ("types", frozenset({"Repo"})),
            ("types", frozenset({"String"})),
            ("types", frozenset({"Integer"})),
        )
    ]
    assert sigs[("tagged", 2)] == [(("types", frozenset({"Repo"})), ("any", frozenset()))]


def test_facts_that_fit_an_inferred_type_are_accepted_and_decide():
    authz = Authorizer(INFERRED)
    authz.facts.insert(("clearance", U("ann"), 3))
    authz.facts.insert(("sensitivity", Entity("Repo", "r"), "label", 3))
    authz.facts.insert(("tagged", Entity("Repo", "t"), ["any", "value"][0]))
    authz.facts.insert(("tagged", Entity("Repo", "t2"), 7))  # an untyped argument: any value
    assert authz.authorize(U("ann"), "read", Entity("Repo", "r"))
    assert authz.authorize(U("bob"), "read", Entity("Repo", "t2"))
    assert not authz.authorize(U("bob"), "read", Entity("Repo", "r"))


@pytest.mark.parametrize(
    "bad",
    [
        ("clearance", Entity("Repo", "r"), 3),  # a Repo where the rules read a User
        ("clearance", U("ann"), "3"),  # a String where they read an Integer
        ("sensitivity", Entity("Repo", "r"), Entity("Repo", "x"), 3),
        ("tagged", U("ann"), "x"),
        ("unused", U("ann")),  # no rule reads it
    ],
)
def test_facts_that_fit_no_inferred_type_are_refused(bad):
    authz = Authorizer(INFERRED)
    with pytest.raises(FactError):
        authz.facts.insert(bad)
    assert len(authz.facts) == 0


def test_shapes_only_a_longhand_rule_implies_are_accepted():
    """Roles held by a Group (not an actor), a role that is an entity, a relation that no
    relations map declares."""
    text = """
    actor User {}
    resource Group {}
    resource Role {}
    resource Org { roles = ["member"]; permissions = ["read", "write"]; "read" if "member"; }
    has_role(user: User, "member", org: Org) if
      group matches Group and has_relation(group, "includes", user) and
      has_role(group, "member", org);
    has_permission(user: User, "write", org: Org) if
      role matches Role and has_role(user, role, org) and grants(role, "write");
    """
    authz = Authorizer(text)
    authz.facts.insert(("has_relation", Entity("Group", "g"), "includes", U("ann")))
    authz.facts.insert(("has_role", Entity("Group", "g"), "member", Entity("Org", "o")))
    authz.facts.insert(("has_role", U("bob"), Entity("Role", "writer"), Entity("Org", "o")))
    authz.facts.insert(("grants", Entity("Role", "writer"), "write"))
    assert authz.authorize(U("ann"), "read", Entity("Org", "o"))
    assert not authz.authorize(U("ann"), "write", Entity("Org", "o"))
    assert authz.authorize(U("bob"), "write", Entity("Org", "o"))
    # What no rule implies is still refused: a Group holding a role on a Group.
    with pytest.raises(FactError):
        authz.facts.insert(("has_role", Entity("Group", "g"), "member", Entity("Group", "h")))


def test_a_call_the_blocks_already_type_does_not_widen_what_the_store_accepts():
    """``has_relation(tool, "team", team)`` with ``team`` untyped reads the facts the block's
    relation declares: it must not make a relation to anything acceptable."""
    text = """
    actor User {}
    resource Team { roles = ["lead"]; }
    resource Tool { relations = { team: Team }; }
    allow(user: User, "call", tool: Tool) if
      has_relation(tool, "team", team) and has_role(user, "lead", team);
    """
    authz = Authorizer(text)
    authz.facts.insert(("has_relation", Entity("Tool", "t"), "team", Entity("Team", "ops")))
    authz.facts.insert(("has_role", U("ann"), "lead", Entity("Team", "ops")))
    assert authz.authorize(U("ann"), "call", Entity("Tool", "t"))
    for bad in [
        ("has_relation", Entity("Tool", "t"), "team", U("mallory")),
        ("has_relation", Entity("Tool", "t"), "owner", Entity("Team", "ops")),
        ("has_role", U("mallory"), "lead", Entity("Tool", "t")),
        ("has_role", U("mallory"), "admin", Entity("Team", "ops")),
    ]:
        with pytest.raises(FactError):
            authz.facts.insert(bad)
    assert not load([("p", text)]).warnings


def test_the_default_allow_written_out_implies_no_fact_type():
    """Written out, the rule bastion supplies when a policy has no allow changes nothing: the
    store still refuses has_permission facts (and its compiled code reads none)."""
    blocks = (
        'actor User {}\nresource Doc { roles = ["r"]; permissions = ["read"]; "read" if "r"; }\n'
    )
    for text in (
        blocks,
        blocks + "allow(actor, action, resource) if has_permission(actor, action, resource);",
    ):
        authz = Authorizer(text)
        with pytest.raises(FactError, match="no use for has_permission/3"):
            authz.facts.insert(("has_permission", U("a"), "read", Entity("Doc", "d")))
    typed = blocks + "allow(u: User, a: String, d: Doc) if has_permission(u, a, d);"
    authz = Authorizer(typed)
    authz.facts.insert(("has_permission", U("a"), "read", Entity("Doc", "d")))
    assert authz.authorize(U("a"), "read", Entity("Doc", "d"))


def test_a_predicate_is_defined_by_rules_and_stored_as_facts():
    text = """
    actor User {}
    resource Doc { permissions = ["read"]; }
    allow(user: User, action: String, doc: Doc) if has_permission(user, action, doc);
    has_permission(_: User, "read", doc: Doc) if is_open(doc);
    declare quota(Doc, Integer);
    quota(Doc{"big"}, 10);
    big(doc: Doc) if q matches Integer and quota(doc, q) and q >= 10;
    """
    authz = Authorizer(text)
    authz.facts.insert(("has_permission", U("ann"), "read", Entity("Doc", "d")))
    authz.facts.insert(("is_open", Entity("Doc", "o")))
    authz.facts.insert(("quota", Entity("Doc", "stored"), 12))
    assert authz.authorize(U("ann"), "read", Entity("Doc", "d"))
    assert authz.authorize(U("bob"), "read", Entity("Doc", "o"))
    assert not authz.authorize(U("bob"), "read", Entity("Doc", "d"))
    assert authz.holds("big", Entity("Doc", "big")) and authz.holds("big", Entity("Doc", "stored"))


def test_the_misspelling_guard_is_an_error_under_strict():
    text = INFERRED.replace("tagged(repo, _tag)", "tagged(repo, _tag) and not blockd(user)")
    text = text.replace("_: User", "user: User")
    assert load([("p", text)]).warnings  # loads, with a warning per inferred predicate
    messages = errors_of(text, strict=True)
    assert any("blockd/1 is not defined" in m for m in messages)


# -- 2. trailing commas ------------------------------------------------------------------------


def test_trailing_commas_are_accepted_everywhere_a_list_is():
    text = """
    actor User {}
    resource Org {
      roles = ["member", "admin",];
      permissions = ["read",];
      relations = { parent: Org, };
      "read" if "member";
    }
    declare flag(Org, String,);
    allow(u: User, a: String, o: Org,) if has_permission(u, a, o,) and a in ["read", "x",];
    test "commas" {
      setup { has_role(User{"a"}, "member", Org{"o"},); }
      assert allow(User{"a"}, "read", Org{"o"},);
    }
    """
    assert all(r.passed for r in results_of(text).values())


@pytest.mark.parametrize(
    "text",
    [
        "resource A { roles = [,]; }",
        'resource A { roles = ["a",,]; }',
        "resource A { relations = { , }; }",
        "f(x) if g(,);",
        "f(,);",
    ],
)
def test_a_comma_with_nothing_before_it_is_a_syntax_error(text):
    (message,) = errors_of(text)
    assert "error: expected" in message


# -- 3. variable roles and permissions in shorthand rules --------------------------------------

SHORTHAND_VARIABLES = """
actor User {}
resource Folder {
  roles = ["viewer", "editor"];
  permissions = ["read", "write"];
  relations = { parent: Folder };
  role if role on "parent";
  "read" if "viewer";
  "write" if "editor";
}
resource File {
  roles = ["viewer", "editor", "owner"];
  permissions = ["read", "write", "delete"];
  relations = { folder: Folder, org: Org };
  role if role on "folder";
  permission if "admin" on "org";
  "read" if "viewer";
  "write" if "editor";
  "delete" if "owner";
}
resource Org { roles = ["admin", "member"]; }
resource Plan {
  roles = ["subscriber"];
  relations = { org: Org };
  "subscriber" if role on "org";
}
"""


def test_a_variable_role_is_every_role_both_blocks_declare():
    authz = Authorizer(SHORTHAND_VARIABLES)
    put(
        authz,
        [
            ("has_relation", Entity("Folder", "sub"), "parent", Entity("Folder", "root")),
            ("has_relation", Entity("File", "f"), "folder", Entity("Folder", "sub")),
            ("has_role", U("ed"), "editor", Entity("Folder", "root")),
            ("has_relation", Entity("File", "f"), "org", Entity("Org", "o")),
            ("has_role", U("ad"), "admin", Entity("Org", "o")),
            ("has_relation", Entity("Plan", "p"), "org", Entity("Org", "o")),
            ("has_role", U("me"), "member", Entity("Org", "o")),
        ],
    )
    assert authz.actions(U("ed"), Entity("File", "f")) == {"write"}  # editor, inherited twice
    # "owner" is a File role that Folder does not declare: no rule inherits it.
    assert not [c for c in authz.policy.program.clauses[("has_role", 3)] if '"owner" if' in c.text]
    # permission if "admin" on "org": every permission of File.
    assert authz.actions(U("ad"), Entity("File", "f")) == {"read", "write", "delete"}
    assert authz.holds("has_role", U("me"), "subscriber", Entity("Plan", "p"))
    assert not authz.holds("has_role", U("nobody"), "subscriber", Entity("Plan", "p"))


def test_a_variable_with_nothing_to_stand_for_is_refused():
    text = 'actor User {}\nresource A { relations = { b: B }; role if role on "b"; }\nresource B {}'
    (message,) = errors_of(text)
    assert "declares no role or permission for role to stand for" in message


# -- 4. global blocks --------------------------------------------------------------------------

GLOBAL = """
actor User {}
global {
  roles = ["superadmin", "auditor"];
  permissions = ["create_org", "audit"];
  "create_org" if "superadmin";
  "audit" if "auditor" or "superadmin";
}
resource Org {
  roles = ["admin"];
  permissions = ["read", "delete"];
  "admin" if global "superadmin";
  "read" if global "audit";
  "delete" if "admin";
}
"""


def test_global_permissions_and_shorthand_rules():
    authz = Authorizer(GLOBAL)
    put(authz, [("has_role", U("root"), "superadmin"), ("has_role", U("aud"), "auditor")])
    assert authz.holds("has_permission", U("root"), "create_org")
    assert not authz.holds("has_permission", U("aud"), "create_org")
    assert authz.holds("has_permission", U("aud"), "audit")
    assert authz.actions(U("root"), Entity("Org", "x")) == {"read", "delete"}
    assert authz.actions(U("aud"), Entity("Org", "x")) == {"read"}
    assert authz.actions(U("nobody"), Entity("Org", "x")) == set()


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (
            'global { roles = ["a"]; "a" if "b"; }',
            "no global block declares the role or permission 'b'",
        ),
        ('global { roles = ["a"]; "a" if "a" on "x"; }', "no relations to follow"),
        ('global { roles = ["a"]; "z" if "a"; }', "declares no role or permission 'z'"),
        ('resource R { permissions = ["p"]; "p" if global "nope"; }', "no global block declares"),
    ],
)
def test_global_block_mistakes_are_refused(block, expected):
    messages = errors_of("actor User {}\n" + block)
    assert any(expected in m for m in messages), messages


# -- 5. if true / if false ---------------------------------------------------------------------


def test_if_true_always_holds_and_if_false_never_does():
    text = """
    actor User {}
    resource Page {}
    allow(_: User, "read", _: Page) if true;
    allow(_: User, "edit", _: Page) if false;
    allow(u: User, "admin", _: Page) if not false and is_admin(u);
    allow(u: User, "nuke", _: Page) if is_admin(u) and not true;
    """
    authz = Authorizer(text)
    authz.facts.insert(("is_admin", U("a")))
    page = Entity("Page", "p")
    assert authz.actions(U("a"), page) == {"read", "admin"}
    assert authz.actions(U("b"), page) == {"read"}


# -- 6. built-in constants ---------------------------------------------------------------------

EXPIRY = """
actor User {}
resource Doc {}
allow(u: User, "read", d: Doc) if
  t matches Integer and until(u, d, t) and @current_unix_time < t;
"""


def test_current_unix_time_is_the_time_of_the_check():
    authz = Authorizer(EXPIRY)
    authz.facts.insert(("until", U("a"), Entity("Doc", "d"), 2_000_000_000))  # 2033
    d = Entity("Doc", "d")
    assert authz.authorize(U("a"), "read", d)  # now
    assert authz.authorize(U("a"), "read", d, {"time": "2033-05-18T03:33:19Z"})
    assert not authz.authorize(U("a"), "read", d, {"time": "2033-05-18T03:33:20Z"})
    assert not authz.authorize(U("a"), "read", d, {"time": 2_000_000_000})
    # A time that is not a time fails closed.
    for bad in ("yesterday", "2033-05-18T03:33:19", True, float("inf"), float("nan"), "9" * 100):
        assert not authz.authorize(U("a"), "read", d, {"time": bad}), bad


def test_an_unknown_constant_is_refused():
    (message,) = errors_of("allow(_, _, _) if @current_time > 1;")
    assert "unknown built-in constant @current_time (Polar has @current_unix_time)" in message


@SETTINGS
@given(
    expiries=st.lists(st.integers(-(2**40), 2**40), max_size=4),
    now=st.one_of(
        st.integers(-(2**40), 2**40),
        st.floats(-1e12, 1e12),
        st.sampled_from(["2026-01-01T00:00:00Z", "1969-12-31T23:59:59.5+00:00", "bad"]),
    ),
)
def test_current_unix_time_agrees_with_the_reference(expiries, now):
    facts = [("until", U("a"), Entity("Doc", str(i)), t) for i, t in enumerate(expiries)]
    authz = Authorizer(EXPIRY)
    put(authz, facts)
    context = {"time": now}
    ref = Reference(authz.policy.program, facts, context, [U("a"), "read"])
    assert authz.list(U("a"), "read", "Doc", context) == ref.list(U("a"), "read", "Doc")


# -- 7. actors are resources; extends ----------------------------------------------------------


def test_actors_are_resources():
    text = """
    actor User { roles = ["manager"]; permissions = ["approve_leave"]; "approve_leave" if "manager"; }
    resource Doc {}
    owns(_: Resource, _: Resource) if false;
    allow(u: User, "touch", r: Resource) if touched(u, r);
    """
    authz = Authorizer(text)
    authz.facts.insert(("has_role", U("boss"), "manager", U("emp")))
    authz.facts.insert(("touched", U("a"), U("b")))
    assert authz.holds("has_permission", U("boss"), "approve_leave", U("emp"))
    assert authz.authorize(U("a"), "touch", U("b"))
    assert not authz.holds("has_permission", U("emp"), "approve_leave", U("boss"))


EXTENDS = """
actor User {}
actor ServiceAccount extends User {}
resource Item {
  roles = ["reader"];
  permissions = ["read"];
  relations = { parent: Folder };
  "read" if "reader";
  "reader" if "reader" on "parent";
}
resource Document extends Item {}
resource Folder { roles = ["reader"]; }
allow(u: User, "list", _: Folder) if enabled(u);
allow(u: User, action: String, r: Resource) if has_permission(u, action, r);
"""


def test_a_subtype_is_accepted_wherever_its_supertype_is():
    authz = Authorizer(EXTENDS)
    svc, doc = Entity("ServiceAccount", "ci"), Entity("Document", "d")
    put(
        authz,
        [
            ("has_relation", doc, "parent", Entity("Folder", "f")),
            ("has_role", svc, "reader", Entity("Folder", "f")),
            ("enabled", svc),
        ],
    )
    assert authz.authorize(svc, "read", doc)
    assert authz.authorize(svc, "list", Entity("Folder", "f"))
    assert not authz.authorize(Entity("ServiceAccount", "other"), "read", doc)
    with pytest.raises(FactError):  # a Folder is not an Item
        authz.facts.insert(("has_relation", Entity("Folder", "x"), "parent", Entity("Folder", "f")))


RELATION_TYPES = """
actor User {}
actor Bot {}
resource Org { roles = ["member"]; relations = { owner: User }; }
resource Repo {
  roles = ["member", "reader"];
  permissions = ["read", "push", "admin"];
  relations = { parent: Org, owner: User };
  "reader" if "member" on "parent";
  "read" if "reader";
  "push" if "owner";
  "admin" if "owner" on "parent";
}
has_relation(repo: Repo, "parent", other) if repo = Repo{"r1"} and other = Repo{"r2"};
has_relation(repo: Repo, "owner", bot) if repo = Repo{"r1"} and bot = Bot{"b1"};
has_relation(org: Org, "owner", bot) if org = Org{"o1"} and bot = Bot{"b1"};
"""


def test_a_relation_reaches_only_entities_of_the_type_its_block_declares():
    # Repo's parent is an Org: a rule that makes another Repo its "parent" does not pass
    # Repo r2's own "member" off as membership of the parent; an owner is a User, not a Bot.
    authz = Authorizer(RELATION_TYPES)
    repo, bot = Entity("Repo", "r1"), Entity("Bot", "b1")
    put(
        authz,
        [
            ("has_role", U("u1"), "member", Entity("Repo", "r2")),
            ("has_role", U("u2"), "member", Entity("Org", "o1")),
            ("has_relation", Entity("Repo", "r3"), "parent", Entity("Org", "o1")),
            ("has_relation", Entity("Repo", "r3"), "owner", U("u3")),
            ("has_relation", Entity("Org", "o1"), "owner", U("u4")),
        ],
    )
    assert not authz.authorize(U("u1"), "read", repo)
    assert not authz.authorize(bot, "push", repo)
    assert not authz.authorize(bot, "admin", repo)
    # Related entities of the declared types still count.
    assert authz.authorize(U("u2"), "read", Entity("Repo", "r3"))
    assert authz.authorize(U("u3"), "push", Entity("Repo", "r3"))
    assert authz.authorize(U("u4"), "admin", Entity("Repo", "r3"))


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (
            'has_relation(_: Repo, "owner", _: Bot) if true;',
            "relation 'owner' of Repo is declared as User; this rule relates a Bot",
        ),
        (
            'has_relation(_: Repo, "parent", _: Repo) if true;',
            "relation 'parent' of Repo is declared as Org; this rule relates a Repo",
        ),
    ],
)
def test_a_has_relation_rule_of_another_type_than_its_block_declares_is_refused(rule, expected):
    assert any(expected in m for m in errors_of(RELATION_TYPES + rule))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("resource A extends Nope {}", "A extends Nope, which no actor or resource block declares"),
        ("resource A extends B {}\nresource B extends A {}", "extends itself"),
        ("resource A extends A {}", "A extends itself through A"),
        (
            "resource T0 {}\n"
            + "".join(f"resource T{i + 1} extends T{i} {{}}\n" for i in range(40)),
            "T33 extends more than 32 types through 'extends'; the limit is policy_max_nesting = 32",
        ),
    ],
)
def test_bad_extends_is_refused(text, expected):
    assert any(expected in m for m in errors_of(text))


def test_extends_is_checked_in_linear_time_however_it_is_written():
    """Thousands of types in long chains, diamonds and cycles: refused or loaded, quickly, with
    no recursion."""
    import time

    chain = "".join(f"resource C{i + 1} extends C{i} {{}}\n" for i in range(20000))
    diamond = "".join(f"resource D{i} extends Base, C{i} {{}}\n" for i in range(5000))
    cycle = "".join(f"resource Y{i} extends Y{(i + 1) % 3000} {{}}\n" for i in range(3000))
    rules = "".join(f"p{i}(x: Base) if q(x);\n" for i in range(2000))
    text = "resource C0 {}\nresource Base {}\n" + chain + diamond + cycle + rules
    started = time.process_time()
    messages = errors_of(text)
    assert time.process_time() - started < 20
    assert any("extends itself" in m for m in messages)
    assert any("policy_max_nesting" in m for m in messages)

    sibling = "resource Base {}\n" + "".join(
        f"resource S{i} extends Base {{}}\n" for i in range(20000)
    )
    started = time.process_time()
    loaded = load([("p", sibling + rules)])
    assert time.process_time() - started < 20
    assert len(loaded.program.clauses[("p0", 1)][0].body[0].types) == 20001


# -- 8. test fixtures --------------------------------------------------------------------------


def test_fixtures_are_included_by_name_and_nest():
    text = """
    actor User {}
    resource Org { roles = ["member"]; permissions = ["read"]; "read" if "member"; }
    test fixture base { has_role(User{"a"}, "member", Org{"o"}); }
    test fixture more { fixture base; has_role(User{"b"}, "member", Org{"o"}); }
    test "uses both" {
      setup { fixture more; }
      assert allow(User{"a"}, "read", Org{"o"});
      assert allow(User{"b"}, "read", Org{"o"});
    }
    test "without the fixture there is nothing" {
      assert_not allow(User{"a"}, "read", Org{"o"});
    }
    test "unknown fixture" { setup { fixture nope; } assert allow(User{"a"}, "read", Org{"o"}); }
    test fixture loop { fixture loop; }
    test "loop" { setup { fixture loop; } assert_not allow(User{"a"}, "read", Org{"o"}); }
    """
    results = results_of(text)
    assert results["uses both"].passed and results["without the fixture there is nothing"].passed
    assert "no test fixture nope (known: base, loop, more)" in results["unknown fixture"].error
    assert "fixture loop includes itself" in results["loop"].error


# -- 9. iff assertions -------------------------------------------------------------------------

IFF = """
actor User {}
resource Repo {
  roles = ["reader", "writer"];
  permissions = ["read", "push", "delete"];
  "reader" if "writer";
  "read" if "reader";
  "push" if "writer";
}
deny(u: User, "push", _: Repo) if frozen(u);
test "t" {
  setup { has_role(User{"w"}, "writer", Repo{"r"}); frozen(User{"f"}); has_role(User{"f"}, "writer", Repo{"r"}); }
  assert allow(User{"w"}, action: String, Repo{"r"}) iff action in ["read", "push"];
  assert allow(User{"f"}, action: String, Repo{"r"}) iff action in ["read"];
  assert has_role(User{"w"}, role: String, Repo{"r"}) iff role in ["reader", "writer"];
  assert_not allow(User{"w"}, action: String, Repo{"r"}) iff action in ["read"];
  assert allow(User{"nobody"}, action: String, Repo{"r"}) iff action in [];
}
test "too few" {
  setup { has_role(User{"w"}, "writer", Repo{"r"}); }
  assert allow(User{"w"}, action: String, Repo{"r"}) iff action in ["read"];
}
test "too many" {
  setup { has_role(User{"w"}, "writer", Repo{"r"}); }
  assert allow(User{"w"}, action: String, Repo{"r"}) iff action in ["read", "push", "delete"];
}
test "wrong type" {
  setup { has_role(User{"w"}, "writer", Repo{"r"}); }
  assert allow(User{"w"}, action: Integer, Repo{"r"}) iff action in ["read", "push"];
}
"""


def test_a_typed_variable_without_iff_asserts_some_value_or_with_assert_not_none():
    text = (
        IFF.split('test "t"')[0]
        + """
    test "some" {
      setup { has_role(User{"w"}, "writer", Repo{"r"}); }
      assert allow(User{"w"}, action: String, Repo{"r"});
      assert_not allow(User{"n"}, action: String, Repo{"r"});
      assert_not allow(User{"w"}, action: Integer, Repo{"r"});
      assert has_role(who: User, "writer", Repo{"r"});
    }
    test "subtypes" {
      setup { has_role(Bot{"b"}, "writer", Repo{"r"}); }
      assert has_role(who: User, "writer", Repo{"r"}) iff who in [Bot{"b"}];
      assert has_role(who: Actor, "writer", Repo{"r"}) iff who in [Bot{"b"}];
    }
    test "wrongly none" {
      setup { has_role(User{"w"}, "writer", Repo{"r"}); }
      assert_not allow(User{"w"}, action: String, Repo{"r"});
    }
    """
    )
    results = results_of(text)
    assert results["some"].passed, [a.text for a in results["some"].assertions if not a.passed]
    assert not results["wrongly none"].passed


def test_iff_asserts_exactly_the_values_a_typed_variable_takes():
    results = results_of(IFF)
    assert [a.passed for a in results["t"].assertions] == [True] * 5
    assert not results["too few"].passed
    assert not results["too many"].passed
    assert not results["wrong type"].passed  # no Integer is an action


@pytest.mark.parametrize(
    "assertion",
    [
        'assert allow(User{"a"}, action, Repo{"r"}) iff action in ["read"];',
        'assert allow(User{"a"}, action: String, Repo{"r"}) iff other in ["read"];',
        'assert allow(a: User, action: String, Repo{"r"});',
        'assert allow(User{"a"}, action: String, Repo{"r"}) iff action in "read";',
    ],
)
def test_a_malformed_iff_is_refused(assertion):
    text = 'actor User {}\nresource Repo {}\ntest "t" { ' + assertion + " }"
    (message,) = errors_of(text)
    assert "error:" in message


# -- 10. x matches T where no block declares T -------------------------------------------------


def test_an_undeclared_type_is_a_type_of_its_own_with_a_warning():
    text = """
    actor User {}
    resource Doc {}
    allow(_: User, "read", d: Doc) if owner matches Team and owns(owner, d) and active(owner);
    """
    loaded = load([("p", text)])
    assert any("type Team is not declared" in str(w) for w in loaded.warnings)
    authz = Authorizer(text)
    authz.facts.insert(("owns", Entity("Team", "t"), Entity("Doc", "d")))
    authz.facts.insert(("active", Entity("Team", "t")))
    assert authz.authorize(U("a"), "read", Entity("Doc", "d"))
    with pytest.raises(FactError):  # only Teams own documents here
        authz.facts.insert(("owns", Entity("Crew", "c"), Entity("Doc", "e")))
    assert any("type Team" in m for m in errors_of(text, strict=True))


# -- all together, against the reference evaluator ---------------------------------------------

COMBINED = (
    SHORTHAND_VARIABLES
    + """
global { roles = ["root"]; permissions = ["audit"]; "audit" if "root"; }
resource Archive extends Folder {}
allow(u: User, action: String, r: Resource) if has_permission(u, action, r);
allow(u: User, "audit", r: Resource) if has_permission(u, "audit") and watched(r);
allow(_: User, "ping", _: Folder) if true;
deny(u: User, _: String, r: Resource) if banned(u, r);
"""
)

users = st.sampled_from([U(i) for i in "abc"])
folders = st.sampled_from([Entity(t, i) for t in ("Folder", "Archive") for i in "xy"])
files = st.sampled_from([Entity("File", i) for i in "fg"])
combined_fact = st.one_of(
    st.tuples(st.just("has_relation"), folders, st.just("parent"), folders),
    st.tuples(st.just("has_relation"), files, st.just("folder"), folders),
    st.tuples(st.just("has_relation"), files, st.just("org"), st.just(Entity("Org", "o"))),
    st.tuples(st.just("has_role"), users, st.sampled_from(["viewer", "editor"]), folders),
    st.tuples(st.just("has_role"), users, st.sampled_from(["owner", "viewer"]), files),
    st.tuples(
        st.just("has_role"),
        users,
        st.sampled_from(["admin", "member"]),
        st.just(Entity("Org", "o")),
    ),
    st.tuples(st.just("has_role"), users, st.just("root")),
    st.tuples(st.just("watched"), st.one_of(folders, files)),
    st.tuples(st.just("banned"), users, st.one_of(folders, files)),
    st.tuples(st.just("has_permission"), users, st.sampled_from(["read", "delete"]), files),
)


@SETTINGS
@given(facts=st.lists(combined_fact, max_size=12), actor=users, resource=st.one_of(folders, files))
def test_oso_constructs_agree_with_the_reference(facts, actor, resource):
    authz = Authorizer(COMBINED)
    put(authz, facts)
    actions = ["read", "write", "delete", "audit", "ping"]
    ref = Reference(authz.policy.program, facts, None, [actor, resource, *actions])
    for action in actions:
        assert authz.authorize(actor, action, resource) == ref.allowed(actor, action, resource)
    assert authz.actions(actor, resource) == ref.actions(actor, resource)
    for typ in ("Folder", "Archive", "File"):
        for action in ("read", "audit"):
            assert authz.list(actor, action, typ) == ref.list(actor, action, typ)


# -- 11. arithmetic, forall; cut is refused ----------------------------------------------------

ARITHMETIC = """
actor User {}
resource Org {}
allow(_: User, "add_seat", o: Org) if
  used matches Integer and limit matches Integer and
  seats(o, used) and cap(o, limit) and used + 1 <= limit;
allow(_: User, "ops", o: Org) if
  n matches Integer and seats(o, n) and
  n / 2 = 3 and n mod 2 = 1 and n rem 4 = 3 and n * 2 - 1 = 13;
allow(_: User, "context", o: Org) if
  n matches Integer and seats(o, n) and n + context.extra > 10;
"""


def test_arithmetic_on_integers():
    authz = Authorizer(ARITHMETIC)
    put(authz, [("seats", Entity("Org", "a"), 7), ("cap", Entity("Org", "a"), 8)])
    put(authz, [("seats", Entity("Org", "b"), 8), ("cap", Entity("Org", "b"), 8)])
    a, b = Entity("Org", "a"), Entity("Org", "b")
    assert authz.actions(U("u"), a) == {"add_seat", "ops"}
    assert authz.actions(U("u"), b) == set()
    assert authz.authorize(U("u"), "context", a, {"extra": 4})
    assert not authz.authorize(U("u"), "context", a, {"extra": 3})


@pytest.mark.parametrize(
    "extra",
    [None, "4", True, [4], {"n": 4}, 2**63, 2**2000, float("inf"), float("nan")],
    ids=["missing", "string", "boolean", "list", "object", "64 bits", "huge", "infinite", "nan"],
)
def test_arithmetic_on_what_is_not_a_number_fails_closed(extra):
    authz = Authorizer(ARITHMETIC)
    put(authz, [("seats", Entity("Org", "a"), 7)])
    context = {} if extra is None else {"extra": extra}
    assert not authz.authorize(U("u"), "context", Entity("Org", "a"), context)


def test_integers_never_leave_64_bits():
    text = """
    actor User {}
    resource Org {}
    allow(_: User, "read", o: Org) if n matches Integer and seats(o, n) and n * 4 > 0;
    allow(_: User, "divide", o: Org) if n matches Integer and seats(o, n) and 1 / n = 0;
    """
    authz = Authorizer(text)
    put(authz, [("seats", Entity("Org", "huge"), 2**62), ("seats", Entity("Org", "zero"), 0)])
    assert not authz.authorize(U("u"), "read", Entity("Org", "huge"))  # 2^64 has no value
    assert not authz.authorize(U("u"), "divide", Entity("Org", "zero"))  # nor has 1 / 0


def test_an_infinite_operand_gives_no_value_even_where_the_result_would_be_finite():
    text = """
    actor User {}
    resource Org {}
    allow(_: User, "divide", _o: Org) if 1 / context.n = 0;
    allow(_: User, "mod", _o: Org) if 1 mod context.n > 0;
    allow(_: User, "rem", _o: Org) if 1 rem context.n > 0;
    """
    authz = Authorizer(text)
    for action in ("divide", "mod", "rem"):
        for n in (math.inf, -math.inf, math.nan):
            assert not authz.authorize(U("u"), action, Entity("Org", "o"), {"n": n})
    assert authz.authorize(U("u"), "mod", Entity("Org", "o"), {"n": 3.5})


@SETTINGS
@given(
    a=st.one_of(st.integers(-(2**63), 2**63 - 1), st.just("x")),
    b=st.one_of(st.integers(-20, 20), st.just(True)),
    k=st.integers(-50, 50),
    op=st.sampled_from(["+", "-", "*", "/", "mod", "rem"]),
    context=st.one_of(
        st.integers(-100, 100),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from(["s", 2**70, 1e308]),
    ),
)
def test_arithmetic_agrees_with_the_reference(a, b, k, op, context):
    text = f"""
    actor User {{}}
    resource Org {{}}
    value(o: Org, r) if pair(o, l, m) and r = l {op} m;
    allow(_: User, "equal", o: Org) if pair(o, l, m) and expect(o, e) and l {op} m = e;
    allow(_: User, "above", o: Org) if pair(o, l, _) and l {op} context.n > 0;
    """
    org = Entity("Org", "o")
    facts = [("pair", org, a, b), ("expect", org, k)]
    authz = Authorizer(text)
    put(authz, facts)
    ref = Reference(authz.policy.program, facts, {"n": context}, [U("u"), "equal", "above"])
    for action in ("equal", "above"):
        assert authz.authorize(U("u"), action, org, {"n": context}) == ref.allowed(
            U("u"), action, org
        )
    # '=' binds the result (the reference only tests values it already knows).
    expected = _reference_arith(op, a, b)
    assert set(authz.query("value", org, None)) == (
        set() if expected is _REF_MISSING else {("value", org, expected)}
    )


FORALL = """
actor User {}
resource Team {}
allow(_: User, "ship", team: Team) if
  forall(member(team, person), person matches User and passed_review(person));
"""


@SETTINGS
@given(
    facts=st.lists(
        st.one_of(
            st.tuples(st.just("member"), st.sampled_from([Entity("Team", t) for t in "ab"]), users),
            st.tuples(st.just("passed_review"), users),
        ),
        max_size=8,
    ),
    team=st.sampled_from([Entity("Team", t) for t in "abc"]),
)
def test_forall_holds_when_every_way_the_condition_holds_meets_the_requirement(facts, team):
    authz = Authorizer(FORALL)
    put(authz, facts)
    members = {f[2] for f in facts if f[0] == "member" and f[1] == team}
    passed = {f[1] for f in facts if f[0] == "passed_review"}
    assert authz.authorize(U("x"), "ship", team) == (members <= passed)
    ref = Reference(authz.policy.program, facts, None, [U("x"), team, "ship"])
    assert authz.authorize(U("x"), "ship", team) == ref.allowed(U("x"), "ship", team)


def test_cut_is_refused_with_the_reason():
    (message,) = errors_of('actor User {}\nallow(_: User, "x", _) if cut;')
    assert "'cut' is not supported" in message and "'not'" in message


# -- bad input ---------------------------------------------------------------------------------

OSO_TOKENS = [
    "actor", "resource", "global", "User", "Repo", "extends", "{", "}", "(", ")", "[", "]", ";",
    ",", ":", "=", "<", "if", "and", "or", "not", "in", "on", '"read"', '"x"', "roles", "=",
    "permissions", "relations", "role", "permission", "x", "_", "allow", "1", "-2", "+", "-",
    "*", "/", "mod", "rem", "forall", "cut", "true", "false", "@current_unix_time", "@nope",
    "test", "fixture", "setup", "assert", "assert_not", "iff", "String", "matches", "declare",
]  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(OSO_TOKENS), max_size=40).map(" ".join))
def test_any_oso_shaped_text_loads_and_tests_or_is_refused_with_a_policy_error(text):
    try:
        loaded = load([("p.polar", text)])
    except PolicyError as err:
        assert err.diagnostics and all(d.location.line >= 1 for d in err.diagnostics)
        return
    for result in run_tests(loaded):  # a test that cannot run reports why; nothing raises
        assert result.error is None or isinstance(result.error, str)


FRAGMENTS = [
    "actor User {}",
    'actor User { permissions = ["imp"]; "imp" if global "g"; }',
    'resource Repo { roles = ["r", "w",]; permissions = ["read", "push",]; relations = { p: Repo, };'
    ' role if role on "p"; permission if "w"; "read" if "r"; }',
    'global { roles = ["g"]; permissions = ["gp"]; "gp" if "g"; }',
    "resource Doc extends Repo {}",
    'allow(u: User, "read", r: Repo) if n matches Integer and lim(r, n) and n * 2 - 1 > @current_unix_time mod 7;',
    "allow(u: User, a: String, r: Repo) if forall(m(r, x), x matches User and ok(x)) and has_permission(u, a, r);",
    'allow(_: User, "x", _: Doc) if true;',
    'deny(_: User, "push", _: Resource) if false;',
    'test fixture f { has_role(User{"a"}, "r", Repo{"x"}); fixture g; }',
    'test fixture g { lim(Repo{"x"}, 3); }',
    'test "t" { setup { fixture f; } assert allow(User{"a"}, a: String, Repo{"x"}) iff a in ["read"]; }',
    'test "u" { setup { fixture nope; } assert_not allow(User{"a"}, "read", Repo{"x"}); }',
    'test "v" { setup { m(Repo{"x"}, User{"b"}); } assert has_permission(User{"g"}, p: String) iff p in []; }',
]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=8),
    st.lists(st.tuples(st.integers(0, 2000), st.sampled_from(OSO_TOKENS)), max_size=2),
)
def test_oso_fragments_with_noise_load_and_test_or_are_refused(fragments, noise):
    text = "\n".join(fragments)
    for position, token in noise:
        position %= len(text) + 1
        text = text[:position] + " " + token + " " + text[position:]
    try:
        loaded = load([("p.polar", text)])
        authz = Authorizer(text)
    except PolicyError as err:
        assert err.diagnostics
        return
    authz.authorize(Entity("User", "a"), "read", Entity("Repo", "x"))
    for result in run_tests(loaded):
        assert result.error is None or isinstance(result.error, str)


def test_fixtures_nested_deep_or_wide_expand_once_each():
    """A chain of 5,000 fixtures (deeper than Python's recursion) and a fixture included twice
    at every level (2^40 copies if each were expanded every time) load in linear time."""
    chain = "".join(f"test fixture f{i} {{ fixture f{i + 1}; }}\n" for i in range(5000))
    chain += 'test fixture f5000 { has_role(User{"a"}, "member", Org{"o"}); }\n'
    doubling = "".join(
        f"test fixture d{i} {{ fixture d{i + 1}; fixture d{i + 1}; }}\n" for i in range(40)
    )
    doubling += 'test fixture d40 { has_role(User{"b"}, "member", Org{"o"}); }\n'
    text = (
        'actor User {}\nresource Org { roles = ["member"]; permissions = ["read"]; "read" if "member"; }\n'
        + chain
        + doubling
        + 'test "deep" { setup { fixture f0; fixture d0; } assert allow(User{"a"}, "read", Org{"o"});'
        ' assert allow(User{"b"}, "read", Org{"o"}); }\n'
    )
    (result,) = run_tests(load([("p.polar", text)]))
    assert result.passed, result.error


def test_a_shorthand_rule_standing_for_too_many_rules_is_refused_before_it_is_built():
    import time

    roles = ", ".join(f'"r{i}"' for i in range(20000))
    text = (
        f"actor User {{}}\nresource A {{ roles = [{roles}]; relations = {{ b: B }};"
        f' role if other on "b"; }}\nresource B {{ roles = [{roles}]; }}\n'
    )
    started = time.process_time()
    messages = errors_of(text)
    assert time.process_time() - started < 10
    assert any(
        "stands for more than 10000 rules" in m and "policy_max_rules" in m for m in messages
    )


@pytest.mark.parametrize("count", [31, 5000])
def test_a_long_chain_of_arithmetic_is_refused_naming_the_limit_or_loads(count):
    text = "actor User {}\nresource Doc {}\n" + (
        'allow(_: User, "read", d: Doc) if n matches Integer and size(d, n) and n'
        + " + 1" * count
        + " > 0;"
    )
    if count < 32:
        authz = Authorizer(text)
        put(authz, [("size", Entity("Doc", "d"), 1)])
        assert authz.authorize(U("a"), "read", Entity("Doc", "d"))
    else:
        (message,) = errors_of(text)
        assert "policy_max_nesting = 32" in message and "arithmetic operators" in message


def test_object_literals_of_primitive_types_are_the_values_themselves():
    text = """
    actor User {}
    resource Doc {}
    allow(_: User, String{"read"}, d: Doc) if level(d, Integer{3}) and flag(d, Boolean{true});
    test "t" {
      setup { level(Doc{"d"}, Integer{3}); flag(Doc{"d"}, true); level(Doc{"e"}, 3); }
      assert allow(User{"a"}, "read", Doc{"d"});
      assert allow(User{"a"}, String{"read"}, Doc{"d"});
      assert_not allow(User{"a"}, "read", Doc{"e"});
    }
    """
    assert all(r.passed for r in results_of(text).values())
    authz = Authorizer(text)
    authz.facts.insert('level(Doc{"x"}, Integer{3})')
    assert authz.facts.get(("level", Entity("Doc", "x"), None)) == [
        ("level", Entity("Doc", "x"), 3)
    ]


@pytest.mark.parametrize(
    "literal", ["String{3}", 'Integer{"3"}', "Boolean{1}", "Integer{x}", "String{}"]
)
def test_an_object_literal_of_the_wrong_kind_is_refused(literal):
    (message,) = errors_of(f"f(x) if x = {literal};")
    assert "error:" in message


def test_a_fixture_declared_twice_is_refused():
    text = "test fixture f { a(1); }\ntest fixture f { a(2); }\n"
    (message,) = errors_of(text)
    assert "p.polar:2:1: error: test fixture f is declared twice (first at p.polar:1:1)" in message
