"""Decisions: authorize, list, actions, query and explanations, over RBAC, ReBAC and ABAC."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bastion import Authorizer, Entity, FactError, Variable
from tests.waits import before_expiry, past

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
User, Org, Repo, Issue = (
    (lambda i: Entity("User", i)),
    (lambda i: Entity("Organization", i)),
    (lambda i: Entity("Repository", i)),
    (lambda i: Entity("Issue", i)),
)  # noqa: E731


@pytest.fixture
def gitclub() -> Authorizer:
    authz = Authorizer.from_files(EXAMPLES / "gitclub.polar")
    authz.facts.apply(
        [
            ("has_role", User("alice"), "member", Org("acme")),
            ("has_role", User("carol"), "admin", Org("acme")),
            ("has_relation", Repo("anvil"), "parent", Org("acme")),
            ("has_relation", Repo("rocket"), "parent", Org("acme")),
            ("has_relation", Repo("other"), "parent", Org("beta")),
            ("has_relation", Issue("i1"), "repository", Repo("anvil")),
            ("is_public", Repo("gitclub")),
        ],
        [],
    )
    return authz


def test_role_inherited_through_the_parent_org(gitclub):
    assert gitclub.authorize(User("alice"), "read", Repo("anvil"))
    assert not gitclub.authorize(User("alice"), "read", Repo("other"))
    assert not gitclub.authorize(User("alice"), "push", Repo("anvil"))


def test_deny_by_default_for_unknown_actors_actions_and_types(gitclub):
    assert not gitclub.authorize(User("nobody"), "read", Repo("anvil"))
    assert not gitclub.authorize(User("alice"), "fly", Repo("anvil"))
    assert not gitclub.authorize(Entity("Robot", "r2"), "read", Repo("gitclub"))
    assert not gitclub.authorize("alice", "read", "anvil")


def test_an_empty_policy_allows_nothing():
    assert not Authorizer("").authorize(User("alice"), "read", Repo("anvil"))


def test_deny_wins_over_allow(gitclub):
    assert gitclub.authorize(User("carol"), "delete", Repo("anvil"))
    gitclub.facts.insert(("is_blocked", User("carol")))
    assert not gitclub.authorize(User("carol"), "delete", Repo("anvil"))
    assert gitclub.list(User("carol"), "read", "Repository") == []
    assert gitclub.actions(User("carol"), Repo("anvil")) == set()


def test_a_query_of_allow_answers_what_authorize_answers_deny_included(gitclub):
    """``query("allow", ...)`` is the other way to ask what an actor may do (``/v1/query``, the
    Oso SDK's ``build_query(("allow", ...))``): it answered allow, and listed the actions and
    resources, that ``authorize`` refuses because a ``deny`` rule fires."""
    carol = User("carol")
    gitclub.facts.insert(("is_blocked", carol))
    assert not gitclub.authorize(carol, "delete", Repo("anvil"))
    assert gitclub.query("allow", carol, "delete", Repo("anvil")) == []
    assert gitclub.query("allow", carol, Variable("action"), Repo("anvil")) == []
    assert gitclub.query("allow", carol, "read", Variable("repo")) == []
    assert gitclub.query("allow", Variable("who"), "delete", Repo("anvil")) == []
    assert not gitclub.holds("allow", carol, "delete", Repo("anvil"))
    # Those no deny rule holds are answered as before.
    readers = gitclub.query("allow", Variable("who"), "read", Repo("anvil"))
    assert [row[1] for row in readers] == [User("alice")]
    assert gitclub.query("allow", User("alice"), Variable("action"), Repo("anvil")) == [
        ("allow", User("alice"), action, Repo("anvil")) for action in ["create_issue", "read"]
    ]


def test_list_returns_the_ids_a_user_may_act_on(gitclub):
    assert gitclub.list(User("alice"), "read", "Repository") == ["anvil", "gitclub", "rocket"]
    assert gitclub.list(User("alice"), "read", "Issue") == ["i1"]
    assert gitclub.list(User("alice"), "delete", "Repository") == []
    assert gitclub.list(User("carol"), "delete", "Repository") == ["anvil", "rocket"]


def test_actions_lists_every_permitted_action(gitclub):
    assert gitclub.actions(User("alice"), Repo("anvil")) == {"read", "create_issue"}
    assert gitclub.actions(User("carol"), Repo("anvil")) == {
        "read",
        "create_issue",
        "push",
        "delete",
    }
    assert gitclub.actions(User("alice"), Issue("i1")) == {"read", "comment"}


def test_query_with_unbound_variables(gitclub):
    rows = gitclub.query("has_role", User("carol"), Variable("role"), Variable("on"))
    assert ("has_role", User("carol"), "maintainer", Repo("anvil")) in rows
    assert ("has_role", User("carol"), "admin", Org("acme")) in rows
    assert gitclub.query("has_role", User("alice"), "reader", Repo("rocket")) == [
        ("has_role", User("alice"), "reader", Repo("rocket"))
    ]
    assert gitclub.query("has_role", User("alice"), "admin", Repo("rocket")) == []


def test_revoking_a_role_takes_effect_on_the_next_decision(gitclub):
    assert gitclub.authorize(User("alice"), "read", Repo("anvil"))
    assert gitclub.facts.delete(("has_role", User("alice"), None, None)) == 1
    assert not gitclub.authorize(User("alice"), "read", Repo("anvil"))


def test_decide_explains_an_allow_with_the_rules_and_facts_that_proved_it(gitclub):
    decision = gitclub.decide(User("alice"), "read", Repo("anvil"))
    assert decision.allowed
    data = decision.explanation.to_dict()
    assert 'has_role(User{"alice"}, "member", Organization{"acme"})' in data["facts"]
    assert 'has_relation(Repository{"anvil"}, "parent", Organization{"acme"})' in data["facts"]
    assert 'resource Repository: "reader" if "member" on "parent"' in data["rules"]


def test_decide_explains_a_deny_with_the_paths_tried(gitclub):
    decision = gitclub.decide(User("alice"), "push", Repo("anvil"))
    assert not decision.allowed
    text = str(decision.explanation)
    assert text.startswith('DENY allow(User{"alice"}, "push", Repository{"anvil"})')
    assert 'via resource Repository: "push" if "maintainer"' in text
    assert '✗ has_role(User{"alice"}, "admin", Organization{"acme"})    (no matching fact' in text


def test_decide_names_the_deny_rule_that_fired(gitclub):
    gitclub.facts.insert('is_blocked(User{"alice"})')
    decision = gitclub.decide(User("alice"), "read", Repo("anvil"))
    assert not decision.allowed
    assert any(r.startswith("deny(user: User") for r in decision.explanation.rules())


FOLDERS = (EXAMPLES / "folders.polar").read_text()


def test_deep_folder_tree_recursion():
    # Well within the default budget (evaluation_max_depth = 200 recursive calls).
    authz = Authorizer(FOLDERS)
    chain = [Entity("Folder", f"f{i}") for i in range(150)]
    authz.facts.apply([("has_relation", chain[i + 1], "parent", chain[i]) for i in range(149)], [])
    authz.facts.insert(("has_role", User("alice"), "viewer", chain[0]))
    assert authz.authorize(User("alice"), "view", chain[-1])
    assert len(authz.list(User("alice"), "view", "Folder")) == 150
    assert not authz.authorize(User("bob"), "view", chain[-1])


def test_cycles_terminate_with_the_right_answer():
    authz = Authorizer(FOLDERS)
    a, b, c, d = (Entity("Folder", x) for x in "abcd")
    authz.facts.apply(
        [
            ("has_relation", a, "parent", b),
            ("has_relation", b, "parent", c),
            ("has_relation", c, "parent", a),
        ],
        [],
    )
    authz.facts.insert(("has_relation", d, "parent", a))
    assert not authz.authorize(User("alice"), "view", a)
    authz.facts.insert(("has_role", User("alice"), "viewer", c))
    assert all(authz.authorize(User("alice"), "view", f) for f in (a, b, c, d))
    assert authz.list(User("alice"), "view", "Folder") == ["a", "b", "c", "d"]


AGENTS = (EXAMPLES / "agents.polar").read_text()
OFFICE = {"client": {"ip": "10.0.0.7"}}


def test_context_fields_comparisons_and_missing_fields_fail_closed():
    authz = Authorizer(AGENTS)
    pay = Entity("Tool", "billing/pay")
    authz.facts.apply(
        [("has_role", User("root"), "admin"), ("has_attribute", pay, "kind", "payment")], []
    )
    assert authz.authorize(User("root"), "call", pay, {**OFFICE, "arguments": {"amount": 10}})
    assert not authz.authorize(User("root"), "call", pay, {**OFFICE, "arguments": {"amount": 1001}})
    assert not authz.authorize(User("root"), "call", pay, {"client": {"ip": "8.8.8.8"}})
    assert not authz.authorize(User("root"), "call", pay, {"client": {}})  # missing ip: denied
    assert not authz.authorize(User("root"), "call", pay)


def test_business_hours_in_a_time_zone():
    policy = 'actor User {}\nresource Tool {}\nallow(_u: User, "call", _t: Tool) if in_time_window(context.time, "Mon-Fri", "09:00", "17:00", "America/New_York");'
    authz = Authorizer(policy)
    u, t = User("a"), Entity("Tool", "x")
    assert authz.authorize(
        u, "call", t, {"time": "2026-11-30T14:00:00Z"}
    )  # Monday 09:00 in New York
    assert not authz.authorize(u, "call", t, {"time": "2026-11-30T13:59:00Z"})  # 08:59
    assert not authz.authorize(u, "call", t, {"time": "2026-11-30T22:00:00Z"})  # 17:00
    assert not authz.authorize(u, "call", t, {"time": "2026-11-29T15:00:00Z"})  # Sunday
    assert authz.authorize(u, "call", t, {"time": 1796047200})  # epoch seconds: Monday 09:00 EST
    assert not authz.authorize(u, "call", t, {"time": "not a time"})


def test_a_time_window_read_from_the_request_is_written_in_ascii_digits_or_matches_nothing():
    """A window's hours may come from the request: '²' is a digit to Python's str.isdigit()
    that int() refuses (the evaluation failed), '٠٩' one it reads as 09."""
    policy = (
        'actor User {}\nresource Tool {}\nallow(_u: User, "call", _t: Tool) if'
        ' in_time_window(context.time, "Mon-Sun", context.start, "23:59", "UTC");'
    )
    authz = Authorizer(policy)
    u, t, noon = User("a"), Entity("Tool", "x"), "2026-11-30T12:00:00Z"
    assert authz.authorize(u, "call", t, {"time": noon, "start": "09:00"})
    for start in ("\u00b2:00", "\u0660\u0669:00", "09:\u0660\u0660"):
        assert not authz.authorize(u, "call", t, {"time": noon, "start": start}), start


def test_a_time_outside_the_calendar_is_no_time_and_never_an_error():
    """Epoch seconds past the year 9999 (or before year 1), and instants at the calendar's edge
    that a time zone would move past it, are not times: every time builtin is false for them
    (as for any value that is not a time), and the decision is answered, not a server error.
    A deny rule over them does not refuse, as with any other value that is not a time."""
    policy = """actor User {}
resource Tool {}
allow(_u: User, "call", _t: Tool) if in_time_window(context.time, "*", "00:00", "24:00", "Pacific/Kiritimati");
allow(_u: User, "read", _t: Tool) if time_before(context.time, "2027-01-01T00:00:00Z");
allow(_u: User, "read", _t: Tool) if time_after(context.time, "2027-01-01T00:00:00Z");
allow(_u: User, "list", _t: Tool) if in_time_window(context.time, "*", "00:00", "24:00", "America/Los_Angeles");
"""
    authz = Authorizer(policy)
    u, t = User("a"), Entity("Tool", "x")
    for when in (253402300800, -62135596801, 2**62, -(2**62), 1e300):  # 253402300800: year 10000
        for action in ("call", "read", "list"):
            assert not authz.authorize(u, action, t, {"time": when}), (when, action)
    # The calendar's last second is a time, but not in a zone where it is already year 10000.
    last = {"time": "9999-12-31T23:59:59+00:00"}
    assert authz.authorize(u, "read", t, last) and authz.authorize(u, "list", t, last)
    assert not authz.authorize(u, "call", t, last)
    # Its first: not in a zone where it is still year 0.
    first = {"time": "0001-01-01T00:00:00+00:00"}
    assert authz.authorize(u, "read", t, first) and not authz.authorize(u, "list", t, first)


def test_a_time_is_at_most_64_characters():
    """What a time builtin parses is remembered (a policy reads the same few times again and
    again); a request's long text is not a time, and is not kept: a caller sending large strings
    where a policy reads a time cannot make the process hold thousands of them."""
    from bastion.policy.builtins.time_window import _parse_iso

    policy = (
        'actor User {}\nresource Tool {}\nallow(_u: User, "call", _t: Tool) if'
        ' time_before(context.arguments.when, "2027-01-01T00:00:00Z");'
    )
    authz = Authorizer(policy)
    u, t = User("a"), Entity("Tool", "x")
    assert authz.authorize(u, "call", t, {"arguments": {"when": "2026-11-30T09:00:00.000+00:00"}})
    held = _parse_iso.cache_info().currsize
    for n in range(20):
        padded = f"2026-11-30T09:00:00.{'0' * (100_000 + n)}+00:00"
        assert not authz.authorize(u, "call", t, {"arguments": {"when": padded}})
    assert _parse_iso.cache_info().currsize == held


def test_an_address_or_a_window_is_at_most_64_characters_and_long_texts_are_not_kept():
    """What cidr_contains and in_time_window parse is remembered, as a time is: a request's long
    text is not an address, days, a time of day or a zone, and is not kept, so a caller sending
    large strings where a policy reads one cannot make the process hold thousands of them."""
    from bastion.policy.builtins import cidr, time_window

    policy = (
        'actor User {}\nresource Tool {}\nallow(_u: User, "call", _t: Tool) if'
        " cidr_contains(context.arguments.net, context.arguments.host);\n"
        'allow(_u: User, "read", _t: Tool) if in_time_window("2026-11-30T10:00:00Z",'
        " context.days, context.start, context.end, context.zone);"
    )
    authz = Authorizer(policy)
    u, t = User("a"), Entity("Tool", "x")
    net = {"net": "10.0.0.0/8", "host": "10.1.2.3"}
    window = {"days": "Mon-Fri", "start": "09:00", "end": "17:00", "zone": "Europe/Paris"}
    assert authz.authorize(u, "call", t, {"arguments": net})
    assert authz.authorize(u, "read", t, window)
    caches = (
        cidr._network,
        cidr._address,
        *(getattr(time_window, f) for f in ("_days", "_minutes", "_zone")),
    )
    held = [cache.cache_info().currsize for cache in caches]
    for n in range(10):
        pad = " " * (100_000 + n)
        for field in ("net", "host"):
            assert not authz.authorize(
                u, "call", t, {"arguments": {**net, field: net[field] + pad}}
            )
        for field in window:
            assert not authz.authorize(u, "read", t, {**window, field: window[field] + pad})
    assert [cache.cache_info().currsize for cache in caches] == held


@pytest.mark.parametrize(
    "mapped", ["::ffff:203.0.113.5", "::ffff:cb00:7105", "0:0:0:0:0:ffff:203.0.113.5"]
)
def test_an_ipv4_client_seen_through_a_dual_stack_socket_is_its_ipv4_address(mapped):
    """A server listening on IPv6 sees an IPv4 client as an IPv4-mapped address: it is the same
    host, inside the IPv4 networks a rule names (a guardrail on them cannot be walked around)."""
    policy = """actor User {}
resource Tool {}
allow(_u: User, _a: String, _t: Tool);
deny(_u: User, "call", _t: Tool) if cidr_contains("203.0.113.0/24", context.client.ip);
allow(_u: User, "read", _t: Tool) if cidr_contains("203.0.113.0/24", context.client.ip);
deny(_u: User, "list", _t: Tool) if not cidr_contains("203.0.113.0/24", context.client.ip);
"""
    authz = Authorizer(policy)
    u, t = User("a"), Entity("Tool", "x")
    for ip in ("203.0.113.5", mapped):
        client = {"client": {"ip": ip}}
        assert not authz.authorize(u, "call", t, client), ip
        assert authz.authorize(u, "read", t, client) and authz.authorize(u, "list", t, client)
    for ip in ("198.51.100.7", "::ffff:198.51.100.7", "2001:db8::cb00:7105"):
        client = {"client": {"ip": ip}}
        assert authz.authorize(u, "call", t, client), ip
        assert not authz.authorize(u, "list", t, client), ip


def test_in_over_lists_and_cidr_matching():
    policy = """actor User {}\nresource Doc {}
allow(_u: User, "read", _d: Doc) if "support" in context.groups and cidr_contains("192.168.0.0/16", context.ip);
allow(_u: User, "write", _d: Doc) if context.level in [3, 4];"""
    authz = Authorizer(policy)
    u, d = User("a"), Entity("Doc", "d")
    assert authz.authorize(u, "read", d, {"groups": ["eng", "support"], "ip": "192.168.4.4"})
    assert not authz.authorize(u, "read", d, {"groups": ["eng"], "ip": "192.168.4.4"})
    assert not authz.authorize(
        u, "read", d, {"groups": "support", "ip": "192.168.4.4"}
    )  # not a list
    assert not authz.authorize(u, "read", d, {"groups": ["support"], "ip": "::1"})
    assert authz.authorize(u, "write", d, {"level": 4}) and not authz.authorize(
        u, "write", d, {"level": 5}
    )


def test_a_grant_with_an_expiry_stops_matching_at_that_instant():
    fact = ("has_role", User("temp"), "admin", Org("acme"))

    def granted_before_expiry(at: float) -> Authorizer:
        authz = Authorizer.from_files(EXAMPLES / "gitclub.polar")
        authz.facts.insert(fact, expires_at=at)
        assert authz.authorize(User("temp"), "manage_members", Org("acme"))
        assert authz.facts.expiry(fact) == at
        return authz

    authz, at = before_expiry(granted_before_expiry, 0.1)
    past(at)
    assert not authz.authorize(User("temp"), "manage_members", Org("acme"))
    assert authz.facts.get(("has_role", User("temp"), None, None)) == []


def test_a_grant_that_has_already_expired_is_not_added():
    authz = Authorizer.from_files(EXAMPLES / "gitclub.polar")
    authz.facts.insert(("has_role", User("late"), "admin", Org("acme")), expires_at=time.time() - 1)
    assert not authz.authorize(User("late"), "manage_members", Org("acme"))


def test_fact_writes_are_checked_against_the_policy(gitclub):
    with pytest.raises(FactError, match="the policy has no use for is_admin/1 facts"):
        gitclub.facts.insert(("is_admin", User("x")))
    with pytest.raises(
        FactError,
        match=r'does not fit any has_role fact the policy uses: expected .*"admin"\|"member"',
    ):
        gitclub.facts.insert(("has_role", User("x"), "owner", Org("acme")))  # no such role
    with pytest.raises(FactError, match="does not fit"):
        gitclub.facts.insert(("has_relation", Repo("r"), "parent", Repo("q")))  # wrong type
    with pytest.raises(FactError, match="does not fit"):
        gitclub.facts.insert(("is_public", Org("acme")))
    with pytest.raises(FactError, match="argument 1 of is_public must be"):
        gitclub.facts.insert(("is_public", 3.5))


def test_a_batch_with_one_bad_fact_changes_nothing(gitclub):
    before = sorted(gitclub.facts, key=repr)
    with pytest.raises(FactError), gitclub.facts.batch() as batch:
        batch.delete(("has_role", None, None, None))
        batch.insert(("is_public", Repo("new")))
        batch.insert(("has_role", User("x"), "typo", Org("acme")))
    assert sorted(gitclub.facts, key=repr) == before


def test_facts_as_polar_text_and_wildcard_patterns(gitclub):
    gitclub.facts.insert('has_role(User{"dan"}, "member", Organization{"beta"})')
    assert gitclub.facts.get('has_role(User{"dan"}, _, _)') == [
        ("has_role", User("dan"), "member", Org("beta"))
    ]
    assert gitclub.facts.delete('has_relation(_, "parent", Organization{"acme"})') == 2
    assert not gitclub.authorize(User("alice"), "read", Repo("anvil"))


def test_reloading_the_policy_keeps_the_facts(gitclub):
    gitclub.load_policy(
        (EXAMPLES / "gitclub.polar").read_text().replace('"delete" if "admin";', "")
    )
    assert not gitclub.authorize(User("carol"), "delete", Repo("anvil"))
    assert gitclub.authorize(User("carol"), "push", Repo("anvil"))


def test_fact_patterns_read_through_indexes_match_a_full_scan(gitclub):
    # Build the indexes that decisions use, then compare pattern reads with a plain filter.
    gitclub.list(User("alice"), "read", "Repository")
    everything = list(gitclub.facts)
    patterns = [
        ("has_relation", Repo("anvil"), "parent", None),
        ("has_relation", None, "parent", Org("acme")),
        ("has_role", User("alice"), "member", None),
        ("has_role", None, None, Org("acme")),
        ("has_role", None, "admin", None),
        ("is_public", None),
    ]
    for pattern in patterns:
        expected = sorted(
            (f for f in everything if len(f) == len(pattern) and f[0] == pattern[0]
             and all(p is None or p == v for p, v in zip(pattern[1:], f[1:], strict=True))),
            key=repr,
        )  # fmt: skip
        assert sorted(gitclub.facts.get(pattern), key=repr) == expected, pattern


def test_a_query_shape_that_cannot_be_planned_is_refused_and_leaves_the_engine_working():
    from bastion import PolicyError

    policy = "actor User {}\nresource Doc {}\ndeclare level(Doc, Integer);\nhigh(d: Doc, n) if level(d, m) and m > n;"
    authz = Authorizer(policy)
    authz.facts.insert(("level", Entity("Doc", "d"), 5))
    with pytest.raises(PolicyError, match="never bound"):
        authz.query("high", Variable("d"), Variable("n"))  # n must be given
    assert authz.query("high", Variable("d"), 3) == [("high", Entity("Doc", "d"), 3)]
    assert authz.query("high", Entity("Doc", "d"), 7) == []


def test_load_takes_per_fact_expiries_and_returns_what_the_policy_cannot_use(gitclub):
    future = time.time() + 3600
    refused = gitclub.facts.load(
        [
            (("has_role", User("x"), "member", Org("acme")), future),
            (("has_role", User("y"), "owner", Org("acme")), None),  # no such role
            (("is_public", Repo("new")), None),
        ],
        deletes=[("has_role", User("alice"), None, None)],
    )
    assert refused == [(("has_role", User("y"), "owner", Org("acme")), None)]
    assert gitclub.facts.expiry(("has_role", User("x"), "member", Org("acme"))) == future
    assert gitclub.authorize(User("anyone"), "read", Repo("new"))
    assert not gitclub.authorize(User("alice"), "read", Repo("anvil"))
    with pytest.raises(FactError):
        gitclub.facts.load([(("has_role", 3.5), None)])


def test_a_session_asks_several_questions_on_one_view_of_the_facts(gitclub):
    with gitclub.session() as s:
        assert s.allowed(User("alice"), "read", Repo("anvil"))
        assert not s.allowed(User("alice"), "push", Repo("anvil"))
        roles = s.values("has_role", User("carol"), Variable("role"), Repo("anvil"))
        assert roles == {"reader", "maintainer", "admin"}
        assert s.values("has_role", User("carol"), "admin", Org("acme")) == {()}
        assert s.values("no_such_rule", User("carol")) == set()
        assert s.rows("has_relation", "bbf", Repo("anvil"), "parent") == {Org("acme")}
    gitclub.facts.insert(("is_blocked", User("alice")))  # the lock was released
    assert not gitclub.authorize(User("alice"), "read", Repo("anvil"))


def test_a_question_of_a_session_in_another_context_reads_that_context_whole():
    # A batch asks each check in its own context: a list or object of the check before (kept,
    # as a policy value, for the evaluation) must not answer for this check's.
    authz = Authorizer(
        'actor User {}\nresource Doc {}\nallow(_u: User, "read", _d: Doc) if context.items = [1]'
        " and context.owner = context.asker;"
    )
    ann, doc = Entity("User", "ann"), Entity("Doc", "d")
    first = {"items": [1], "owner": {"id": 1}, "asker": {"id": 1}}
    with authz.session() as s:
        assert s.allowed(ann, "read", doc, first)
        assert not s.allowed(ann, "read", doc, {**first, "items": [2]})
        assert not s.allowed(ann, "read", doc, {**first, "asker": {"id": 2}})
        s.use_context({**first, "items": [3]})
        assert not s.allowed(ann, "read", doc)
        s.use_context(first)
        assert s.allowed(ann, "read", doc)


def test_lists_and_objects_in_the_context_are_values_like_any_other():
    # A list or object from the request may reach a fact lookup, a rule's arguments or its
    # answers: it is a value that matches nothing there, never an error (it was TypeError:
    # unhashable type, a 500). And a list in the context equals the same list written.
    policy = """actor User {}
resource Doc { roles = ["reader"]; permissions = ["read"]; "read" if "reader"; }
allow(actor, "read", resource) if x in context.ids and has_role(actor, x, resource);
allow(actor, "see", resource) if reaches(context.path, resource);
reaches(p, d: Doc) if has_role(_u, p, d);
reaches(p, d) if reaches(p, e) and has_relation(d, "parent", e);
allow(_actor, "tag", _resource: Doc) if context.tags = ["a", "b"];
picked(x) if x in context.ids;"""
    authz = Authorizer(policy)
    ann, doc = Entity("User", "ann"), Entity("Doc", "d")
    authz.facts.insert(("has_role", ann, "reader", doc))
    for ids in ([["reader"]], [{"a": 1}], [[{"a": [1]}]]):
        assert not authz.authorize(ann, "read", doc, {"ids": ids})
        assert not authz.decide(ann, "read", doc, {"ids": ids}).allowed
        assert authz.list(ann, "read", "Doc", {"ids": ids}) == []
    assert authz.authorize(ann, "read", doc, {"ids": [["x"], "reader"]})
    assert not authz.authorize(ann, "see", doc, {"path": ["reader"]})
    assert authz.authorize(ann, "tag", doc, {"tags": ["a", "b"]})
    assert not authz.authorize(ann, "tag", doc, {"tags": ["b", "a"]})
    assert authz.query("picked", Variable("x"), context={"ids": [[1, 2], {"k": "v"}]}) == [
        ("picked", (1, 2)),
        ("picked", {"k": "v"}),
    ]


def test_string_builtins_are_false_for_values_that_are_not_text():
    policy = """actor User {}\nresource Doc {}
allow(_u: User, "send", _d: Doc) if lower(context.to, to) and ends_with(to, "@acme.example");
allow(_u: User, "read", _d: Doc) if starts_with(context.uri, "customers://") and not contains(context.uri, "..");"""
    authz = Authorizer(policy)
    u, d = User("a"), Entity("Doc", "d")
    assert authz.authorize(u, "send", d, {"to": "Ann@ACME.example"})
    assert not authz.authorize(u, "send", d, {"to": "ann@acme.example.evil.test"})
    for wrong in (5, True, ["ann@acme.example"], {"to": "ann@acme.example"}, None):
        assert not authz.authorize(u, "send", d, {"to": wrong}), wrong
    assert not authz.authorize(u, "send", d, {})
    assert authz.authorize(u, "read", d, {"uri": "customers://1"})
    assert not authz.authorize(u, "read", d, {"uri": "customers://../etc"})
    assert not authz.authorize(u, "read", d, {"uri": 7})
    # The explanation of a decision names the value lower produced.
    rules = authz.decide(u, "send", d, {"to": "Ann@ACME.example"}).explanation.rules()
    assert any("lower" in r for r in rules)


def test_a_field_read_only_in_arithmetic_counts_as_read():
    """A caller skips working out a field no rule reads (`Authorizer.reads_context`): one read
    only inside arithmetic must count, or a guardrail on it would never see it."""
    authz = Authorizer(
        'actor User {}\nresource Tool {}\ndeny(_: User, "call", _t: Tool) if'
        " context.session.count + 0 > 3;"
    )
    assert authz.reads_context("session")
