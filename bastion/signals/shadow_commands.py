"""CLI: ``bastion signals shadow-report``: what the monitored (shadow) rules would have done
(added to ``bastion signals`` by `bastion.signals.commands`)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from bastion.audit.commands import _database
from bastion.audit.decisions import DecisionRecords
from bastion.cli import since_epoch
from bastion.db import Database
from bastion.signals.shadow import report


def cmd_shadow_report(args: argparse.Namespace) -> int:
    try:
        since = since_epoch(args.since, time.time())
    except ValueError as e:
        print(f"bastion: {e}", file=sys.stderr)
        return 2
    db = Database(_database(args))
    try:
        records = DecisionRecords(db)
        seen: list[dict] = []
        seq = 0
        while True:
            batch = records.after(seq, limit=1000)
            if not batch:
                break
            seq = batch[-1][0]
            for _, record in batch:
                if record.at >= since and (record.obligations or {}).get("shadow"):
                    seen.append(
                        {
                            "at": record.at,
                            "result": record.result,
                            "obligations": record.obligations,
                        }
                    )
    finally:
        db.close()
    rows = report(seen)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print("no shadow rule would have fired in this period")
        return 0
    for row in rows:
        name = row["rule"] or "(over budget)"
        print(
            f"{name}: would have {row['effect']} {row['fired']} time(s)"
            f" (decided: {_counts(row['results'])})"
        )
        for who, n in sorted(row["principals"].items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"  {who}: {n}")
    return 0


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def add_shadow_report(commands: argparse._SubParsersAction) -> None:
    """Add ``shadow-report`` to the ``bastion signals`` commands (`bastion.signals.commands`)."""
    shadow = commands.add_parser(
        "shadow-report",
        help="per monitored (shadow) rule: how often it would have fired, and for whom",
    )
    shadow.add_argument(
        "--since", default="24h", help="a duration (30m, 24h, 7d) or ISO 8601 time; default 24h"
    )
    shadow.add_argument("--json", action="store_true", help="the report as JSON")
    shadow.add_argument("--database", help="SQLite path or postgresql:// URL (or BASTION_DATABASE)")
    shadow.add_argument("--config", help="bastion.toml to read the database from")
    shadow.set_defaults(func=cmd_shadow_report)
