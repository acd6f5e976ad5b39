"""CLI: ``bastion audit replay``: which of the gateway's recorded decisions a candidate policy
(files, or a stored version) would decide differently, before it is pushed (`bastion.audit.replay`),
and why: the candidate, or the facts changed since (`cause_of`). Exit 0 when none is the
candidate's (or of unknown cause), 1 when some are (so that CI can hold a push back), 2 on bad
input. It writes nothing: the database is opened read-only."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from bastion.audit.commands import _when, shown
from bastion.audit.decisions import DecisionRecord, DecisionRecords
from bastion.audit.replay import (
    UNKNOWN_CAUSE,
    Cause,
    NotReplayable,
    Replayed,
    cause_of,
    replay,
)
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
    with contextlib.ExitStack() as held:
        held.callback(db.close)
        store = FactStore(db)
        authz, text = _candidate(args, store, config)
        _, facts, _ = store.snapshot()
        pairs = [(f.fact, f.expires_at) for f in facts]
        del facts
        authz.facts.load(pairs)  # what it cannot use: unused
        then = _PoliciesOfTheTime(store, config, pairs, authz, text)
        records = DecisionRecords(db).window(since, until, args.server, PAGE)
        # The text report keeps the facts' differences aside until the end, in a file.
        apart = held.enter_context(tempfile.TemporaryFile("w+", encoding="utf-8"))
        out = _JsonReport(sys.stdout) if args.json else _TextReport(sys.stdout, apart)
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
            cause = None if replayed.same else then.cause(replayed)
            tally.add(replayed, cause)
            if cause is not None:
                out.change(replayed, cause)
        out.end(tally)
    return 1 if tally.candidates else 0


def _named(args: argparse.Namespace) -> dict[str, Any]:
    return {"files": [str(f) for f in args.policy]} if args.policy else {"version": args.version}


def _candidate(
    args: argparse.Namespace, store: FactStore, config: ServerConfig
) -> tuple[Authorizer, str | None]:
    """An `Authorizer` with the candidate policy, checked and compiled as ``policy check`` and a
    push check it, under the deployment's limits (its evaluation budget too); no facts yet. With
    its text, when it is one file or a version (a stored version is one text)."""
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
    return authz, sources[0][1] if len(sources) == 1 else None


class _PoliciesOfTheTime:
    """The policy in force when each record was made (its ``policy_version``), to tell what the
    candidate changes from what the facts did (`cause_of`): each version read, checked and
    compiled once, the first time a record of it is decided differently, as a replica loads a
    stored version (under the same limits and budget as the candidate), over the same facts the
    candidate decides on. The candidate itself where it is that version's text."""

    def __init__(
        self,
        store: FactStore,
        config: ServerConfig,
        facts: list[tuple],
        candidate: Authorizer,
        text: str | None,
    ) -> None:
        self.store = store
        self.limits = config.policy_limits()
        self.facts = facts
        self.candidate = candidate
        self.text = text
        self.versions: dict[int, Authorizer | str] = {}  # an `Authorizer`, or why there is none

    def cause(self, replayed: Replayed) -> Cause:
        version = replayed.record.policy_version
        if type(version) is not int:
            return Cause("unknown", why="no_version")
        if version not in self.versions:
            self.versions[version] = self._load(version)
        then = self.versions[version]
        return Cause("unknown", why=then) if isinstance(then, str) else cause_of(replayed, then)

    def _load(self, version: int) -> Authorizer | str:
        stored = self.store.policy(version)
        if stored is None:
            return "version_not_held"
        if stored.text == self.text:
            return self.candidate
        authz = Authorizer("", limits=self.limits)
        try:
            authz.load_policy(stored.text, source=stored.source or "policy.polar")
        except PolicyError as err:
            first = str(err.diagnostics[0]) if err.diagnostics else str(err)
            print(
                f"policy version {version} does not load here ({first}): what its records are"
                " decided differently is of unknown cause",
                file=sys.stderr,
            )
            return "version_not_loaded"
        authz.facts.load(self.facts)
        return authz


