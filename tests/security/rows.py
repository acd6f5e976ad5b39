"""Every row of every table of a served bastion's database, to tell what a refused request
changed (tests/security/test_hostile_*.py): each table's rows as a multiset, compared column for
column but for what `MOVING` and `GROWING` allow (each with its reason)."""

from __future__ import annotations

from collections import Counter

from bastion.db import Database

# What a refused request may change in the database, and why: every other column of every table
# (all of them, read from the schema) must hold the same rows after a refusal as before it.
# Columns left out of the comparison, as they move behind or on a refused request:
MOVING = {
    # The server numbers and chains events within a second of their writing, off the request's
    # path (`bastion.audit.log`): an event recorded by one request is chained during another.
    "audit_events": ("seq", "prev_hash", "hash"),
    # The sign-in throttle counts each wrong password, per username and per address.
    "oauth_login_failures": ("failures", "last_failure_at"),
    # A pending authorization request survives `max_failures_per_request` wrong passwords.
    "oauth_pending_authorizations": ("login_attempts",),
}
# Tables a refusal may add rows to (never take one from or change one).
GROWING = {
    "audit_events": "refusals are recorded (a wrong password, a refused client, ...)",
    "oauth_login_failures": "a username's or an address's first wrong password starts its count",
}
Rows = dict[str, Counter]


def tables(db: Database) -> dict[str, list[str]]:
    """Every table of bastion's schema, with the columns compared (`MOVING` left out)."""
    if db.is_postgres:
        rows = db.execute(
            "SELECT c.relname, a.attname FROM pg_class AS c JOIN pg_attribute AS a"
            " ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped"
            " WHERE c.relkind = 'r' AND c.relnamespace = current_schema()::regnamespace"
            " ORDER BY c.relname, a.attnum"
        )
    else:
        rows = db.execute(
            "SELECT m.name, c.name FROM sqlite_master AS m, pragma_table_info(m.name) AS c"
            " WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%' ORDER BY m.name, c.cid"
        )
    found: dict[str, list[str]] = {}
    for table, column in rows:
        if column not in MOVING.get(table, ()):
            found.setdefault(table, []).append(column)
    return found


def snapshot(db: Database) -> Rows:
    """Each table's rows, whole (but for `MOVING`), as a multiset."""
    return {
        table: Counter(db.execute(f"SELECT {', '.join(columns)} FROM {table}"))
        for table, columns in tables(db).items()
    }


def unexpected_changes(before: Rows, after: Rows) -> dict[str, dict[str, list]]:
    """What changed from ``before`` to ``after`` beyond what `GROWING` allows: per table, the
    rows gone (or changed, as they were) and the rows new (or changed, as they are)."""
    changes = {}
    for table in sorted(before.keys() | after.keys()):
        old, new = before.get(table, Counter()), after.get(table, Counter())
        gone, added = old - new, new - old
        if table in GROWING and not gone:
            continue
        if gone or added:
            changes[table] = {"gone": list(gone)[:5], "new": list(added)[:5]}
    return changes
