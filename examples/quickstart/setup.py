"""Prepare the quickstart's database, idempotently: the facts of desk.facts and two users.

    python examples/quickstart/setup.py [DATABASE]

Users: ``sam`` (support team) and ``avery`` (admin of desk), both with the password
``quickstart-password`` (a demo: never reuse it).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from bastion.db import Database
from bastion.facts.store import FactStore
from bastion.oauth.store import OAuthStore
from bastion.oauth.users import create_user
from bastion.policy.parser import parse_fact

HERE = Path(__file__).parent
PASSWORD = "quickstart-password"
USERS = ("sam", "avery")


def facts() -> list[tuple]:
    lines = (HERE / "desk.facts").read_text().splitlines()
    return [parse_fact(line) for line in lines if line.strip() and not line.startswith("#")]


def setup(database: str) -> None:
    if "://" not in database:  # a SQLite file: its folder; a PostgreSQL URL is no path
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    store = FactStore.open(database)
    try:
        store.apply(facts(), actor="quickstart")
    finally:
        store.close()
    db = Database(database)
    try:
        users = OAuthStore(db)
        known = {row[0] for row in users.users()}
        for name in USERS:
            if name not in known:
                create_user(users, name, PASSWORD, time.time(), actor="quickstart")
    finally:
        db.close()


if __name__ == "__main__":
    setup(sys.argv[1] if len(sys.argv) > 1 else ".quickstart/bastion.db")
    print("quickstart: facts and users sam, avery ready")
