"""CLI: ``bastion approvals list|show|approve|deny``, on the deployment's database (docs/approvals.md).

Like the other admin commands it works on the database directly (``--database``, or the one in
bastion.toml), and it needs the ``[oauth]`` key directory: what a request holds is sealed under a
key kept there. The policy in force and the stored facts are loaded here, so the policy's
``approver`` rules decide who may answer, as they do on the server. ``--as`` names the person who
answers; whoever can run this command can read the database, and vouches for that person (the
operating-system user who ran it is kept in the audit event).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime

from bastion.approvals.service import Approvals, NotAllowed, UnknownRequest, UnmatchedField
from bastion.approvals.store import MAX_LIST, STATUSES, ApprovalRequest
from bastion.audit.actor import cli_actor
from bastion.audit.commands import event_line
from bastion.cli import add_limit, whole_number
from bastion.decide import Authorizer
from bastion.facts.store import FactStore
from bastion.names import is_name, readable
from bastion.server.config import ServerConfig, command_database
from bastion.signals.suspensions import PREDICATE as SUSPENDED
from bastion.signals.suspensions import Suspensions


class CommandError(Exception):
    """A refusal or a mistake the person running the command can fix; the message says how."""


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Deployment:
    """The approvals of the configured deployment, opened for one command."""

    def __init__(self, args: argparse.Namespace) -> None:
        from bastion.approvals.service import approvals_from_config
        from bastion.approvals.settings import ApprovalSettings
        from bastion.oauth.settings import OAuthSettings

        config = ServerConfig.load(args.config)
        database = command_database(args, config)
        if not config.oauth:
            raise CommandError(
                "approvals need the [oauth] table of bastion.toml (its key_dir holds the key that"
                " seals what requests hold); give --config"
            )
        with config.reading("oauth"):
            oauth = OAuthSettings.from_mapping(config.oauth)
        self.config = config
        self.facts = FactStore.open(database, role="bastion-cli")
        self._authz: Authorizer | None = None
        self._policy_version: int | None = None
        # The CLI sends no notifications: the webhooks (and their secrets) are the server's.
        table = {k: v for k, v in config.approvals.items() if k != "webhooks"}
        with config.reading("approvals"):
            settings = ApprovalSettings.from_mapping(table)
        try:
            # The suspensions as stored now: a suspended person answers nothing here either.
            suspensions = Suspensions()
            suspensions.reset(self.facts.get((SUSPENDED, None)))
            self.approvals: Approvals = approvals_from_config(
                database,
                settings,
                oauth.key_dir,
                oauth.issuer,
                self._authorizer,
                lambda: self._policy_version,
                suspensions=suspensions,
            )
        except Exception:
            self.facts.close()
            raise

    def _authorizer(self) -> Authorizer:
        """The policy in force and the stored facts, loaded once, when an answer needs them."""
        if self._authz is None:
            from bastion.server.replica import load_facts

            _seq, facts, policy = self.facts.snapshot()
            authz = Authorizer("", limits=self.config.policy_limits())
            if policy is not None:
                authz.load_policy(policy.text, source=policy.source or "policy.polar")
                self._policy_version = policy.version
            load_facts(authz, facts)
            self._authz = authz
        return self._authz

    def close(self) -> None:
        self.approvals.store.db.close()
        self.facts.close()


def _opened(work: Callable[[Deployment, argparse.Namespace], int]) -> Callable:
    """Open the deployment for the command, close it after; turn what a person can fix into one
    line on stderr and exit status 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            deployment = Deployment(args)
        except CommandError as e:
            print(f"bastion: {e}", file=sys.stderr)
            return 2
        try:
            return work(deployment, args)
        except CommandError as e:
            print(f"bastion: {e}", file=sys.stderr)
            return 2
        finally:
            deployment.close()

    return run


def _reason(value: str) -> str:
    """An answer's reason, as `bastion.names.readable` shows a name (a line break, a control,
    zero-width or right-to-left character escaped, so it can never pass for another line or
    answer), and whole: it is bounded where it is taken in (`MAX_REASON` characters)."""
    return readable(value, None)


