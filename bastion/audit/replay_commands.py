"""CLI: ``bastion audit replay``: which of the gateway's recorded decisions a candidate policy
(files, or a stored version) would decide differently, before it is pushed (`bastion.audit.replay`).
Exit 0 when none, 1 when some (so that CI can hold a push back), 2 on bad input. It writes
nothing: the database is opened read-only."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from bastion.audit.commands import _when, shown
from bastion.audit.decisions import DecisionRecords
from bastion.audit.replay import NotReplayable, Replayed, replay
from bastion.cli import since_epoch, whole_number
from bastion.db import Database
from bastion.decide import Authorizer
from bastion.facts.store import FactStore
from bastion.names import readable
from bastion.policy import LoadedPolicy, load
from bastion.policy.errors import PolicyError
from bastion.server.config import ServerConfig, command_database
from bastion.untrusted_json import MAX_INTEGER

# Records read per query: memory holds a page of them, however long the window.
PAGE = 1000


class _Refused(Exception):
    """Bad input: each line is said as ``bastion: <line>``, and the command exits 2."""

    def __init__(self, *lines: str) -> None:
        super().__init__(lines[0])
        self.lines = lines


def cmd_replay(args: argparse.Namespace) -> int:
    try:
        return _replay(args)
    except _Refused as refused:
        for line in refused.lines:
            print(f"bastion: {line}", file=sys.stderr)
        return 2


def _replay(args: argparse.Namespace) -> int:
    now = time.time()
    try:
        since = since_epoch(args.since, now)
        until = since_epoch(args.until, now, "--until") if args.until is not None else now
    except ValueError as e:
        raise _Refused(str(e)) from None
    config = ServerConfig.load(args.config)
    db = Database(command_database(args, config), role="bastion-replay", read_only=True)
    try:
        store = FactStore(db)
        authz = _candidate(args, store, config)
        _, facts, _ = store.snapshot()
        authz.facts.load([(f.fact, f.expires_at) for f in facts])  # what it cannot use: unused
        del facts
        records = DecisionRecords(db).window(since, until, args.server, PAGE)
        out = _JsonReport(sys.stdout) if args.json else _TextReport(sys.stdout)
        out.begin(since, until, _named(args))
        tally = _Tally()
        for n, record in enumerate(records):
            if args.limit is not None and n >= args.limit:
                break
            try:
                replayed = replay(authz, record)
            except NotReplayable as skipped:
                tally.not_replayable[skipped.reason] += 1
                continue
            tally.add(replayed)
            if not replayed.same:
                out.change(replayed)
        out.end(tally)
    finally:
        db.close()
    return 1 if tally.different else 0


def _named(args: argparse.Namespace) -> dict[str, Any]:
    return {"files": [str(f) for f in args.policy]} if args.policy else {"version": args.version}


def _candidate(args: argparse.Namespace, store: FactStore, config: ServerConfig) -> Authorizer:
    """An `Authorizer` with the candidate policy, checked and compiled as ``policy check`` and a
    push check it, under the deployment's limits (its evaluation budget too); no facts yet."""
    limits = config.policy_limits()
    if args.policy:
        sources = [(str(f), Path(f).read_text(encoding="utf-8")) for f in args.policy]
    else:
        version = store.policy(args.version)
        if version is None:
            raise _Refused(f"the database holds no policy version {args.version}")
        sources = [(version.source or "policy.polar", version.text)]
    authz = Authorizer("", limits=limits)
    try:
        loaded: LoadedPolicy = load(sources, limits, strict=config.policy_strict)
        authz._swap(loaded)  # compiling finds rules that can never be evaluated
    except PolicyError as err:
        raise _Refused(*(str(d) for d in err.diagnostics)) from None
    for warning in loaded.warnings:
        print(warning, file=sys.stderr)
    return authz


class _Tally:
    def __init__(self) -> None:
        self.replayed = self.same = self.different = self.over_budget = 0
        self.not_replayable: Counter[str] = Counter()

    def add(self, replayed: Replayed) -> None:
        self.replayed += 1
        if replayed.same:
            self.same += 1
        else:
            self.different += 1
        if replayed.over_budget:
            self.over_budget += 1


