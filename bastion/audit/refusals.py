"""Refusals of requests that prove nothing (no client secret, session or token of this server),
recorded so that a flood of them writes a bounded number of audit rows.

Refusals are counted per key (kind, address, reason, and the client when one was identified) in
windows of ``window_seconds``: the first refusal of a key in a window is written at once, with
its detail; the ones after it in that window are only counted, and written as rows of the same
kind with ``repeats`` (how many), ``since`` and ``until`` (the repeats came after ``since`` and
at ``until`` at the latest): by `write_progress` while the window is open (every
``repeat_write_seconds`` of a running server, the repeats counted since the key's last row), and
once more when it has closed (those counted since). Rows are only ever added, never updated (the
audit hash chain, `bastion.audit.chain`): a key's rows add up to its refusals, and a process
killed outright loses only what it counted since its last write. At most ``max_keys`` keys are
counted at a time; past that, each kind's further refusals share one key with address and reason
``*``. So a window writes at most ``(2 + window_seconds / repeat_write_seconds) * (max_keys +
kinds)`` rows whatever the flood, each of bounded size: a text of the detail (what the request
sent: a claimed client id, a token's header) is cut to ``MAX_DETAIL_CHARS``. Counts whose rows
the database did not take (an outage) are kept, merged per key (at most ``max_keys`` of them,
then per kind), and written with the next rows.

An event that concerns something known (an introspection answer about a token this server
issued) is counted the same way under a key that also holds what it concerns (``counted``: the
token, the answer, its user), written in every row of the key, the row of repeats too; such a key
is never merged into the overflow: past ``max_keys`` its event is written as a row of its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from bastion.audit.log import AuditLog

OVERFLOW = "*"
# Characters kept of each text in a refusal's detail; the rest is counted, not written.
MAX_DETAIL_CHARS = 200


def _bounded(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_DETAIL_CHARS:
        return f"{value[:MAX_DETAIL_CHARS]}... ({len(value) - MAX_DETAIL_CHARS} more characters)"
    return value


def _overflow(kind: str) -> tuple:
    """The key every further event of ``kind`` shares once ``max_keys`` are counted."""
    return (kind, OVERFLOW, OVERFLOW, None, None, ())


@dataclass
class _Window:
    opened_at: float
    last_at: float
    # The repeats counted and not written yet, those after ``since`` (the window's first row,
    # or the key's last row of repeats).
    since: float
    repeats: int = 0


class RefusalLog:
    """Aggregates refusals of unauthenticated requests (and other frequent events) into bounded
    audit rows (see module)."""

    def __init__(
        self,
        audit: AuditLog,
        *,
        window_seconds: float = 60.0,
        max_keys: int = 1000,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.audit = audit
        self.window_seconds = window_seconds
        self.max_keys = max_keys
        self.clock = clock or audit.clock
        self._windows: dict[tuple, _Window] = {}
        # Closed windows (and first refusals) whose rows the database did not take.
        self._unwritten: dict[tuple, _Window] = {}
        self._lock = threading.Lock()
        self._next_sweep = 0.0

    def record(
        self,
        kind: str,
        *,
        address: str | None,
        reason: str | None,
        client_id: str | None = None,
        subject: str | None = None,
        counted: Mapping[str, Hashable] | None = None,
        **detail: Any,
    ) -> None:
        """Note one refusal; write its row if it is the first of its key in the window.

        ``reason`` must come from a small fixed set (an error code, not a message that quotes the
        request): with the address and client it makes the key. ``detail`` goes only into the
        first row of a window. ``counted`` (see module): with ``subject``, part of the key and
        of each of its rows; past ``max_keys`` such an event is written alone, not merged.
        """
        now = self.clock()
        fields = tuple(sorted(counted.items())) if counted else ()
        key = (kind, address, reason, client_id, subject if counted else None, fields)
        alone = False
        with self._lock:
            closed = self._sweep(now) if now >= self._next_sweep else []
            window = self._windows.get(key)
            if window is not None and now - window.opened_at >= self.window_seconds:
                closed.append((key, self._windows.pop(key)))
                window = None
            if window is None and len(self._windows) >= self.max_keys:
                if counted:
                    alone = True
                else:
                    key = _overflow(kind)
                    window = self._windows.get(key)
                    address, reason, client_id, subject = OVERFLOW, OVERFLOW, None, None
            first = window is None
            if alone:
                pass
            elif first:
                self._windows[key] = _Window(opened_at=now, last_at=now, since=now)
            else:
                window.repeats += 1
                window.last_at = now
        try:
            self._write_closed(closed)  # its counts are kept if this fails
        finally:
            if first:
                bounded = {name: _bounded(value) for name, value in detail.items()}
                row = dict(subject=subject, client_id=client_id, address=address, reason=reason)
                self._write_first(key, now, kind, {**row, **dict(fields), **bounded})

    def _write_first(self, key: tuple, now: float, kind: str, fields: dict[str, Any]) -> None:
        """The row of the first refusal of a window; if the database does not take it, the
        refusal is counted with the rest of its key instead, and written later."""
        try:
            self.audit.record(kind, **fields)
        except BaseException:
            with self._lock:
                self._keep(key, _Window(opened_at=now, last_at=now, since=now, repeats=1))
            raise

    def write_progress(self) -> None:
        """Write the rows of windows that have closed and, for each window still open, the
        repeats counted since its key's last row; the window stays open (so a process killed
        outright loses only the repeats counted since)."""
        now = self.clock()
        with self._lock:
            closed = self._sweep(now)
            for key, window in self._windows.items():
                if window.repeats:
                    closed.append((key, replace(window)))
                    window.repeats = 0
                    window.since = window.last_at
        self._write_closed(closed)

    @property
    def counting(self) -> bool:
        """Whether a window is open or a count waits to be written (no I/O)."""
        return bool(self._windows or self._unwritten)

    def flush(self, *, everything: bool = False) -> None:
        """Write the rows of windows that have closed (of every window, with ``everything``: at
        shutdown, so no count is lost)."""
        now = self.clock()
        with self._lock:
            if everything:
                closed = list(self._windows.items())
                self._windows.clear()
            else:
                closed = self._sweep(now)
        self._write_closed(closed)

    def _sweep(self, now: float) -> list[tuple[tuple, _Window]]:
        """Under the lock: take out the windows that have closed."""
        self._next_sweep = now + min(self.window_seconds, 1.0)
        closed = [
            (key, window)
            for key, window in self._windows.items()
            if now - window.opened_at >= self.window_seconds
        ]
        for key, _ in closed:
            del self._windows[key]
        return closed

    def _keep(self, key: tuple, window: _Window) -> None:
        """Under the lock: hold a count the database did not take, merged with its key's."""
        if key not in self._unwritten and len(self._unwritten) >= self.max_keys:
            key = _overflow(key[0])
        kept = self._unwritten.get(key)
        if kept is None:
            self._unwritten[key] = replace(window)
        else:
            kept.repeats += window.repeats
            kept.opened_at = min(kept.opened_at, window.opened_at)
            kept.since = min(kept.since, window.since)
            kept.last_at = max(kept.last_at, window.last_at)

    def _write_closed(self, closed: list[tuple[tuple, _Window]]) -> None:
        with self._lock:
            unwritten, self._unwritten = list(self._unwritten.items()), {}
        repeated = unwritten + [(key, window) for key, window in closed if window.repeats]
        if not repeated:
            return
        try:
            with self.audit.db.transaction():
                for (kind, address, reason, client_id, subject, fields), window in repeated:
                    self.audit.record(
                        kind,
                        subject=subject,
                        client_id=client_id,
                        address=address,
                        reason=reason,
                        **dict(fields),
                        repeats=window.repeats,
                        since=window.since,
                        until=window.last_at,
                    )
        except BaseException:
            with self._lock:
                for key, window in repeated:
                    self._keep(key, window)
            raise
