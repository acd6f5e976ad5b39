"""CLI: ``bastion audit tail`` prints the gateway's decision records, and follows new ones;
``bastion audit show`` prints one, found by its id, with the policy version it was decided under
and the events of its approval or review; ``bastion audit events`` prints audit events
(approvals, tokens, grants...); ``bastion audit prune`` deletes the audit trail older than the
retention; ``bastion audit verify`` walks its hash chains (`bastion.audit.chain`) and says where
one was tampered with, and checks exported copies (``bastion audit export``,
`bastion.audit.export_commands`); ``bastion audit replay`` (`bastion.audit.replay_commands`) decides the
recorded decisions again with a candidate policy."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from bastion.audit import decision_log, decisions, log
from bastion.audit.actor import cli_actor
from bastion.audit.chain import GENESIS, Checkpoint, Verdict, verify
from bastion.audit.decisions import DecisionRecord, DecisionRecords
from bastion.audit.log import AuditEvent, AuditLog
from bastion.audit.retention import prune, pruned_text
from bastion.cli import whole_number
from bastion.db import Database
from bastion.facts.store import FactStore
from bastion.names import readable
from bastion.server.config import ConfigError, ServerConfig, command_database
from bastion.untrusted_json import MAX_INTEGER

if TYPE_CHECKING:
    from bastion.audit.export import Comparison, Copy


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


def _line(record: DecisionRecord) -> str:
    at = _when(record.at)
    who = " ".join(map(readable, record.principals))
    extra = []
    if record.obligations.get("masks"):
        extra.append(f"masked={record.obligations.get('masked_fields', 0)}")
    if record.reason and record.result != "allow":
        extra.append(f"reason={shown(record.reason)}")
    if record.rules:
        extra.append(f"rules={len(record.rules)}")
    if record.unexplained:
        extra.append("unexplained")
    if record.recovered:  # written from the journal of a process that died: outcome unknown
        extra.append("recovered")
    approval = record.obligations.get("approval")
    if isinstance(approval, dict) and approval.get("id"):
        # The request that held this call, or whose approval (or released result) it used:
        # bastion approvals show <id>.
        kind = "review" if approval.get("kind") == "review" else "approval"
        status = f":{shown(approval['status'])}" if approval.get("status") else ""
        extra.append(f"{kind}={shown(approval['id'])}{status}")
    # What it was decided on (the policy version and the facts' change-log sequence), and the
    # caller's grant, task and session: absent from records written before they were kept.
    if record.policy_version is not None:
        extra.append(f"policy={record.policy_version}")
    if record.sequence is not None:
        extra.append(f"sequence={record.sequence}")
    for name in ("grant_id", "task", "session"):
        if value := getattr(record, name):
            extra.append(f"{name.removesuffix('_id')}={shown(value)}")
    return (
        f"{at} {shown(record.result):<12} {shown(record.method):<15} {readable(record.target)}"
        f" by {who}"
        f" {' '.join(extra)} {record.latency_us}us id={record.id}"
    ).rstrip()


def shown(value: object) -> str:
    """A value for a terminal line, escaped once (`recorded`), in double quotes if it holds a
    space; anything else than text as JSON whose strings are escaped the same way. So what a
    caller wrote can never pass for another line or another field, nor for another name."""
    if isinstance(value, str):
        text = recorded(value)
        return text if text and " " not in text else f'"{text}"'
    return _json(value)


def recorded(text: str) -> str:
    """Recorded text as `bastion.names.readable` shows it, with a double quote escaped too (a
    quoted value ends at its own quote). A record holds text others wrote as it came, or as
    ``readable`` showed it where it was taken in (an upstream's refusal, a tool's changed
    description): either is shown escaped once (``doubles=False``), never its raw control,
    line break or right-to-left character, nor an escape escaped again."""
    return readable(text, shows=_unquoted, doubles=False)


def _unquoted(char: str) -> bool:
    return char != '"'


def _json(value: object) -> str:
    if isinstance(value, str):
        return f'"{recorded(value)}"'
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_json(str(k))}: {_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(map(_json, value)) + "]"
    if value is None or isinstance(value, bool | int | float):
        return json.dumps(value)
    return _json(str(value))


def event_line(event: AuditEvent) -> str:
    """One audit event on one line: when, what, who, then its detail as key=value."""
    parts = [_when(event.at), shown(event.kind)]
    if event.subject:
        parts.append(f"user={shown(event.subject)}")
    if event.client_id:
        parts.append(f"agent={shown(event.client_id)}")
    for key, value in sorted(event.detail.items()):
        if value in ("", None, [], {}):
            continue
        parts.append(f"{shown(key)}={shown(value)}")
    return " ".join(parts)


def _database(args: argparse.Namespace) -> str:
    return command_database(args)


def cmd_tail(args: argparse.Namespace) -> int:
    db = Database(_database(args))
    records = DecisionRecords(db)
    # The newest `lines` records start after the (lines+1)-th newest one.
    start = records.last_seq(back=args.lines) if args.lines > 0 else records.last_seq()
    show = (lambda r: json.dumps(r.to_dict(), default=str)) if args.json else _line
    try:
        batch = records.after(start, limit=args.lines) if args.lines > 0 else []
        for _, record in batch:
            print(show(record), flush=True)
        if not args.follow:
            return 0
        seq = batch[-1][0] if batch else start
        for _, record in records.follow(seq):
            print(show(record), flush=True)
    except KeyboardInterrupt:
        return 0
    finally:
        db.close()
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """One decision record, whole, as an auditor needs it months later: beside it the policy
    version it was decided under (its text, not today's: the rules it names are read against
    it) and the events of the approval or review it went through (who answered, and how). A
    decision service's id (`_service_id`) that is no gateway record is looked for in its stored
    decisions (``decision_log = "database"``, `_show_service`)."""
    decision_id = args.decision_id
    db = Database(_database(args))
    try:
        record = DecisionRecords(db).get(decision_id)
        if record is None and _service_id(decision_id):
            return _show_service(db, decision_id)
        if record is None:
            print(f"bastion: {_not_recorded(decision_id)}", file=sys.stderr)
            return 2
        policy = _policy_of(db, record.policy_version)
        approval = record.obligations.get("approval")
        events = []
        if isinstance(approval, dict) and isinstance(approval.get("id"), str):
            found = AuditLog(db).events(request_id=approval["id"])
            events = [dataclasses.asdict(event) for event in reversed(found)]
    finally:
        db.close()
    shown = {"record": record.to_dict(), "policy": policy, "events": events}
    print(json.dumps(shown, indent=2, default=str))
    return 0


def _show_service(db: Database, decision_id: str) -> int:
    """``bastion audit show`` of a decision of the decision service (`/v1`, AuthZEN, Oso
    Cloud's API) stored in ``decision_log``: the record as ``GET /v1/decisions/{id}`` gives it
    (its kind, request, result, sequence, policy version, the id of the key that asked, why it
    was refused), the explanation when it was kept, and the policy version it was decided
    under. Exit 2, saying why, where the database does not hold it."""
    from bastion.audit.decision_log import kept_in, stored
    from bastion.server.api.decisions import DecisionRecord as ServiceRecord

    if not kept_in(db):
        print(
            f"bastion: no decision record {decision_id!r}: the decision service's decisions were"
            ' never kept in this database (decision_log = "database" was never set on a server'
            " using it); a /v1 decision is in the memory of the replica that made it: ask it,"
            f" GET /v1/decisions/{decision_id}",
            file=sys.stderr,
        )
        return 2
    fields = stored(db, decision_id)
    if fields is None:
        print(
            f"bastion: no decision record {decision_id!r}: not in decision_log (the decision"
            " service's stored decisions) either: it is older than audit_retention_days, or was"
            ' made by a server with decision_log = "memory" or on another database, or was'
            " still waiting to be written (within 0.2 s, lost if its process was killed)",
            file=sys.stderr,
        )
        return 2
    record = ServiceRecord(*fields)
    shown = record.to_json()
    if record.explanation is not None:
        shown["explanation"] = record.explanation
    out = {"record": shown, "policy": _policy_of(db, record.policy_version)}
    print(json.dumps(out, indent=2, default=str))
    return 0


def _policy_of(db: Database, version: int | None) -> dict | None:
    """The policy version a record names, its text with it; None (said on stderr when it is
    named but not held) otherwise."""
    if version is None:
        return None
    if (found := FactStore(db).policy(version)) is None:
        print(
            f"bastion: the database holds no policy version {version}:"
            " was it restored from another one?",
            file=sys.stderr,
        )
        return None
    return {**found.summary(), "text": found.text}


def _service_id(decision_id: str) -> bool:
    """Whether ``decision_id`` has the shape of the decision service's ids, its process's
    prefix and a count (``3f9c...-42``), not of the gateway's (32 hex digits, no dash)."""
    return "-" in decision_id


def _not_recorded(decision_id: str) -> str:
    return (
        f"no decision record {decision_id!r}: it is older than audit_retention_days, or the"
        " gateway that made it writes to another database"
    )


def cmd_events(args: argparse.Namespace) -> int:
    db = Database(_database(args))
    try:
        found = AuditLog(db).events(
            kind_prefix=args.kind or None, request_id=args.request, limit=args.lines
        )
    finally:
        db.close()
    for event in reversed(found):
        if args.json:
            print(json.dumps(dataclasses.asdict(event), default=str))
        else:
            print(event_line(event))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    days = args.older_than
    if days is None:
        days = ServerConfig.load(args.config).audit_retention_days
        if days == 0:
            print("audit_retention_days is 0: the audit trail is kept for ever", file=sys.stderr)
            return 0
    if not days > 0:
        raise ConfigError("--older-than must be a positive number of days")
    db = Database(_database(args))
    try:
        pruned = prune(db, days, actor=cli_actor())
    finally:
        db.close()
    print(f"deleted {pruned_text(pruned)} older than {days:g} days", file=sys.stderr)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Walk every chain (the decision service's where it keeps its decisions in the database);
    exit 1 at the first row out of place, or a checkpoint not confirmed. With ``--export``,
    check each copy on its own, then the database against it."""
    from bastion.audit.export import CopyRefused, compare, read_copy
    from bastion.audit.export_commands import export_verdicts

    try:
        copies, empty = read_copy(args.export)
    except CopyRefused as e:
        print(f"bastion: {e}", file=sys.stderr)
        return 2
    db = Database(_database(args))
    try:
        DecisionRecords(db), AuditLog(db)  # their tables, as this version keeps them
        verdicts = [
            verify(db, decisions.CHAIN, args.checkpoint),
            verify(db, log.CHAIN, args.events_checkpoint),
        ]
        kept = decision_log.open_chain(db)
        if kept:
            verdicts.append(verify(db, decision_log.CHAIN, args.decision_log_checkpoint))
        elif args.decision_log_checkpoint:
            verdicts.append(_never_kept(args.decision_log_checkpoint[0]))
        compared = {
            table: compare(db, copy) if kept or table != decision_log.CHAIN.table else _none(copy)
            for table, copy in copies.items()
            if copy.ok
        }
    finally:
        db.close()
    said = [(verdict.ok, _verdict(verdict)) for verdict in verdicts]
    said += export_verdicts(copies, empty, compared)
    for ok, text in said:
        print(text, file=sys.stdout if ok else sys.stderr)
    return 0 if all(ok for ok, _ in said) else 1


# Where a checkpoint or a copy of the decision service's chain is given for a database that holds
# none.
_NEVER_KEPT = (
    'no decision service ever kept its decisions in this database (decision_log = "database")'
)


def _never_kept(checkpoint: Checkpoint) -> Verdict:
    found = Verdict(decision_log.CHAIN)
    found.broken_at, found.problem = checkpoint.seq, f"checkpoint {checkpoint}: {_NEVER_KEPT}"
    return found


def _none(copy: Copy) -> Comparison:
    from bastion.audit.export import Comparison

    return Comparison(copy, broken_at=copy.first, problem=_NEVER_KEPT)


def _verdict(found: Verdict) -> str:
    """What verify found in one chain: the first line says OK or BROKEN; notes follow."""
    chain = found.chain
    if not found.ok:
        checked = f" (whole up to seq {found.last})" if found.last is not None else ""
        at = "NULL" if found.broken_at is None else found.broken_at
        return f"{chain.table}: BROKEN at seq {at}: {found.problem}{checked}"
    if found.first is None:
        lines = [f"{chain.table}: OK, no chained {chain.noun}"]
    else:
        lines = [
            f"{chain.table}: OK, seq {found.first} to {found.last} ({found.rows} {chain.noun},"
            f" the oldest of {_when(found.first_at or 0)})",
            f"  head {found.last}:{found.last_hash}",
        ]
        if found.anchor == GENESIS:
            lines.append(f"  starts at seq {found.first}, the chain's first row")
        else:
            lines.append(
                f"  starts at seq {found.first}: rows before seq {found.first} were pruned;"
                f" its previous hash (the anchor) is {found.anchor}"
            )
    if found.before:
        lines.append(
            f"  {found.before} {chain.noun} written before the chain began are not covered"
        )
    if found.waiting:
        lines.append(
            f"  {found.waiting} {chain.noun} not chained yet (a running server chains them"
            " within a second)"
        )
    lines += [f"  checkpoint {c} confirmed" for c in found.checked]
    return "\n".join(lines)


def _checkpoint(text: str) -> Checkpoint:
    try:
        return Checkpoint.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register(sub: argparse._SubParsersAction) -> None:
    audit = sub.add_parser("audit", help="the audit trail: decision records, retention")
    commands = audit.add_subparsers(dest="audit_command", required=True)
    tail = commands.add_parser("tail", help="print the latest decisions; -f follows new ones")
    tail.add_argument(
        "-n",
        "--lines",
        type=whole_number(MAX_INTEGER, least=0),
        default=20,
        help="how many to show first (0: only new ones, with -f)",
    )
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing new decisions")
    tail.add_argument("--json", action="store_true", help="one JSON record per line")
    tail.add_argument("--database", help="SQLite path or postgresql:// URL (or BASTION_DATABASE)")
    tail.add_argument("--config", help="bastion.toml to read the database from")
    tail.set_defaults(func=cmd_tail)
    show = commands.add_parser(
        "show",
        help="print one decision record, found by its id, with the policy version it was"
        " decided under and its approval's events (JSON)",
    )
    show.add_argument(
        "decision_id", help="as the agent's error (data.decision_id) or a log names it"
    )
    show.add_argument("--database", help="SQLite path or postgresql:// URL (or BASTION_DATABASE)")
    show.add_argument("--config", help="bastion.toml to read the database from")
    show.set_defaults(func=cmd_show)
    events = commands.add_parser(
        "events", help="print audit events, oldest first (approvals, tokens, grants...)"
    )
    events.add_argument(
        "--kind", help="only kinds starting with this: approval. review. approval.answer"
    )
    events.add_argument("--request", metavar="ID", help="only events of this approval request")
    events.add_argument(
        "-n",
        "--lines",
        type=whole_number(MAX_INTEGER),
        default=50,
        help="the latest N (default 50)",
    )
    events.add_argument("--json", action="store_true", help="one JSON event per line")
    events.add_argument("--database", help="SQLite path or postgresql:// URL (or BASTION_DATABASE)")
    events.add_argument("--config", help="bastion.toml to read the database from")
    events.set_defaults(func=cmd_events)
    prune_ = commands.add_parser(
        "prune", help="delete audit events and decision records older than the retention"
    )
    prune_.add_argument(
        "--older-than",
        type=float,
        metavar="DAYS",
        help="days to keep (default: audit_retention_days of bastion.toml, 90)",
    )
    prune_.add_argument("--database", help="SQLite path or postgresql:// URL (or BASTION_DATABASE)")
    prune_.add_argument("--config", help="bastion.toml to read the database and retention from")
    prune_.set_defaults(func=cmd_prune)
    verify_ = commands.add_parser(
        "verify",
        help="check the hash chains of the decision records, the audit events and the decision"
        " service's stored decisions; exit 1 where one was altered, or does not lead to a logged"
        " checkpoint",
    )
    verify_.add_argument(
        "--checkpoint",
        type=_checkpoint,
        action="append",
        default=[],
        metavar="SEQ:HASH",
        help="a head of the decision records the server logged (audit checkpoint: decisions=...);"
        " the chain must still hold it. Repeatable",
    )
    verify_.add_argument(
        "--events-checkpoint",
        type=_checkpoint,
        action="append",
        default=[],
        metavar="SEQ:HASH",
        help="the same for the audit events (audit checkpoint: ... events=...)",
    )
    verify_.add_argument(
        "--decision-log-checkpoint",
        type=_checkpoint,
        action="append",
        default=[],
        metavar="SEQ:HASH",
        help="the same for the decision service's stored decisions (audit checkpoint: ..."
        " decision_log=...)",
    )
    verify_.add_argument(
        "--export",
        action="append",
        default=[],
        metavar="FILE",
        help="a copy made by audit export: checked line by line, and the database against it"
        " (rows altered, deleted or cut from the end since; pruned ones said so). Repeatable:"
        " the files of one table in the order they were made",
    )
    verify_.add_argument(
        "--database", help="SQLite path or postgresql:// URL (or BASTION_DATABASE)"
    )
    verify_.add_argument("--config", help="bastion.toml to read the database from")
    verify_.set_defaults(func=cmd_verify)
    # They read this module's helpers.
    from bastion.audit.export_commands import add_export
    from bastion.audit.replay_commands import add_replay

    add_export(commands)
    add_replay(commands)