class _Tally:
    def __init__(self) -> None:
        self.replayed = self.same = self.different = self.over_budget = 0
        self.not_replayable: Counter[str] = Counter()
        self.causes: Counter[str] = Counter({"policy": 0, "facts": 0, "unknown": 0})

    def add(self, replayed: Replayed, cause: Cause | None) -> None:
        self.replayed += 1
        if cause is None:
            self.same += 1
        else:
            self.different += 1
            self.causes[cause.name] += 1
        if replayed.over_budget:
            self.over_budget += 1

    @property
    def candidates(self) -> int:
        """The differences the push makes, as far as can be told: those of unknown cause too."""
        return self.causes["policy"] + self.causes["unknown"]


def _unknown(cause: Cause, record: DecisionRecord) -> str:
    return UNKNOWN_CAUSE[cause.why or ""].format(version=record.policy_version)


def _change(replayed: Replayed, cause: Cause) -> dict[str, Any]:
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
        "cause": cause.name,
        "policy_of_the_time": {
            "result": cause.result,
            "reason": cause.reason,
            "unknown": cause.why,
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

    def change(self, replayed: Replayed, cause: Cause) -> None:
        self.out.write(("\n  " if self.first else ",\n  ") + json.dumps(_change(replayed, cause)))
        self.first = False

    def end(self, tally: _Tally) -> None:
        counts = {
            "replayed": tally.replayed,
            "same": tally.same,
            "different": tally.different,
            "different_by_cause": dict(tally.causes),
            "over_budget": tally.over_budget,
            "not_replayable": dict(sorted(tally.not_replayable.items())),
        }
        self.out.write("\n], " + json.dumps(counts)[1:] + "\n")


class _TextReport:
    """A line per change as it is found (with the rules that decide it now, and its cause),
    then those the facts changed (kept aside in a temporary file, however many), then the
    counts."""

    def __init__(self, out: TextIO, apart: TextIO) -> None:
        self.out = out
        self.apart = apart

    def begin(self, since: float, until: float, policy: dict[str, Any]) -> None:
        self.window = f"{_when(since)} to {_when(until)}"

    def change(self, replayed: Replayed, cause: Cause) -> None:
        record = replayed.record
        who = " ".join(map(readable, record.principals))
        write: Callable[[str], Any] = (self.apart if cause.name == "facts" else self.out).write
        write(
            f"{shown(record.result)} -> {shown(replayed.result)}  {_when(record.at)}"
            f" {shown(record.method)} {replayed.question.action} {readable(record.target)}"
            f" by {who} id={record.id}\n"
        )
        if replayed.reason:
            write(f"    now: {shown(replayed.reason)}\n")
        for rule in replayed.rules:
            write(f"    rule: {readable(rule)}\n")
        if cause.name == "policy":
            then = f"{shown(cause.result)}" + (f" ({shown(cause.reason)})" if cause.reason else "")
            write(
                f"    cause: the candidate (policy version {record.policy_version}, in force"
                f" then, decides it {then} today)\n"
            )
        elif cause.name == "unknown":
            write(f"    cause unknown: {_unknown(cause, record)}; counted as the candidate's\n")

    def end(self, tally: _Tally) -> None:
        if tally.causes["facts"]:
            self.out.write(
                "the facts changed since: the policy of the time decides it so today too"
                f" ({tally.causes['facts']}, not counted in the exit status):\n"
            )
            self.apart.seek(0)
            while chunk := self.apart.read(1 << 16):
                self.out.write(chunk)
        line = (
            f"replayed {tally.replayed} decisions of {self.window}: {tally.same} the same,"
            f" {tally.different} decided differently"
        )
        if tally.different:
            causes = tally.causes
            line += (
                f": {causes['policy']} by the candidate, {causes['unknown']} of unknown cause,"
                f" {causes['facts']} by the facts changed since"
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
        " decides differently, each with its cause (the candidate, or the facts changed since);"
        " exit 1 if any is the candidate's (before bastion policy push)",
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