def _change(replayed: Replayed) -> dict[str, Any]:
    record, question = replayed.record, replayed.question
    return {
        "id": record.id,
        "at": record.at,
        "server": record.server,
        "method": record.method,
        "action": question.action,
        "target": record.target,
        "principals": list(record.principals),
        "old": {
            "result": record.result,
            "reason": record.reason,
            "rules": list(record.rules),
            "policy_version": record.policy_version,
        },
        "new": {
            "result": replayed.result,
            "reason": replayed.reason,
            "rules": list(replayed.rules),
        },
    }


class _JsonReport:
    """One JSON object, written as it goes: each change once found, the counts at the end."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.first = True

    def begin(self, since: float, until: float, policy: dict[str, Any]) -> None:
        head = json.dumps({"since": since, "until": until, "policy": policy})
        self.out.write(head[:-1] + ', "changed": [')

    def change(self, replayed: Replayed) -> None:
        self.out.write(("\n  " if self.first else ",\n  ") + json.dumps(_change(replayed)))
        self.first = False

    def end(self, tally: _Tally) -> None:
        counts = {
            "replayed": tally.replayed,
            "same": tally.same,
            "different": tally.different,
            "over_budget": tally.over_budget,
            "not_replayable": dict(sorted(tally.not_replayable.items())),
        }
        self.out.write("\n], " + json.dumps(counts)[1:] + "\n")


class _TextReport:
    """A line per change as it is found (with the rules that decide it now), then the counts."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def begin(self, since: float, until: float, policy: dict[str, Any]) -> None:
        self.window = f"{_when(since)} to {_when(until)}"

    def change(self, replayed: Replayed) -> None:
        record = replayed.record
        who = " ".join(map(readable, record.principals))
        write: Callable[[str], Any] = self.out.write
        write(
            f"{shown(record.result)} -> {shown(replayed.result)}  {_when(record.at)}"
            f" {shown(record.method)} {replayed.question.action} {readable(record.target)}"
            f" by {who} id={record.id}\n"
        )
        if replayed.reason:
            write(f"    now: {shown(replayed.reason)}\n")
        for rule in replayed.rules:
            write(f"    rule: {readable(rule)}\n")

    def end(self, tally: _Tally) -> None:
        line = (
            f"replayed {tally.replayed} decisions of {self.window}: {tally.same} the same,"
            f" {tally.different} decided differently"
        )
        if tally.over_budget:
            line += f", {tally.over_budget} over the evaluation budget (refused)"
        self.out.write(line + "\n")
        skipped = tally.not_replayable
        if skipped:
            each = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items()))
            self.out.write(f"not replayable: {sum(skipped.values())} ({each})\n")


def add_replay(commands: argparse._SubParsersAction) -> None:
    """Add ``replay`` to the ``bastion audit`` commands (`bastion.audit.commands`)."""
    replay_ = commands.add_parser(
        "replay",
        help="decide the recorded decisions again with a candidate policy and list those it"
        " decides differently; exit 1 if any (before bastion policy push)",
    )
    candidate = replay_.add_mutually_exclusive_group(required=True)
    candidate.add_argument(
        "--policy",
        nargs="+",
        metavar="FILE",
        help="the candidate policy's files (checked as bastion policy check checks them)",
    )
    candidate.add_argument(
        "--version",
        type=whole_number(MAX_INTEGER),
        metavar="N",
        help="a policy version the database holds (bastion policy versions)",
    )
    replay_.add_argument(
        "--since", default="24h", help="a duration (30m, 24h, 7d) or ISO 8601 time; default 24h"
    )
    replay_.add_argument(
        "--until", help="a duration back from now or ISO 8601 time (not included); default now"
    )
    replay_.add_argument("--server", help="only the decisions on this upstream server")
    replay_.add_argument(
        "--limit",
        type=whole_number(MAX_INTEGER),
        metavar="N",
        help="the first N records of the window at most (default: all)",
    )
    replay_.add_argument("--json", action="store_true", help="the report as one JSON object")
    replay_.add_argument(
        "--database", help="SQLite path or postgresql:// URL (or BASTION_DATABASE)"
    )
    replay_.add_argument("--config", help="bastion.toml to read the database and limits from")
    replay_.set_defaults(func=cmd_replay)
