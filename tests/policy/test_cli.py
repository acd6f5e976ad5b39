"""``bastion policy check|test|explain`` as a person runs them: a real subprocess each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def bastion(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bastion.cli", *args], capture_output=True, text=True, cwd=ROOT
    )


def test_every_example_policy_passes_its_own_tests():
    for name in ("gitclub", "folders", "agents", "adaptive"):
        result = bastion("policy", "test", str(EXAMPLES / f"{name}.polar"))
        assert result.returncode == 0, result.stdout + result.stderr
        assert " 0 failed" in result.stdout and " passed" in result.stdout


def test_a_failing_assertion_fails_the_run_and_shows_the_explanation(tmp_path):
    broken = tmp_path / "broken.polar"
    broken.write_text(
        (EXAMPLES / "gitclub.polar")
        .read_text()
        .replace('assert_not allow(User{"alice"}, "push"', 'assert allow(User{"alice"}, "push"')
    )
    result = bastion("policy", "test", str(broken))
    assert result.returncode == 1
    assert '"organization members read their repositories and issues" FAILED' in result.stdout
    assert 'assert allow(User{"alice"}, "push", Repository{"anvil"}) failed' in result.stdout
    assert 'via resource Repository: "push" if "maintainer"' in result.stdout
    assert "4 passed, 1 failed" in result.stdout


def test_check_reports_errors_with_locations_and_exits_nonzero(tmp_path):
    bad = tmp_path / "bad.polar"
    bad.write_text('actor User {}\nresource Repo { roles = ["reader"]; "read" if "reader"; }\n')
    result = bastion("policy", "check", str(bad))
    assert result.returncode == 1
    assert f"{bad}:2:37: error: Repo declares no role or permission 'read'" in result.stderr
    ok = bastion("policy", "check", str(EXAMPLES / "agents.polar"))
    assert ok.returncode == 0 and ok.stdout.startswith("ok: 1 file(s)")


def test_check_warns_of_a_mask_path_that_cannot_be_read_and_still_loads_the_policy(tmp_path):
    """A mask path bastion cannot read withholds every JSON value of the results it applies to
    (fail closed, logged only when a call meets it): the author hears of it from check, with its
    place, and the policy still loads as it did."""
    policy = tmp_path / "masks.polar"
    policy.write_text(
        "actor User {}\nresource Tool {}\n"
        'mask(_u: User, "call", Tool{"crm/report"}, "customers.*.email");\n'
        'mask(_u: User, "call", Tool{"crm/report"}, "$..email");\n'
        'mask(_u: User, "call", Tool{"crm/report"}, 7);\n'
    )
    result = bastion("policy", "check", str(policy))
    assert result.returncode == 0, result.stderr
    assert f"{policy}:4:44: warning: the mask path '$..email' cannot be read" in result.stderr
    assert f"{policy}:5:44: warning: a mask path is a string, not 7" in result.stderr
    assert result.stderr.count(": warning: ") == 2  # none for the path that can be read
    assert result.stdout.rstrip().endswith("2 warning(s)")


def test_check_warns_of_an_obligation_the_gateway_never_acts_on_and_still_loads_the_policy(
    tmp_path,
):
    """A mask, a review or a label where the gateway has nothing to apply it to: the author
    hears of it from check, with the rule and its place; a rule that may apply elsewhere too
    (its action a variable) is not warned of; the policy still loads."""
    policy = tmp_path / "gateway.polar"
    policy.write_text(
        "actor User {}\nresource McpServer {}\nresource Tool {}\n"
        'mask(_u: User, "connect", McpServer{"desk"}, "ssn");\n'
        'requires_review(_u: User, "connect", _s: McpServer);\n'
        'label(McpServer{"desk"}, "secret");\n'
        'mask(_u: User, _action, _s: McpServer, "ssn");\n'
        'mask(_u: User, "call", Tool{"desk/report"}, "ssn");\n'
    )
    result = bastion("policy", "check", "--strict", str(policy))
    assert result.returncode == 0, result.stderr
    assert (
        f'{policy}:4:1: warning: mask(_u: User, "connect", McpServer{{"desk"}}, "ssn") is never'
        " applied by the gateway" in result.stderr
    )
    assert (
        f'{policy}:5:1: warning: requires_review(_u: User, "connect", _s: McpServer) is never'
        " applied by the gateway" in result.stderr
    )
    assert f'{policy}:6:1: warning: label(McpServer{{"desk"}}, "secret") is never applied' in (
        result.stderr
    )
    assert result.stderr.count(": warning: ") == 3
    assert result.stdout.rstrip().endswith("3 warning(s)")


def test_explain_one_decision_from_a_facts_file():
    result = bastion(
        "policy",
        "explain",
        str(EXAMPLES / "gitclub.polar"),
        "--facts",
        str(EXAMPLES / "gitclub.facts"),
        "User:alice",
        "read",
        "Repository:anvil",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('ALLOW allow(User{"alice"}, "read", Repository{"anvil"})')
    assert 'has_role(User{"alice"}, "member", Organization{"acme"})    [fact]' in result.stdout


def test_explain_as_json_with_context(tmp_path):
    facts = tmp_path / "facts.jsonl"
    facts.write_text(
        json.dumps({"predicate": "has_role", "args": [{"type": "User", "id": "root"}, "admin"]})
        + "\n"
    )
    result = bastion(
        "policy",
        "explain",
        str(EXAMPLES / "agents.polar"),
        "--facts",
        str(facts),
        "--json",
        "--context",
        '{"client": {"ip": "203.0.113.1"}}',
        "User:root",
        "call",
        "Tool:crm/search",
    )
    data = json.loads(result.stdout)
    assert data["allowed"] is False
    assert any(
        r.startswith("deny(_actor, _action, _resource) if not cidr_contains") for r in data["rules"]
    )


def test_explain_refuses_a_fact_the_policy_cannot_use(tmp_path):
    facts = tmp_path / "facts.polar"
    facts.write_text('has_role(User{"alice"}, "owner", Organization{"acme"})\n')
    result = bastion(
        "policy",
        "explain",
        str(EXAMPLES / "gitclub.polar"),
        "--facts",
        str(facts),
        "User:alice",
        "read",
        "Repository:anvil",
    )
    assert result.returncode == 2
    assert (
        result.stderr.startswith("bastion: ") and "does not fit any has_role fact" in result.stderr
    )


def test_strict_turns_the_misspelling_guard_into_a_failure(tmp_path):
    policy = tmp_path / "p.polar"
    policy.write_text(
        "actor User {}\nresource Doc {}\n"
        'deny(u: User, _: String, _: Doc) if is_blokced(u);\nallow(_: User, "read", _: Doc) if true;\n'
        'test "t" { assert allow(User{"a"}, "read", Doc{"d"}); }\n'
    )
    for command in ("check", "test"):
        loose = bastion("policy", command, str(policy))
        assert loose.returncode == 0, loose.stdout + loose.stderr
        assert "warning: is_blokced/1 is not defined" in loose.stderr
        strict = bastion("policy", command, "--strict", str(policy))
        assert strict.returncode == 1
        assert "error: is_blokced/1 is not defined" in strict.stderr


def test_strict_refuses_the_oso_examples_only_for_their_undeclared_facts(tmp_path):
    """With --strict, an Oso Cloud policy needs a declare per fact no rule defines; the only
    errors are those (no other construct is refused)."""
    for path in sorted((EXAMPLES / "oso").glob("*.polar")):
        result = bastion("policy", "check", "--strict", str(path))
        errors = [line for line in result.stderr.splitlines() if " error: " in line]
        assert all("is not defined by any rule" in line for line in errors), errors


def test_a_file_the_policy_commands_cannot_read_is_one_line_and_exit_2_as_everywhere(tmp_path):
    """check, test and explain name a policy or facts file they cannot read the way every other
    command does (`bastion: PATH: reason`, exit 2); exit 1 is their verdict on a policy that
    was read (an error in it, a failed test), not a missing file."""
    policy = str(EXAMPLES / "gitclub.polar")
    missing = str(tmp_path / "missing.polar")
    (tmp_path / "latin1.polar").write_bytes(b"# caf\xe9\n")
    explain = ("User:alice", "read", "Repository:anvil")
    for command, says in (
        (("check", missing), f"bastion: {missing}: No such file or directory"),
        (("test", policy, missing), f"bastion: {missing}: No such file or directory"),
        (("check", str(tmp_path)), f"bastion: {tmp_path}: Is a directory"),
        (("check", str(tmp_path / "latin1.polar")), "bastion: not UTF-8 text"),
        (("explain", missing, *explain), f"bastion: {missing}: No such file or directory"),
        (
            ("explain", policy, "--facts", str(tmp_path), *explain),
            f"bastion: {tmp_path}: Is a directory",
        ),
        (("explain", policy, *explain[:2], "anvil"), "bastion: not an entity: 'anvil'"),
    ):
        result = bastion("policy", *command)
        assert result.returncode == 2, (command, result.stderr)
        assert result.stderr.startswith(says) and result.stderr.count("\n") == 1, result.stderr
        assert result.stdout == ""
