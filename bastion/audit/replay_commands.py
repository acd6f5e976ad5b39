"""CLI: ``bastion audit replay``: which of the gateway's recorded decisions, and of the decision
service's stored checks (``decision_log = "database"``), pushing a candidate
policy (files, or a stored version) would change, before it is pushed (`bastion.audit.replay`):
those it decides otherwise than the policy in force today; and those decided otherwise than
recorded that the push does not change, and why (the facts or an earlier push, `cause_of`).
Exit 0 when the push changes none, 1 when it changes some or cannot tell (so that CI can hold a
push back), 2 on bad input. It writes nothing: the database is opened read-only."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from bastion.audit import decision_log
from bastion.audit.commands import _when, shown
from bastion.audit.decisions import DecisionRecords
from bastion.audit.replay import (
    UNKNOWN_CAUSE,
    UNKNOWN_EFFECT,
    Cause,
    InForce,
    LoggedDecision,
    NotReplayable,
    Recorded,
    Replayed,
    cause_of,
    explained,
    granted,
    in_force,
    replay,
)
from bastion.cli import since_epoch, whole_number
from bastion.db import Database
from bastion.decide import Authorizer
from bastion.facts.store import FactStore, PolicyVersion
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
        _, facts, current = store.snapshot()  # the policy in force as of the facts read
        pairs = [(f.fact, f.expires_at) for f in facts]
        del facts
        authz.facts.load(pairs)  # what it cannot use: unused
        policies = _StoredPolicies(store, config, pairs, authz, text, current)
        records = _recorded(db, since, until, args.server)
        # The text report keeps the differences the push does not make aside until the end.
        apart = held.enter_context(tempfile.TemporaryFile("w+", encoding="utf-8"))
        out = _JsonReport(sys.stdout) if args.json else _TextReport(sys.stdout, apart)
        out.begin(since, until, _named(args), policies.version)
        tally = _Tally()
        for n, record in enumerate(records):
            if args.limit is not None and n >= args.limit:
                break
            try:
                replayed = replay(authz, record)
            except NotReplayable as skipped:
                tally.not_replayable[skipped.reason] += 1
                continue
            now = policies.in_force(replayed)
            pushed = now.changed_by(replayed)
            if pushed is None:
                cause: Cause | None = Cause("unknown")
            elif pushed:
                cause = Cause("policy")
                replayed = explained(authz, replayed)  # the rules, when decided as recorded
            else:
                cause = None if replayed.same else policies.cause(replayed)
            tally.add(replayed, pushed, cause)
            if cause is not None:
                out.change(replayed, now, pushed, cause)
        out.end(tally)
    return 1 if tally.by_push else 0


def _recorded(db: Database, since: float, until: float, server: str | None) -> Iterator[Recorded]:
    """The gateway's records of the window, then the decision service's stored decisions
    (none on one upstream ``server``: the decision service has none), oldest first each."""
    yield from DecisionRecords(db).window(since, until, server, PAGE)
    if server is None:
        for fields in decision_log.window(db, since, until, PAGE):
            yield LoggedDecision.of(fields)


def _source(record: Recorded) -> str:
    """Which table a record is read from: the gateway's, or the decision service's."""
    return "decision_log" if isinstance(record, LoggedDecision) else "gateway"


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
        # Compiling finds rules that can never be evaluated; the warnings are a push's.
        warnings = authz._swap(loaded)
    except PolicyError as err:
        raise _Refused(*(str(d) for d in err.diagnostics)) from None
    for warning in warnings:
        print(warning, file=sys.stderr)
    return authz, sources[0][1] if len(sources) == 1 else None


class _StoredPolicies:
    """The policy in force today (the database's latest version, read with the facts), against
    which the candidate's answers are compared, and the policy in force when each record was
    made (its ``policy_version``), to tell why one the push does not change is decided otherwise
    than recorded (`cause_of`). Each version read, checked and compiled once (the one in force
    at the start, the others the first time a record of theirs needs it), as a replica loads a
    stored version, under the same limits and budget as the candidate, over the same facts the
    candidate decides on; the candidate itself where it is that version's text. No policy in
    force: the empty one, which denies everything, as a replica with none does."""

    def __init__(
        self,
        store: FactStore,
        config: ServerConfig,
        facts: list[tuple],
        candidate: Authorizer,
        text: str | None,
        current: PolicyVersion | None,
    ) -> None:
        self.store = store
        self.limits = config.policy_limits()
        self.facts = facts
        self.candidate = candidate
        self.text = text
        self.versions: dict[int, Authorizer | str] = {}  # an `Authorizer`, or why there is none
        self.version = current.version if current is not None else None
        if current is None:
            self.now = Authorizer("", limits=self.limits)
            self.now.facts.load(facts)
            return
        try:
            self.now = self._load(current)
        except PolicyError as err:
            raise _Refused(
                f"policy version {current.version}, in force, does not load here"
                f" ({_first(err)}): what the push would change cannot be told; compare the"
                " policy_* settings with the servers'"
            ) from None
        self.versions[current.version] = self.now

    def in_force(self, replayed: Replayed) -> InForce:
        if self.now is self.candidate:
            return InForce(replayed.result, replayed.reason, scopes=replayed.scopes)
        return in_force(replayed, self.now)

    def cause(self, replayed: Replayed) -> Cause:
        version = replayed.record.policy_version
        if type(version) is not int:
            return Cause("unknown", why="no_version")
        if version not in self.versions:
            self.versions[version] = self._of_the_time(version)
        then = self.versions[version]
        return Cause("unknown", why=then) if isinstance(then, str) else cause_of(replayed, then)

    def _of_the_time(self, version: int) -> Authorizer | str:
        stored = self.store.policy(version)
        if stored is None:
            return "version_not_held"
        try:
            return self._load(stored)
        except PolicyError as err:
            print(
                f"policy version {version} does not load here ({_first(err)}): what its"
                " records are decided differently is of unknown cause",
                file=sys.stderr,
            )
            return "version_not_loaded"

    def _load(self, stored: PolicyVersion) -> Authorizer:
        """``stored`` checked and compiled with the facts, or `PolicyError`."""
        if stored.text == self.text:
            return self.candidate
        authz = Authorizer("", limits=self.limits)
        authz.load_policy(stored.text, source=stored.source or "policy.polar")
        authz.facts.load(self.facts)
        return authz


def _first(err: PolicyError) -> str:
    return str(err.diagnostics[0]) if err.diagnostics else str(err)


class _Tally:
    def __init__(self) -> None:
        self.replayed = self.same = self.different = self.over_budget = 0
        # The push's: those it changes (some decided as recorded), those of unknown effect.
        self.changed_by_push = self.as_recorded = self.push_effect_unknown = 0
        self.not_replayable: Counter[str] = Counter()
        # The records decided otherwise than recorded, by cause; and apart, the causes of those
        # the push does not change.
        self.causes: Counter[str] = Counter(dict.fromkeys(_CAUSES, 0))
        self.apart: Counter[str] = Counter()

    def add(self, replayed: Replayed, pushed: bool | None, cause: Cause | None) -> None:
        self.replayed += 1
        if pushed is None:
            self.push_effect_unknown += 1
        elif pushed:
            self.changed_by_push += 1
            self.as_recorded += replayed.same
        if replayed.same:
            self.same += 1
        else:
            self.different += 1
        if cause is not None and not replayed.same:
            self.causes[cause.name] += 1
        if cause is not None and pushed is False:
            self.apart[cause.name] += 1
        if replayed.over_budget:
            self.over_budget += 1

    @property
    def by_push(self) -> int:
        """The decisions the push changes, as far as can be told: those of unknown effect too."""
        return self.changed_by_push + self.push_effect_unknown


_CAUSES = ("policy", "earlier_push", "facts", "unknown")


def _unknown(cause: Cause, record: Recorded) -> str:
    return UNKNOWN_CAUSE[cause.why or ""].format(version=record.policy_version)


def _listed(scopes: tuple[str, ...]) -> str:
    return " ".join(map(shown, scopes)) if scopes else "(none)"


def _answer(result: str | None, reason: str | None) -> str:
    return shown(result) + (f" ({shown(reason)})" if reason else "")


def _change(replayed: Replayed, now: InForce, pushed: bool | None, cause: Cause) -> dict[str, Any]:
    record, question = replayed.record, replayed.question
    change: dict[str, Any] = {
        "id": record.id,
        "source": _source(record),
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
        "in_force": {"result": now.result, "reason": now.reason, "unknown": now.why},
        "changed_by_push": pushed,
        "cause": cause.name,
        # Asked only of what the push does not change: why it is decided otherwise than recorded.
        "policy_of_the_time": None
        if pushed is not False
        else {"result": cause.result, "reason": cause.reason, "unknown": cause.why},
    }
    if isinstance(record, LoggedDecision):  # the API it was asked through, and replayed as
        change["api"] = record.api
    then = granted(record)
    if then is not None:  # a token exchange's: the scopes that passed, and pass now
        answers = (change["old"], change["new"], change["in_force"], change["policy_of_the_time"])
        scopes = (then, replayed.scopes, now.scopes, cause.scopes)
        for answer, passed in zip(answers, scopes, strict=True):
            if answer is not None:
                answer["scopes"] = list(passed) if passed is not None else None
    return change


class _JsonReport:
    """One JSON object, written as it goes: each change once found, the counts at the end."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.first = True

    def begin(
        self, since: float, until: float, policy: dict[str, Any], in_force: int | None
    ) -> None:
        head = json.dumps(
            {"since": since, "until": until, "policy": policy, "in_force_version": in_force}
        )
        self.out.write(head[:-1] + ', "changed": [')

    def change(self, replayed: Replayed, now: InForce, pushed: bool | None, cause: Cause) -> None:
        entry = json.dumps(_change(replayed, now, pushed, cause))
        self.out.write(("\n  " if self.first else ",\n  ") + entry)
        self.first = False

    def end(self, tally: _Tally) -> None:
        counts = {
            "replayed": tally.replayed,
            "same": tally.same,
            "different": tally.different,
            "different_by_cause": dict(tally.causes),
            "changed_by_push": tally.changed_by_push,
            "push_effect_unknown": tally.push_effect_unknown,
            "over_budget": tally.over_budget,
            "not_replayable": dict(sorted(tally.not_replayable.items())),
        }
        self.out.write("\n], " + json.dumps(counts)[1:] + "\n")


class _TextReport:
    """A line per decision the push changes (or may) as it is found, with the rules that decide
    it now and the answer of the policy in force; then those decided otherwise than recorded
    that it does not change, with their cause (kept aside in a temporary file, however many);
    then the counts."""

    def __init__(self, out: TextIO, apart: TextIO) -> None:
        self.out = out
        self.apart = apart

    def begin(
        self, since: float, until: float, policy: dict[str, Any], in_force: int | None
    ) -> None:
        self.window = f"{_when(since)} to {_when(until)}"
        self.in_force = (
            f"policy version {in_force}"
            if in_force is not None
            else "the empty policy (the database holds none)"
        )

    def change(self, replayed: Replayed, now: InForce, pushed: bool | None, cause: Cause) -> None:
        record = replayed.record
        who = " ".join(map(readable, record.principals))
        write: Callable[[str], Any] = (self.apart if pushed is False else self.out).write
        source = ""
        if isinstance(record, LoggedDecision):
            source = f"decision_log {shown(record.api)} " if record.api else "decision_log "
        write(
            f"{shown(record.result)} -> {shown(replayed.result)}  {_when(record.at)}"
            f" {source}{shown(record.method)} {replayed.question.action} {readable(record.target)}"
            f" by {who} id={record.id}\n"
        )
        if replayed.reason:
            write(f"    now: {shown(replayed.reason)}\n")
        then = granted(record)
        if replayed.scopes is not None and then is not None and (then or replayed.scopes):
            write(f"    scopes: {_listed(then)} -> {_listed(replayed.scopes)}\n")
        for rule in replayed.rules:
            write(f"    rule: {readable(rule)}\n")
        version = record.policy_version
        if pushed:
            write(
                f"    cause: the push ({self.in_force}, in force, decides it"
                f" {_answer(now.result, now.reason)})\n"
            )
        elif pushed is None:
            effect = UNKNOWN_EFFECT[now.why or ""].format(policy=self.in_force)
            write(f"    effect unknown: {effect}; counted as the push's\n")
        elif cause.name == "facts":
            write(
                f"    cause: the facts changed since (policy version {version}, in force then,"
                " decides it so today too)\n"
            )
        elif cause.name == "earlier_push":
            write(
                f"    cause: an earlier push (policy version {version}, in force then, decides it"
                f" {_answer(cause.result, cause.reason)} today)\n"
            )
        else:
            write(f"    cause unknown: {_unknown(cause, record)}\n")

    def end(self, tally: _Tally) -> None:
        apart = tally.apart
        if apart:
            self.out.write(
                f"not the push's: {self.in_force}, in force, decides these so too"
                f" ({apart.total()}, not counted in the exit status):\n"
            )
            self.apart.seek(0)
            while chunk := self.apart.read(1 << 16):
                self.out.write(chunk)
        line = (
            f"replayed {tally.replayed} decisions of {self.window}: {tally.same} the same,"
            f" {tally.different} decided differently; the push changes {tally.changed_by_push}"
        )
        if tally.as_recorded:
            line += f" ({tally.as_recorded} of them decided as recorded)"
        if tally.push_effect_unknown:
            line += f", {tally.push_effect_unknown} of unknown effect (counted as changed)"
        if apart:
            line += (
                f"; not the push's: {apart['facts']} by the facts changed since,"
                f" {apart['earlier_push']} by an earlier push, {apart['unknown']} of unknown cause"
            )
        if tally.over_budget:
            line += f"; {tally.over_budget} over the evaluation budget (refused)"
        self.out.write(line + "\n")
        skipped = tally.not_replayable
        if skipped:
            each = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items()))
            self.out.write(f"not replayable: {sum(skipped.values())} ({each})\n")


def add_replay(commands: argparse._SubParsersAction) -> None:
    """Add ``replay`` to the ``bastion audit`` commands (`bastion.audit.commands`)."""
    replay_ = commands.add_parser(
        "replay",
        help="decide the recorded decisions again with a candidate policy and with the policy in"
        " force, and list those the push of the candidate changes, and those decided otherwise"
        " than recorded, each with its cause (the push, the facts changed since, an earlier"
        " push); exit 1 if the push changes any (before bastion policy push)",
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
