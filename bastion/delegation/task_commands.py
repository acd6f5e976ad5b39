"""CLI: ``bastion tasks open|list|show|end``, just-in-time tasks on the deployment's database
(docs/delegation.md).

Like the other admin commands it works on the database directly (``--database``, or the one in
bastion.toml): a task's facts go through the change log, so every running replica applies them,
and ending a task revokes its grants where every gateway hears of it. A task's facts are checked
against the policy in force, as ``/v1/tasks`` checks them. Whoever can run this command can read
the database: every task is theirs to see and end.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime

from bastion.audit import AuditLog
from bastion.audit.actor import cli_actor
from bastion.cli import add_limit
from bastion.db import Database
from bastion.decide import Authorizer
from bastion.delegation.tasks import MAX_LIST, STATUSES, Task, TaskError, Tasks
from bastion.facts.model import FactError, check_fact, fact_to_json
from bastion.facts.store import FactStore
from bastion.oauth.store import OAuthStore
from bastion.policy.errors import PolicyError
from bastion.server.config import ServerConfig, command_database


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fact(text: str) -> dict:
    """A fact in Polar text, e.g. ``has_role(Agent{"coder"}, "reader", Folder{"docs"})``, in its
    JSON form."""
    from bastion.policy.parser import parse_fact

    try:
        return fact_to_json(check_fact(parse_fact(text)))
    except (PolicyError, FactError) as e:
        raise TaskError(f"{text!r} is not a fact: {e}") from None


def _validator(store: FactStore, config: ServerConfig) -> Callable[[tuple], tuple]:
    """Checks facts against the policy in the store, as the server does."""
    authz = Authorizer("", limits=config.policy_limits())
    policy = store.policy()
    if policy is not None:
        authz.load_policy(policy.text, source=policy.source or "policy.polar")
    return authz.facts.validate


def _line(task: Task, now: float) -> str:
    return "\t".join(
        json.dumps(v) if not v.isprintable() else v
        for v in (
            task.id,
            task.status(now),
            task.user,
            task.agent,
            f"until {_when(task.expires_at)}",
            task.purpose,
        )
    )


def cmd_open(tasks: Tasks, args: argparse.Namespace) -> int:
    expires_at = tasks.clock() + args.expires_in
    task = tasks.open(
        args.user, args.agent, args.purpose, expires_at, [_fact(f) for f in args.fact], cli_actor()
    )
    print(json.dumps(task.to_json(tasks.clock())) if args.json else task.id)
    return 0


def cmd_list(tasks: Tasks, args: argparse.Namespace) -> int:
    now = tasks.clock()
    for task in tasks.list(status=args.status, limit=args.limit):
        print(json.dumps(task.to_json(now)) if args.json else _line(task, now))
    return 0


def _found(tasks: Tasks, task_id: str) -> Task:
    task = tasks.get(task_id)
    if task is None:
        raise TaskError(f"no task has the id {task_id!r} (bastion tasks list)")
    return task


def cmd_show(tasks: Tasks, args: argparse.Namespace) -> int:
    task = _found(tasks, args.task_id)
    print(json.dumps(task.to_json(tasks.clock()), indent=2))
    return 0


def cmd_end(tasks: Tasks, args: argparse.Namespace) -> int:
    _found(tasks, args.task_id)
    task, ended = tasks.end(args.task_id, cli_actor(), args.reason)
    if ended:
        print(f"ended {task.id}: its facts are deleted and its grants revoked")
    else:
        print(f"{task.id} was {task.status(tasks.clock())} already; nothing more to do")
    return 0


def _opened(work: Callable[[Tasks, argparse.Namespace], int]) -> Callable:
    def run(args: argparse.Namespace) -> int:
        config = ServerConfig.load(args.config)
        settings = config.task_settings()
        db = Database(command_database(args, config), role="bastion-cli")
        try:
            facts = FactStore(db)
            tasks = Tasks(facts, OAuthStore(db), AuditLog(db), settings, _validator(facts, config))
            return work(tasks, args)
        except TaskError as e:
            print(f"bastion: {e}", file=sys.stderr)
            return 2
        finally:
            db.close()

    return run


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("give a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("give a positive number of seconds")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("tasks", help="just-in-time tasks: open, list, show, end")
    commands = parser.add_subparsers(dest="tasks_command", required=True)
    for name, func, help_text in (
        ("open", cmd_open, "let an agent act for a user, with these grants, until an expiry"),
        ("list", cmd_list, "the newest tasks first"),
        ("show", cmd_show, "one task, as JSON"),
        ("end", cmd_end, "end a task: delete its facts, revoke its grants"),
    ):
        p = commands.add_parser(name, help=help_text)
        if name == "open":
            p.add_argument("--user", required=True, help="the user the agent acts for")
            p.add_argument("--agent", required=True, help="the agent's OAuth client id")
            p.add_argument("--purpose", required=True, help="what the task is for")
            p.add_argument(
                "--expires-in",
                type=_seconds,
                required=True,
                help="seconds until it ends by itself (at most [tasks].max_seconds)",
            )
            p.add_argument(
                "--fact",
                action="append",
                required=True,
                help='a grant, naming the agent first: has_role(Agent{"id"}, "reader",'
                ' Folder{"docs"}) (repeat)',
            )
            p.add_argument("--json", action="store_true", help="print the task as JSON")
        if name in ("show", "end"):
            p.add_argument("task_id", help="the task's id (task_...)")
        if name == "end":
            p.add_argument("--reason", default="ended", help="why, for the audit trail")
        if name == "list":
            p.add_argument("--status", choices=list(STATUSES), help="only tasks in this status")
            add_limit(p, MAX_LIST)
            p.add_argument("--json", action="store_true", help="one JSON task per line")
        p.add_argument(
            "--database",
            help="SQLite path or postgresql:// URL (or BASTION_DATABASE, or bastion.toml)",
        )
        p.add_argument("--config", help="bastion.toml")
        p.set_defaults(func=_opened(func))
