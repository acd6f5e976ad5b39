"""Tool and prompt pins as one gateway process holds them (`bastion.gateway.tool_pins` is the
store): what each upstream session listed last and what is accepted, so that a call costs two
dict lookups and the database is asked, off the event loop, only about what is not as pinned."""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio

from bastion.db import DatabaseUnavailable
from bastion.gateway.handlers import listed_once
from bastion.gateway.tool_pins import PinChange, ToolPins, definition_text, digest, pin_change

if TYPE_CHECKING:
    from bastion.gateway.upstream import Upstream

log = logging.getLogger("bastion.gateway")


def listed_definitions(kind: str, items: Any) -> dict[str, tuple[str, str]]:
    """Each of ``items`` (a ``tools/list`` or ``prompts/list`` result's, as the upstream sent
    them) that a client could name (`listed_once`: one the list gives twice is not listed),
    and its definition's digest and canonical JSON: hashed now, once per list (never on a
    call)."""
    seen: dict[str, tuple[str, str]] = {}
    for item in listed_once(items, "name"):
        text = definition_text(item, kind)
        seen[item["name"]] = (digest(text), text)
    return seen


class Pinning:
    """Under ``pin_tools`` (``pin_prompts``), the tools (prompts) of one upstream as this
    process knows them: each one's accepted digest as the database said when a list was last
    read, and the digests each upstream session listed last (an upstream may describe them
    differently to each user, and what one user's session listed never decides another's
    calls). ``read_list`` reads an upstream session's whole list again and hands it back here
    (`take`); a call naming what the last list lacked has it read again, but not for
    ``relist_seconds`` (``pin_relist_seconds``) after such a reading found nothing more, per
    upstream session, on ``clock``."""

    def __init__(
        self,
        server: str,
        kind: str,
        store: ToolPins,
        mode: str,
        read_list: Callable[[Upstream], Awaitable[Any]],
        relist_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.server = server
        self.kind = kind
        self.store = store
        self.mode = mode
        self.read_list = read_list
        self.relist_seconds = relist_seconds
        self.clock = clock
        self.accepted: dict[str, str | None] = {}
        self._accepted_read = False
        self.listed: weakref.WeakKeyDictionary[Upstream, dict[str, str]] = (
            weakref.WeakKeyDictionary()
        )
        # When a call last had an upstream session's list read again and the name it called
        # was not in it: no more readings for that session for ``relist_seconds``.
        self._missed_at: weakref.WeakKeyDictionary[Upstream, float] = weakref.WeakKeyDictionary()

    def change(self, name: str, connection: Upstream) -> PinChange | None:
        """On a call: None when ``name`` is listed on ``connection`` as accepted (two dict
        lookups of digests taken when its list was read). Else why not, as this process knows."""
        listed = self.listed.get(connection)
        return pin_change(
            self.kind, self.accepted.get(name), listed.get(name) if listed is not None else None
        )

    async def take(self, connection: Upstream, items: Any, whole: bool) -> None:
        """Take what ``connection`` lists: ``items``, a page of a list a client asked for, or
        (``whole``) the whole list, which replaces what it listed before; hold it against the
        pins."""
        seen = listed_definitions(self.kind, items)
        digests = {name: listed for name, (listed, _) in seen.items()}
        if whole:
            self.listed[connection] = digests
        else:
            self.listed.setdefault(connection, {}).update(digests)
        if seen:
            await self._observe(seen, connection, whole)

    async def _observe(
        self, seen: dict[str, tuple[str, str]], connection: Upstream, complete: bool
    ) -> None:
        """Hold a list's definitions against the pins: nothing to do when each is the accepted
        one; else the database is asked (off the event loop) to pin or hold what is new, and
        says what is accepted now (an operator may have accepted a definition, here or on
        another replica). While it cannot be reached, the pins stay as they were (what is not
        as pinned stays refused)."""
        accepted = self.accepted
        if self._accepted_read and all(
            accepted.get(name) == listed for name, (listed, _) in seen.items()
        ):
            return
        try:
            found = await anyio.to_thread.run_sync(
                self.store.observe, self.server, self.kind, seen, self.mode, complete
            )
        except DatabaseUnavailable as e:
            log.warning(
                "%s pins of %s cannot be read (%s): %ss not as pinned are held",
                self.kind,
                self.server,
                e,
                self.kind,
            )
            return
        if found is None:  # nothing pinned yet: the first use is of the whole list
            await self.read_list(connection)
            return
        self.accepted, self._accepted_read = found, True

    async def now(self, name: str, change: PinChange, connection: Upstream) -> PinChange | None:
        """A call `change` refuses, looked at once more: one this upstream session's last list
        did not have is looked for in its list read now, since it may appear unannounced (a
        list upstream in place of the call a client would have had forwarded without pins),
        unless such a reading found nothing less than ``relist_seconds`` ago (so a caller
        naming what is not there cannot make each call cost a whole list upstream); then the
        database is asked (off the event loop), since an operator may have accepted the
        definition since, on another replica or the CLI."""
        if change.listed is None:
            now, missed_at = self.clock(), self._missed_at.get(connection)
            if missed_at is not None and now - missed_at < self.relist_seconds:
                return change
            self._missed_at[connection] = now  # calls meanwhile wait, whatever it finds
            await self.read_list(connection)
            if (change := self.change(name, connection)) is None or change.listed is None:
                return change
            self._missed_at.pop(connection, None)  # found: not a reading for nothing
        try:
            pinned = await anyio.to_thread.run_sync(self.store.pinned, self.server, self.kind, name)
        except DatabaseUnavailable:
            return change
        if pinned is not None:
            self.accepted[name] = pinned
        return pin_change(self.kind, pinned, change.listed)

    def forget(self, connection: Upstream) -> None:
        """``connection``'s list changed (the upstream said so): what it listed is not known,
        and the next call naming what it lacked reads it again at once."""
        self.listed.pop(connection, None)
        self._missed_at.pop(connection, None)
