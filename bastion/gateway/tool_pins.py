"""Tool pins: what each tool and prompt of an upstream was when it was trusted, so that one
whose definition changes afterwards (the MCP "rug pull": a description that now carries a prompt
injection, a new argument, a read-only hint flipped, a new tool or prompt named to be mistaken
for another) is held back until an operator accepts the new definition.

A tool's definition is its ``name``, ``title``, ``description``, ``inputSchema``,
``outputSchema`` and ``annotations`` as the upstream lists them; a prompt's, its ``name``,
``title``, ``description`` and ``arguments`` (what ``prompts/get`` returns is made per call and
is not pinned). Its digest is the SHA-256 of their canonical JSON, computed when bastion reads a
list (never on a call). With ``pin_tools`` (``pin_prompts``) on an upstream (docs/gateway.md,
"Tool pins"), each one's accepted digest is a row of ``tool_pins`` (by server, kind and name),
shared by every replica: written on first use (``first_use``, the first whole list bastion reads
of that upstream) or by an operator's acceptance (`ToolPins.accept`); a definition that differs
from it waits in the row as ``pending`` until accepted. Each new pending definition is audited
once (``tool.changed``, ``tool.held``; ``prompt.changed``, ``prompt.held``), in the same
transaction.

Blocking: call `ToolPins` from a worker thread.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bastion.audit.decisions import canonical_json
from bastion.audit.log import AuditLog
from bastion.db import Database
from bastion.names import readable

# What is pinned: tools (``tools/list``) and prompts (``prompts/list``).
TOOL, PROMPT = "tool", "prompt"
# What a tool or a prompt is, to a client and the model behind it: a change in any of these is
# a change.
DEFINITION_FIELDS = {
    TOOL: ("name", "title", "description", "inputSchema", "outputSchema", "annotations"),
    PROMPT: ("name", "title", "description", "arguments"),
}
# ``pin_tools`` and ``pin_prompts`` of an upstream: "off"; "first_use": the first whole list
# read is trusted, and what appears later waits for review; "review": everything waits for review.
PIN_MODES = ("off", "first_use", "review")
# How many changes the short diff names.
_SHOWN_CHANGES = 12

_MIGRATIONS = [
    """
    CREATE TABLE tool_pins (
        server TEXT NOT NULL,
        tool TEXT NOT NULL,
        digest TEXT,
        definition TEXT,
        accepted_at DOUBLE PRECISION,
        accepted_by TEXT,
        pending_digest TEXT,
        pending_definition TEXT,
        pending_since DOUBLE PRECISION,
        PRIMARY KEY (server, tool)
    );
    """,
    # Prompts are pinned too: a row is a tool's or a prompt's (``kind``), named ``name``.
    """
    ALTER TABLE tool_pins RENAME TO tool_pins_v1;
    CREATE TABLE tool_pins (
        server TEXT NOT NULL,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        digest TEXT,
        definition TEXT,
        accepted_at DOUBLE PRECISION,
        accepted_by TEXT,
        pending_digest TEXT,
        pending_definition TEXT,
        pending_since DOUBLE PRECISION,
        PRIMARY KEY (server, kind, name)
    );
    INSERT INTO tool_pins (server, kind, name, digest, definition, accepted_at, accepted_by,
        pending_digest, pending_definition, pending_since)
        SELECT server, 'tool', tool, digest, definition, accepted_at, accepted_by,
        pending_digest, pending_definition, pending_since FROM tool_pins_v1;
    DROP TABLE tool_pins_v1;
    """,
]


def definition(item: dict[str, Any], kind: str = TOOL) -> dict[str, Any]:
    """The fields of a listed tool (or prompt) that make up its definition."""
    return {k: item[k] for k in DEFINITION_FIELDS[kind] if k in item}


def definition_text(item: dict[str, Any], kind: str = TOOL) -> str:
    """A listed tool's (or prompt's) definition as canonical JSON (sorted keys, no spaces)."""
    return canonical_json(definition(item, kind))


def digest(text: str) -> str:
    """The digest of a definition's canonical JSON."""
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _short(value: Any) -> str:
    """A changed value on one line of the diff, as `bastion.names.readable` shows it: an
    upstream's line break or right-to-left override escaped, a long text cut with a mark."""
    return readable(value if isinstance(value, str) else json.dumps(value, sort_keys=True))


def changes(old: dict[str, Any] | None, new: dict[str, Any], kind: str = TOOL) -> list[str]:
    """A short diff of two definitions, one line per change, for people: a text field's old and
    new value (escaped and cut by `bastion.names.readable`), the arguments added and removed,
    the hints changed."""
    old = old or {}
    lines: list[str] = []
    for field in DEFINITION_FIELDS[kind]:
        before, after = old.get(field), new.get(field)
        if before == after:
            continue
        if field in ("inputSchema", "outputSchema") and isinstance(before, dict | None):
            lines += _schema_changes(field, before or {}, after if isinstance(after, dict) else {})
        elif field == "arguments" and isinstance(before, list | None) and isinstance(after, list):
            lines += _argument_changes(_named(before or []), _named(after))
        elif field == "annotations" and isinstance(before, dict | None) and isinstance(after, dict):
            for hint in sorted({*(before or {}), *after}):
                if (before or {}).get(hint) != after.get(hint):
                    lines.append(
                        f"annotations.{hint}: {_short((before or {}).get(hint))} ->"
                        f" {_short(after.get(hint))}"
                    )
        else:
            lines.append(f"{field}: {_short(before)} -> {_short(after)}")
    if len(lines) > _SHOWN_CHANGES:
        lines = [*lines[:_SHOWN_CHANGES], f"... and {len(lines) - _SHOWN_CHANGES} more"]
    return lines