def _found(approvals: Approvals, request_id: str) -> ApprovalRequest:
    request = approvals.get(request_id)
    if request is None:
        raise CommandError(
            f"no approval request has the id {request_id!r} (bastion approvals list)"
        )
    return request


def _line(request: ApprovalRequest) -> str:
    approvers = ",".join(map(readable, request.approvers)) or (
        f"{readable(request.confirmer)} (confirms)" if request.confirmer else "nobody"
    )
    agents = " > ".join(map(readable, request.agents)) or readable(request.client_id)
    task = f" in task {readable(request.task)}" if request.task else ""
    return "\t".join(
        (
            readable(request.id),
            request.kind,
            request.status,
            f"{readable(request.subject)} via {agents}{task}",
            f"{readable(request.server)} {readable(request.method)} {readable(request.target)}",
            f"expires {_when(request.expires_at)}",
            f"approvers {approvers}",
        )
    )


def cmd_list(deployment: Deployment, args: argparse.Namespace) -> int:
    found = deployment.approvals.listed(
        status=args.status, approver=args.approver, limit=args.limit
    )
    for request in found:
        print(json.dumps(request.summary()) if args.json else _line(request))
    return 0


def _reviewed(deployment: Deployment, request: ApprovalRequest, person: str) -> object:
    """The held result as ``person`` may see it (masked for them by the policy), if they may
    review it now."""
    _check_person(person)
    if request.kind != "review":
        raise CommandError("this request holds a call, not a result: leave out --as")
    why = deployment.approvals.may_answer(request, person)
    if why is not None:
        raise CommandError(f"{person} may not review request {request.id}: {why}")
    return deployment.approvals.review_view(request, person)


def cmd_show(deployment: Deployment, args: argparse.Namespace) -> int:
    request = _found(deployment.approvals, args.id)
    reviewed = args.person is not None
    result = _reviewed(deployment, request, args.person) if reviewed else None
    events = list(
        reversed(deployment.approvals.audit.events(request_id=request.id, limit=args.events))
    )
    if args.json:
        shown = {
            **request.summary(),
            **({"result": result} if reviewed else {}),
            "events": [
                {"at": e.at, "kind": e.kind, "user": e.subject, "agent": e.client_id, **e.detail}
                for e in events
            ],
        }
        print(json.dumps(shown, indent=2, default=str))
        return 0
    s = {
        k: readable(v) if isinstance(v, str) and k != "arguments" else v
        for k, v in request.summary().items()
    }
    print(f"{s['kind']} request {s['id']}: {s['status']}")
    print(f"  user {s['user']}, agent {s['agent']}", end="")
    print(
        f" (through {', '.join(map(readable, s['agents'][:-1]))})" if len(s["agents"]) > 1 else ""
    )
    print(f"  task {s['task']}" if s["task"] else "  task: none (the token is for no task)")
    print(f"  {s['server']} {s['method']} {s['target']} (action {s['action']})")
    print("  arguments:")
    for text in json.dumps(s["arguments"], indent=2, sort_keys=True).splitlines():
        print(f"    {text}")
    rules = ", ".join(map(readable, s["rules"])) or "-"
    print(f"  why: {rules} (policy version {s['policy_version']})")
    approvers = (
        ", ".join(map(readable, s["approvers"])) or f"{s['user']} confirms their agent's call"
    )
    print(f"  approvers: {approvers}; {s['required']} needed", end="")
    print("; self-approval forbidden" if s["self_approval_forbidden"] else "")
    if s["window_minutes"]:
        print(f"  may be approved for up to {s['window_minutes']} minutes")
    print(f"  held {_when(s['created_at'])}, expires {_when(s['expires_at'])}", end="")
    print(f", resolved {_when(s['resolved_at'])}" if s["resolved_at"] else "")
    if s["used_at"]:
        print(f"  used {_when(s['used_at'])} by decision {s['used_by']}")
    if s["withheld_fields"]:
        print(f"  released with withheld fields: {', '.join(map(readable, s['withheld_fields']))}")
    print(f"  held by decision {s['decision_id']}")
    if reviewed:
        print(f"  result, as {args.person} may see it:")
        shown_result = json.dumps(result, indent=2, sort_keys=True, default=str)
        for text in shown_result.splitlines():
            print(f"    {text}")
    print("answers:" if s["answers"] else "answers: none")
    for a in s["answers"]:
        minutes = f" for {a['minutes']} minutes" if a["minutes"] else ""
        reason = f": {_reason(a['reason'])}" if a["reason"] else ""
        who = f"{readable(a['approver'])} {a['answer']}{minutes} ({readable(a['channel'])})"
        print(f"  {_when(a['at'])} {who}{reason}")
    print("audit events:" if events else "audit events: none")
    for event in events:
        print(f"  {event_line(event)}")
    return 0


