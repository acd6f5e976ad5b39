"""``bastion policy check|test|explain``: work on policy files without a server.

``check`` and ``test`` exit 1 when the policy they were asked about fails (an error, a failed
test): that is their answer. What a command cannot use (a file it cannot read, explain's facts,
actor or context) is a refusal, ``bastion: ...`` and exit 2, as in every other command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bastion import untrusted_json
from bastion.facts.model import Entity, FactError, fact_from_json
from bastion.policy import LoadedPolicy, load
from bastion.policy.errors import PolicyError
from bastion.policy.parser import parse_fact

# Other modules add their ``bastion policy ...`` commands (push, versions, rollback) here.
POLICY_COMMANDS: argparse._SubParsersAction | None = None


def register(sub: argparse._SubParsersAction) -> None:
    global POLICY_COMMANDS
    policy = sub.add_parser("policy", help="check, test and explain policies")
    POLICY_COMMANDS = policy.add_subparsers(dest="policy_command", required=True)

    check = POLICY_COMMANDS.add_parser("check", help="load policy files and report problems")
    check.add_argument("files", nargs="+", type=Path)
    check.add_argument("--strict", action="store_true", help=_STRICT)
    check.set_defaults(func=cmd_check)

    test = POLICY_COMMANDS.add_parser("test", help="run the test blocks of policy files")
    test.add_argument("files", nargs="+", type=Path)
    test.add_argument("--strict", action="store_true", help=_STRICT)
    test.set_defaults(func=cmd_test)

    explain = POLICY_COMMANDS.add_parser("explain", help="explain one decision")
    explain.add_argument("files", nargs="+", type=Path, help="policy files")
    explain.add_argument(
        "--facts", type=Path, action="append", default=[], help="facts: Polar lines or JSON lines"
    )
    explain.add_argument("--context", default=None, help="the request context as JSON")
    explain.add_argument("--json", action="store_true", help="print the explanation as JSON")
    explain.add_argument("actor", help="Type:id")
    explain.add_argument("action")
    explain.add_argument("resource", help="Type:id")
    explain.set_defaults(func=cmd_explain)


_STRICT = (
    "refuse a call to a predicate that no rule, declaration or builtin defines, and a type that"
    " no block declares (by default a warning: the fact type is inferred, as Oso Cloud does)"
)


def _load(files: list[Path], strict: bool = False) -> LoadedPolicy | None:
    """The policy of ``files``, or None once its errors are printed. A file that cannot be read
    is `bastion.cli.main`'s to say (OSError, UnicodeError), as in every command."""
    texts = [(str(f), f.read_text(encoding="utf-8")) for f in files]
    try:
        loaded = load(texts, strict=strict)
    except PolicyError as err:
        for d in err.diagnostics:
            print(d, file=sys.stderr)
        return None
    for w in loaded.warnings:
        print(w, file=sys.stderr)
    return loaded


def read_facts(path: Path) -> list[tuple]:
    """Facts from a file: JSON lines (``.jsonl``/``.json``, read as a request body is) or one
    Polar fact per line."""
    facts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            facts.append(
                fact_from_json(untrusted_json.loads(line, unique_keys=True))
                if path.suffix in (".jsonl", ".json")
                else parse_fact(line)
            )
        except (FactError, PolicyError, untrusted_json.JsonRefused) as err:
            raise FactError(f"{path}:{number}: {err}") from None
    return facts


def _context(text: str | None) -> dict | None:
    """``--context``: a JSON object, read as the API reads a decision's ``context``."""
    if text is None:
        return None
    try:
        context = untrusted_json.loads(text, unique_keys=True)
    except untrusted_json.JsonRefused as err:
        raise ValueError(f"--context: {err}") from None
    if not isinstance(context, dict):
        raise ValueError("--context must be a JSON object, as a decision's context is")
    return context


def cmd_check(args: argparse.Namespace) -> int:
    loaded = _load(args.files, args.strict)
    if loaded is None:
        return 1
    from bastion.decide import Authorizer
    from bastion.decide.contract_warnings import contract_warnings

    try:
        Authorizer()._swap(loaded)  # compiling finds rules that can never be evaluated
    except PolicyError as err:
        for d in err.diagnostics:
            print(d, file=sys.stderr)
        return 1
    # The decision contract's own (a mask path that cannot be read, an obligation the gateway
    # never acts on): warnings, never errors, --strict or not.
    contract = contract_warnings(loaded.program)
    for w in contract:
        print(w, file=sys.stderr)
    rules = sum(len(c) for c in loaded.program.clauses.values())
    warnings = len(loaded.warnings) + len(contract)
    print(
        f"ok: {len(args.files)} file(s), {rules} rule clause(s), {len(loaded.tests)} test(s), {warnings} warning(s)"
    )
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    from bastion.policy.testing import run_and_report

    loaded = _load(args.files, args.strict)
    if loaded is None:
        return 1
    return 0 if run_and_report(loaded, sys.stdout) else 1


def cmd_explain(args: argparse.Namespace) -> int:
    from bastion.decide import Authorizer

    loaded = _load(args.files)
    if loaded is None:
        return 2
    authz = Authorizer()
    try:
        authz._swap(loaded)
        for path in args.facts:
            authz.facts.apply(read_facts(path), [])
        actor, resource = Entity.parse(args.actor), Entity.parse(args.resource)
        context = _context(args.context)
    except (FactError, PolicyError, ValueError) as err:
        print(f"bastion: {err}", file=sys.stderr)
        return 2
    decision = authz.decide(actor, args.action, resource, context=context)
    if args.json:
        print(json.dumps(decision.explanation.to_dict(), indent=2))
    else:
        print(decision.explanation)
    return 0