def _named(arguments: list) -> dict[str, Any]:
    """A prompt's ``arguments`` by name (an argument without a name under its place)."""
    return {
        a["name"] if isinstance(a, dict) and isinstance(a.get("name"), str) else f"#{i}": a
        for i, a in enumerate(arguments)
    }


def _argument_changes(old: dict[str, Any], new: dict[str, Any], field: str = "arguments"):
    lines = [f"{field}: argument {name!r} added" for name in new if name not in old]
    lines += [f"{field}: argument {name!r} removed" for name in old if name not in new]
    lines += [
        f"{field}: argument {name!r} changed: {_short(old[name])} -> {_short(v)}"
        for name, v in new.items()
        if name in old and old[name] != v
    ]
    return lines


def _schema_changes(field: str, before: dict, after: dict) -> list[str]:
    props = before.get("properties"), after.get("properties")
    old_props = props[0] if isinstance(props[0], dict) else {}
    new_props = props[1] if isinstance(props[1], dict) else {}
    lines = _argument_changes(old_props, new_props, field)
    rest = {k for k in {*before, *after} if k != "properties" and before.get(k) != after.get(k)}
    lines += [
        f"{field}.{k}: {_short(before.get(k))} -> {_short(after.get(k))}" for k in sorted(rest)
    ]
    return lines


@dataclass(frozen=True, slots=True)
class ToolPin:
    """One tool's or prompt's row: its accepted definition (None: never accepted, a new one
    held) and the definition waiting for review, if any."""

    server: str
    kind: str  # TOOL or PROMPT
    name: str
    digest: str | None
    definition: str | None
    accepted_at: float | None
    accepted_by: str | None
    pending_digest: str | None
    pending_definition: str | None
    pending_since: float | None

    def pending_changes(self) -> list[str]:
        if self.pending_definition is None:
            return []
        old = json.loads(self.definition) if self.definition is not None else None
        return changes(old, json.loads(self.pending_definition), self.kind)

    def to_json(self) -> dict[str, Any]:
        pending = self.pending_digest is not None
        return {
            "server": self.server,
            "kind": self.kind,
            self.kind: self.name,
            "digest": self.digest,
            "definition": json.loads(self.definition) if self.definition else None,
            "accepted_at": self.accepted_at,
            "accepted_by": self.accepted_by,
            "pending": {
                "digest": self.pending_digest,
                "definition": json.loads(self.pending_definition or "null"),
                "since": self.pending_since,
                "changes": self.pending_changes(),
            }
            if pending
            else None,
        }


class PinError(ValueError):
    """An acceptance that cannot be made as asked; the message says what to do."""


_COLUMNS = (
    "server, kind, name, digest, definition, accepted_at, accepted_by, pending_digest,"
    " pending_definition, pending_since"
)