def _check_person(person: str) -> None:
    if not is_name(person):
        raise CommandError("--as names a person: a user name")


def _answer(deployment: Deployment, args: argparse.Namespace, answer: str) -> int:
    _check_person(args.person)
    withheld = tuple(getattr(args, "withhold", None) or ())
    try:
        request = deployment.approvals.answer(
            args.id,
            args.person,
            answer,
            minutes=getattr(args, "minutes", 0) or 0,
            channel="cli",
            reason=args.reason or "",
            withheld_fields=withheld,
            via=cli_actor(),
        )
    except UnknownRequest:
        raise CommandError(
            f"no approval request has the id {args.id!r} (bastion approvals list)"
        ) from None
    except UnmatchedField as e:
        raise CommandError(f"--withhold: {e}") from None
    except NotAllowed as e:
        raise CommandError(f"{args.person} may not {answer} request {args.id}: {e}") from None
    print(_line(request))
    if request.status == "pending":
        given = len(request.approvals)
        print(
            f"recorded; {given} of {request.required} approvals given, the request is still"
            " pending",
            file=sys.stderr,
        )
    return 0


def cmd_approve(deployment: Deployment, args: argparse.Namespace) -> int:
    return _answer(deployment, args, "approve")


def cmd_deny(deployment: Deployment, args: argparse.Namespace) -> int:
    return _answer(deployment, args, "deny")


def _minutes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of minutes") from None
    if value < 0:
        raise argparse.ArgumentTypeError("minutes are 0 (this call only) or more")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database", help="SQLite path or postgresql:// URL (or BASTION_DATABASE, or bastion.toml)"
    )
    parser.add_argument("--config", help="bastion.toml (its [oauth] key_dir is needed)")


def register(sub: argparse._SubParsersAction) -> None:
    approvals = sub.add_parser("approvals", help="held calls and results: list, show, answer")
    commands = approvals.add_subparsers(dest="approvals_command", required=True)

    p = commands.add_parser("list", help="requests, newest first")
    p.add_argument("--status", choices=STATUSES, help="only requests in this status")
    p.add_argument("--approver", help="only requests this person may answer")
    add_limit(p, MAX_LIST)
    p.add_argument("--json", action="store_true", help="one JSON request per line")
    _common(p)
    p.set_defaults(func=_opened(cmd_list))

    p = commands.add_parser("show", help="a request: arguments in full, answers, audit events")
    p.add_argument("id")
    p.add_argument(
        "--events", type=whole_number(MAX_LIST), default=100, help="audit events to show, at most"
    )
    p.add_argument(
        "--as",
        dest="person",
        help="a reviewer: show the held result as this person may see it (masked for them)",
    )
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(func=_opened(cmd_show))

    for name, func, help_text in (
        ("approve", cmd_approve, "approve a held call, or release a held result"),
        ("deny", cmd_deny, "deny a held call, or withhold a held result"),
    ):
        p = commands.add_parser(name, help=help_text)
        p.add_argument("id")
        p.add_argument(
            "--as", dest="person", required=True, help="the person who answers (a user name)"
        )
        p.add_argument("--reason", help="why (kept with the answer)")
        if name == "approve":
            p.add_argument(
                "--minutes",
                type=_minutes,
                default=0,
                help="approve this tool for this user and agent for N minutes (at most what the"
                " policy allows); default: this call only",
            )
            p.add_argument(
                "--withhold",
                action="append",
                metavar="PATH",
                help="a review: release the result without this field (repeat for several)",
            )
        _common(p)
        p.set_defaults(func=_opened(func))
