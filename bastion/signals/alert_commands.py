"""CLI: ``bastion alerts list|show|ack``, on the deployment's database (docs/signals.md).

Like the other admin commands it works on the database directly (``--database``, or the one in
bastion.toml). ``ack --as`` names the person who acknowledges; whoever can run this command can
read the database and vouches for them (its OS user is named, as `via`, in the `alert.acknowledged`
audit event). Acknowledged, an alert is not escalated any further.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime

from bastion.audit.actor import cli_actor
from bastion.cli import add_limit
from bastion.db import Database
from bastion.names import readable
from bastion.server.config import ServerConfig, command_database
from bastion.signals.alerts import (
    ACKNOWLEDGED,
    MAX_LIST,
    OPEN,
    Alert,
    AlertError,
    AlertNotFound,
    Alerts,
    AlertSettings,
    AlertStore,
)


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _line(alert: Alert) -> str:
    acked = f" acknowledged by {readable(alert.acknowledged_by)}" if alert.acknowledged_by else ""
    return (
        f"{alert.id}  {alert.severity:8} {alert.state:12} {readable(alert.name)} for"
        f" {readable(alert.principal)}"
        f"  x{alert.count}  last {_when(alert.last_at)}{acked}"
    )


def _open(args: argparse.Namespace) -> Alerts:
    config = ServerConfig.load(args.config)
    database = command_database(args, config)
    table = {k: v for k, v in config.signals.get("alerts", {}).items() if k != "webhooks"}
    with config.reading("signals.alerts"):
        settings = AlertSettings.from_mapping(table)
    # Nothing is told from here: acknowledging only stops escalation (the server's task).
    return Alerts(
        AlertStore(Database(database, role="bastion-cli")),
        settings,
        lambda: None,  # type: ignore[arg-type,return-value]
        "",
    )


def _run(args: argparse.Namespace) -> int:
    alerts = _open(args)
    try:
        if args.alerts_command == "list":
            for alert in alerts.store.list(args.state, args.limit):
                print(json.dumps(alert.public()) if args.json else _line(alert))
        elif args.alerts_command == "show":
            alert = alerts.store.get(args.id)
            if args.json:
                print(json.dumps(alert.public(), indent=2))
            else:
                print(_line(alert))
                owner = readable(alert.owner) if alert.owner else "-"
                told = ", ".join(map(readable, alert.recipients)) or "-"
                print(f"  owner: {owner}; told: {told}")
                if alert.escalated_at is not None:
                    print(
                        f"  escalated {_when(alert.escalated_at)} to"
                        f" {', '.join(map(readable, alert.escalated_to))}"
                    )
                for decision_id in alert.decision_ids:
                    print(f"  decision {decision_id}")
        else:
            alert = alerts.acknowledge(args.id, args.person, "cli", via=cli_actor())
            print(_line(alert))
    except AlertNotFound:
        print(f"bastion: no alert has the id {args.id!r} (bastion alerts list)", file=sys.stderr)
        return 2
    except AlertError as e:
        print(f"bastion: {e}", file=sys.stderr)
        return 2
    finally:
        alerts.store.db.close()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    alerts = sub.add_parser("alerts", help="alerts: list, show, acknowledge")
    commands = alerts.add_subparsers(dest="alerts_command", required=True)
    p = commands.add_parser("list", help="alerts, most recently raised first")
    p.add_argument("--state", choices=(OPEN, ACKNOWLEDGED))
    add_limit(p, MAX_LIST)
    p.add_argument("--json", action="store_true", help="one JSON alert per line")
    p = commands.add_parser("show", help="an alert and the decisions that raised it")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p = commands.add_parser("ack", help="acknowledge: no further escalation")
    p.add_argument("id")
    p.add_argument("--as", dest="person", required=True, help="the person who acknowledges")
    for p in commands.choices.values():
        p.add_argument("--database", help="SQLite path or postgresql:// URL")
        p.add_argument("--config", help="bastion.toml")
        p.set_defaults(func=_run)