class ToolPins:
    """The ``tool_pins`` rows (SQLite or PostgreSQL) and the audit events of their changes."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock
        self.audit = AuditLog(db, clock)
        db.migrate("tool_pins", _MIGRATIONS)

    def pins(self, server: str, kind: str) -> dict[str, str | None]:
        """Each known tool (prompt) of ``server`` and its accepted digest (None: not accepted)."""
        rows = self.db.execute(
            "SELECT name, digest FROM tool_pins WHERE server = ? AND kind = ?", (server, kind)
        )
        return dict(rows)

    def pinned(self, server: str, kind: str, name: str) -> str | None:
        rows = self.db.execute(
            "SELECT digest FROM tool_pins WHERE server = ? AND kind = ? AND name = ?",
            (server, kind, name),
        )
        return rows[0][0] if rows else None

    def listed(
        self, server: str | None = None, pending_only: bool = False, kind: str | None = None
    ) -> list[ToolPin]:
        where, params = [], []
        if server is not None:
            where.append("server = ?")
            params.append(server)
        if kind is not None:
            where.append("kind = ?")
            params.append(kind)
        if pending_only:
            where.append("pending_digest IS NOT NULL")
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM tool_pins{clause} ORDER BY server, kind, name", params
        )
        return [ToolPin(*row) for row in rows]

    def get(self, server: str, kind: str, name: str) -> ToolPin | None:
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM tool_pins WHERE server = ? AND kind = ? AND name = ?",
            (server, kind, name),
        )
        return ToolPin(*rows[0]) if rows else None

    def observe(
        self,
        server: str,
        kind: str,
        listed: dict[str, tuple[str, str]],
        mode: str,
        complete: bool,
    ) -> dict[str, str | None] | None:
        """Take what ``server`` lists now of ``kind`` (each one's digest and definition text):
        one not known yet is pinned (``first_use``, in the first whole list of the upstream) or
        held for review; a known one whose definition differs from its pin has it kept as
        pending, audited once per new definition. Returns every known one's accepted digest;
        None when nothing of ``kind`` is pinned yet and ``listed`` is not a whole list (read the
        whole list first: the first use is of the whole list, not of a page)."""
        now = self.clock()
        with self.db.transaction():
            self.db.lock(f"tool_pins:{server}")
            known = {pin.name: pin for pin in self.listed(server, kind=kind)}
            if not known and not complete:
                return None
            trusted = mode == "first_use" and not known
            for name, (seen, text) in listed.items():
                pin = known.get(name)
                if pin is None:
                    self._new(server, kind, name, seen, text, trusted, now)
                elif seen != pin.digest and seen != pin.pending_digest:
                    self._changed(pin, seen, text, now)
            if trusted and listed:
                self.audit.record(
                    f"{kind}.pinned",
                    server=server,
                    **{f"{kind}s": {name: seen for name, (seen, _) in sorted(listed.items())}},
                    by="first_use",
                )
            return self.pins(server, kind)

    def _new(
        self, server: str, kind: str, name: str, seen: str, text: str, trusted: bool, now: float
    ):
        if trusted:
            self.db.execute(
                "INSERT INTO tool_pins (server, kind, name, digest, definition, accepted_at,"
                " accepted_by) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (server, kind, name, seen, text, now, "first_use"),
            )
            return
        self.db.execute(
            "INSERT INTO tool_pins (server, kind, name, pending_digest, pending_definition,"
            " pending_since) VALUES (?, ?, ?, ?, ?, ?)",
            (server, kind, name, seen, text, now),
        )
        self.audit.record(
            f"{kind}.held",
            server=server,
            **{kind: name},
            new_digest=seen,
            changes=changes(None, json.loads(text), kind),
        )

    def _changed(self, pin: ToolPin, seen: str, text: str, now: float) -> None:
        self.db.execute(
            "UPDATE tool_pins SET pending_digest = ?, pending_definition = ?, pending_since = ?"
            " WHERE server = ? AND kind = ? AND name = ?",
            (seen, text, now, pin.server, pin.kind, pin.name),
        )
        old = json.loads(pin.definition) if pin.definition is not None else None
        self.audit.record(
            f"{pin.kind}.changed" if pin.digest is not None else f"{pin.kind}.held",
            server=pin.server,
            **{pin.kind: pin.name},
            old_digest=pin.digest,
            new_digest=seen,
            changes=changes(old, json.loads(text), pin.kind),
        )

    def accept(self, server: str, kind: str, name: str, pending_digest: str, actor: str) -> ToolPin:
        """Accept the definition waiting for review, named by its digest (what the operator
        saw: one the upstream changed again since is refused). `PinError` otherwise."""
        with self.db.transaction():
            self.db.lock(f"tool_pins:{server}")
            pin = self.get(server, kind, name)
            if pin is None:
                raise PinError(f"bastion has never seen a {kind} {name!r} listed by {server!r}")
            if pin.pending_digest is None:
                raise PinError(f"{server}/{name} has no definition waiting for review")
            if pin.pending_digest != pending_digest:
                raise PinError(
                    f"{server}/{name} waits with definition {pin.pending_digest}, not"
                    f" {pending_digest}: the upstream changed it again; look at it again"
                    f" (bastion {kind}s show) and accept that one"
                )
            now = self.clock()
            self.db.execute(
                "UPDATE tool_pins SET digest = pending_digest, definition = pending_definition,"
                " accepted_at = ?, accepted_by = ?, pending_digest = NULL,"
                " pending_definition = NULL, pending_since = NULL"
                " WHERE server = ? AND kind = ? AND name = ?",
                (now, actor, server, kind, name),
            )
            self.audit.record(
                f"{kind}.accepted",
                actor=actor,
                server=server,
                **{kind: name},
                old_digest=pin.digest,
                new_digest=pending_digest,
                changes=pin.pending_changes(),
            )
            accepted = self.get(server, kind, name)
            assert accepted is not None
            return accepted


@dataclass(frozen=True, slots=True)
class PinChange:
    """Why a call to a tool (a prompt) is refused under pins: as listed now (``listed``, None:
    not listed) it is not the one accepted (``pinned``, None: none accepted)."""

    kind: str  # TOOL or PROMPT
    reason: str  # "<kind>_changed", "<kind>_not_reviewed" or "<kind>_not_listed"
    pinned: str | None
    listed: str | None


def pin_change(kind: str, pinned: str | None, listed: str | None) -> PinChange | None:
    """None when ``listed`` is the accepted definition, else why not."""
    if listed is not None and listed == pinned:
        return None
    if listed is None:
        return PinChange(kind, f"{kind}_not_listed", pinned, None)
    reason = "changed" if pinned is not None else "not_reviewed"
    return PinChange(kind, f"{kind}_{reason}", pinned, listed)
