"""The in-memory fact index the policy engine reads: facts by predicate and by bound arguments.

Per predicate, a set of argument tuples answers "is this fact true?"; for each lookup shape the
compiled policy uses (which arguments are bound), a dict maps the bound values to the list of the
free ones. Shapes are built on first use and kept current on every write. Entities and strings
are interned, so a million facts over a few thousand entities share them; an entity's shared copy
is let go of once nothing refers to it any more (`FactIndex.let_go_of_released`), so the table
holds what the facts in force name, not every entity ever named.
"""

from __future__ import annotations

import heapq
import itertools
import sys
import threading
from collections.abc import Iterable, Iterator
from operator import itemgetter
from typing import Any

from bastion.facts.model import Entity
from bastion.turns import Turns

# `FactIndex.crowded_expiry` and `FactIndex.purge_expired` walk the expiries from the earliest.
INFINITY = float("inf")


def _key(values: tuple, positions: tuple[int, ...]) -> Any:
    if len(positions) == 1:
        return values[positions[0]]
    return tuple(values[i] for i in positions)


class Many(list):
    """Two or more free parts under one key. A key with one free part maps to it directly,
    which saves a list per key (most keys, such as a repository's parent, have one)."""

    __slots__ = ()


def _append(index: dict, key: Any, item: Any) -> None:
    found = index.get(key, index)
    if found is index:
        index[key] = item
    elif found.__class__ is Many:
        found.append(item)
    else:
        index[key] = Many((found, item))


def _discard(index: dict, key: Any, item: Any) -> None:
    found = index[key]
    if found.__class__ is not Many:
        del index[key]
        return
    found.remove(item)
    if len(found) == 1:
        index[key] = found[0]


def _getter(positions: tuple[int, ...]) -> Any:
    """`_key` for one set of positions, as a C callable where there is one."""
    if not positions:
        return lambda values: ()
    return itemgetter(*positions)


def _fill(index: dict, rows: Iterable[tuple], bound: tuple, free: tuple) -> None:
    """`_append` every row's free parts under its bound ones."""
    key, part = _getter(bound), _getter(free)
    get = index.get
    for values in rows:
        k, item = key(values), part(values)
        found = get(k, index)
        if found is index:
            index[k] = item
        elif found.__class__ is Many:
            found.append(item)
        else:
            index[k] = Many((found, item))


def _drop(index: dict, rows: list[tuple], bound: tuple, free: tuple, turns: Turns | None) -> None:
    """`_discard` every row's free parts from under its bound ones, with fewer steps per row: a
    key's `Many` is filtered once for all the rows under it, rather than searched for each (which
    made a key held by 200,000 facts cost seconds). With ``turns``, a tick after each `CHUNK`."""
    key, part = _getter(bound), _getter(free)
    several: dict[Any, set] = {}
    for chunk in _parts(rows, turns):
        for values in chunk:
            k = key(values)
            found = index[k]
            if found.__class__ is Many:
                items = several.get(k)
                if items is None:
                    items = several[k] = set()
                items.add(part(values))
            else:
                del index[k]  # its one fact
    for k, items in several.items():
        kept: list = []
        for chunk in _parts(index[k], turns):
            kept += [item for item in chunk if item not in items]
        if not kept:
            del index[k]
        else:
            index[k] = kept[0] if len(kept) == 1 else Many(kept)


def _parts(items: Any, turns: Turns | None) -> Iterable[Any]:
    """``items`` whole, or with ``turns`` a `CHUNK` at a time, a tick after each."""
    return (items,) if turns is None else turns.chunks(items)


def _by_pinned(rows: Iterable[tuple], pinned: tuple[int, ...]) -> dict[Any, list[tuple]]:
    """The rows by their values at the ``pinned`` positions (one value for one position)."""
    pick, out = itemgetter(*pinned), {}
    for values in rows:
        key = pick(values)
        found = out.get(key)
        if found is None:
            out[key] = [values]
        else:
            found.append(values)
    return out


def items_of(found: Any) -> Any:
    """The free parts stored under one key (see `Many`), as an iterable."""
    return found if found.__class__ is Many else (found,)


class PredicateFacts:
    """The facts of one predicate (name and arity), with their lookup indexes."""

    __slots__ = ("name", "arity", "all", "modes", "_positions", "_routes")

    def __init__(self, name: str, arity: int) -> None:
        self.name = name
        self.arity = arity
        self.all: set[tuple] = set()
        self.modes: dict[tuple, dict] = {}
        self._positions: dict[tuple, tuple] = {}
        # Which indexes a new fact goes to: per tuple of pinned positions, the pinned values ->
        # the (index, bound, free) triples that hold facts with those values.
        self._routes: dict[tuple[int, ...], dict[tuple, list[tuple]]] = {}

    def mode(self, mask: str, fixed: tuple[tuple[int, Any], ...] = ()) -> dict:
        """The index for lookups where ``mask[i] == "b"`` marks a bound argument.

        It maps the bound values (one value, or a tuple) to the free ones (one value or a tuple
        per fact; several facts under one key are held in a `Many`). ``fixed`` lists arguments
        that compiled code always asks about with one constant, as (position, value): the index
        then holds only the facts with those values, and they are left out of its keys.
        """
        shape = (mask, fixed)
        index = self.modes.get(shape)
        if index is None:
            pinned = tuple(p for p, _ in fixed)
            bound = tuple(i for i, m in enumerate(mask) if m == "b" and i not in pinned)
            free = tuple(i for i, m in enumerate(mask) if m != "b")
            self._positions[shape] = (bound, free, fixed)
            index = self.modes[shape] = {}
            wanted = tuple(v for _, v in fixed)
            for values in self.all:
                if tuple(values[p] for p in pinned) == wanted:
                    _append(index, _key(values, bound), _key(values, free))
            routes = self._routes.setdefault(pinned, {})
            routes.setdefault(wanted, []).append((index, bound, free))
        return index

    def _indexes_for(self, values: tuple) -> Iterator[tuple]:
        for pinned, routes in self._routes.items():
            yield from routes.get(tuple(values[p] for p in pinned), ())

    def add(self, values: tuple) -> bool:
        if values in self.all:
            return False
        self.all.add(values)
        for index, bound, free in self._indexes_for(values):
            _append(index, _key(values, bound), _key(values, free))
        return True

    def add_many(self, rows: Iterable[tuple]) -> set[tuple]:
        """Add many argument tuples at once; return those that were new (read only: `all` itself
        when it was empty). The same as `add` for each, with fewer steps per fact."""
        if self.all:
            new = set(rows)
            new.difference_update(self.all)
            self.all.update(new)
            ordered: Iterable[tuple] = new
        else:
            # Hashed once: the new facts are all of them.
            rows = rows if isinstance(rows, list) else list(rows)
            self.all.update(rows)
            new = self.all
            # The indexes are filled in the order the tuples were made (as a snapshot lists
            # them) rather than the set's: the tuples then lie one after another in memory,
            # which makes the filling below about a third faster at 1 M facts.
            ordered = rows if len(new) == len(rows) else new
        if not new:
            return set()
        for pinned, routes in self._routes.items():
            if pinned:
                by_pinned = _by_pinned(ordered, pinned)  # the new facts, in one pass
            for wanted, indexes in routes.items():
                if pinned:
                    selected = by_pinned.get(wanted[0] if len(pinned) == 1 else wanted, ())
                else:
                    selected = ordered
                for index, bound, free in indexes:
                    _fill(index, selected, bound, free)
        return new

    def remove(self, values: tuple) -> bool:
        if values not in self.all:
            return False
        self.all.discard(values)
        for index, bound, free in self._indexes_for(values):
            _discard(index, _key(values, bound), _key(values, free))
        return True

    def remove_many(self, rows: Iterable[tuple], turns: Turns | None = None) -> set[tuple]:
        """Remove many argument tuples at once; return those that were held. The same as
        `remove` for each, with fewer steps per fact: taken out of each lookup index together
        (`_drop`), or, when more go than stay, each index emptied and filled again with those
        that stay. With ``turns``, no C call is handed more than a `CHUNK` of them."""
        held, gone = self.all, set()
        for chunk in _parts(rows if isinstance(rows, list) else list(rows), turns):
            found = held.intersection(chunk)
            held.difference_update(found)
            gone |= found
        if not gone or not self._routes:
            return gone
        refill = len(gone) > len(held)
        changed = list(held if refill else gone)
        for pinned, routes in self._routes.items():
            if pinned:
                by_pinned = _by_pinned(changed, pinned)
            for wanted, indexes in routes.items():
                if pinned:
                    selected = by_pinned.get(wanted[0] if len(pinned) == 1 else wanted, [])
                else:
                    selected = changed
                for index, bound, free in indexes:
                    if refill:
                        if turns is None:
                            index.clear()
                        else:
                            turns.empty(index)
                        for chunk in _parts(selected, turns):
                            _fill(index, chunk, bound, free)
                    elif selected:
                        _drop(index, selected, bound, free, turns)
        return gone

    def candidates(self, args: tuple) -> list[tuple]:
        """Argument tuples that may fit ``args`` (``None`` = any): read from the existing index
        that binds the most of them, or every fact when none fits."""
        best, best_bound = None, 0
        for shape, (bound, _free, fixed) in self._positions.items():
            if any(args[p] is None or args[p] != v for p, v in fixed):
                continue
            if any(args[p] is None for p in bound):
                continue
            if len(bound) + len(fixed) > best_bound:
                best, best_bound = shape, len(bound) + len(fixed)
        if best is None:
            return list(self.all)
        bound, free, fixed = self._positions[best]
        found = self.modes[best].get(_key(args, bound)) if bound else self.modes[best].get(())
        rows = []
        for hit in () if found is None else items_of(found):
            row = list(args)
            for i, v in zip(free, (hit,) if len(free) == 1 else hit, strict=True):
                row[i] = v
            for p, v in fixed:
                row[p] = v
            rows.append(tuple(row))
        return rows


class CopiedRows:
    """Every fact an index held, as `FactIndex.rows` copied them under its lock: per predicate
    with facts, (name, arity, its argument tuples); and every fact's expiry."""

    __slots__ = ("held", "expiry")

    def __init__(self, held: list[tuple[str, int, set[tuple]]], expiry: dict[tuple, float]):
        self.held = held
        self.expiry = expiry

    def grouped(self) -> list[tuple[str, int, set[tuple], dict[tuple, float]]]:
        """(name, arity, argument tuples, their expiries) per predicate: the expiries sorted by
        predicate in Python, a step a fact that expires, which is why not under the lock."""
        expiries: dict[tuple, dict[tuple, float]] = {}
        for fact, at in self.expiry.items():
            expiries.setdefault((fact[0], len(fact) - 1), {})[fact[1:]] = at
        return [
            (name, arity, rows, expiries.get((name, arity), {})) for name, arity, rows in self.held
        ]


GENERATIONS = itertools.count(1)

# References to an entity's shared copy when nothing else holds it, as
# `FactIndex.let_go_of_released` counts them: the table's key and value, the set of those
# released, that loop's name for it, and the count's own argument.
_HELD_BY_NOTHING = 5


class FactIndex:
    """All facts in memory. Every read and write holds ``lock`` (not re-entrant), so a batch of
    writes is seen whole or not at all."""

    def __init__(self) -> None:
        self.predicates: dict[tuple[str, int], PredicateFacts] = {}
        self.lock = threading.Lock()
        self._interned: dict[Any, Any] = {}
        # Shared entities that removed facts named: let go of by `let_go_of_released` if
        # nothing refers to them any more.
        self._released: set[Entity] = set()
        # When each fact that expires does; and by expiry, the facts given it (one, or a `Many`;
        # one given another expiry since, or removed, is left there until it is due), with a heap
        # of those expiries: facts that share one are one entry, taken out together.
        self._expiry: dict[tuple, float] = {}
        self._expiring: dict[float, Any] = {}
        self._expiry_times: list[float] = []
        self.next_expiry = INFINITY
        # `crowded_expiry`'s last answer, and the limit it answers for (-1: none since the
        # expiries changed).
        self._crowded: tuple[int, float] = (-1, INFINITY)
        self._entity_types: dict[str, dict[Entity, int]] | None = None
        self.count = 0
        # Renewed by every change to the facts (and by a new policy), from a counter shared by
        # every index in the process: equal generations, same index and same answers. Lets
        # callers keep what they derived from the facts until the next change.
        self.generation = next(GENERATIONS)

    def predicate(self, name: str, arity: int) -> PredicateFacts:
        key = (name, arity)
        pf = self.predicates.get(key)
        if pf is None:
            pf = self.predicates[key] = PredicateFacts(name, arity)
        return pf

    def shared(self, facts: list[tuple], turns: Turns | None = None) -> list[tuple]:
        """``(fact, expires_at)`` pairs with each value as `intern` would store it, made without
        the lock (on a worker thread, in ``turns``): an entity the index holds already is that
        object; another is made once for all of ``facts``, but not entered in the index's table
        (as with `add_rows`). For `add_all` with ``shared``."""
        # Each entity and string met so far, as shared (the entities new to the index made
        # there too): a lookup, not a call, for most values. Of those two classes only: an int
        # and a bool can be equal, and are kept as they are.
        known, seen = self._interned, {}
        out = []
        for fact, expires_at in facts:
            values = [fact[0]]
            for v in fact[1:]:
                if v.__class__ is Entity or v.__class__ is str:
                    found = seen.get(v)
                    if found is None:
                        found = seen[v] = _share(v, known, seen)
                    values.append(found)
                else:
                    values.append(_share(v, known, seen))
            out.append((tuple(values), expires_at))
            if turns is not None:
                turns.tick()
        return out

    def intern(self, value: Any) -> Any:
        """The shared copy of an entity or string, so that equal values are stored once."""
        return _share(value, self._interned, self._interned)

    # -- writes (callers hold the lock) -----------------------------------------------------

    def add(self, fact: tuple, expires_at: float | None = None) -> bool:
        values = tuple(self.intern(v) for v in fact[1:])
        added = self.predicate(fact[0], len(values)).add(values)
        self.generation = next(GENERATIONS)
        if added:
            self.count += 1
            self._count_entities(values, +1)
        full = (fact[0], *values)
        if expires_at is not None:
            self._expiry[full] = expires_at
            self._expire([(full, expires_at)])
        elif full in self._expiry:
            del self._expiry[full]  # re-inserted without an expiry: it no longer expires
        return added

    def add_all(self, inserts: list[tuple[tuple, float | None]], shared: bool = False) -> int:
        """`add` for each ``(fact, expires_at)`` pair, in order, with fewer steps per fact: the
        facts of each predicate are added together (`PredicateFacts.add_many`), and the
        expiries set (or, for a fact given again without one, taken away) in the pairs' order.
        ``shared``: the values are shared already (`shared`). Returns how many facts were new.
        The caller holds the lock."""
        intern = self.intern
        by_predicate: dict[tuple[str, int], list[tuple]] = {}
        # The facts as stored, with their expiries, if any expiry is to be set or taken away.
        timed: list[tuple[tuple, float | None]] | None = (
            [] if self._expiry or any(at is not None for _, at in inserts) else None
        )
        for fact, at in inserts:
            values = fact[1:] if shared else tuple(map(intern, fact[1:]))
            rows = by_predicate.get((fact[0], len(values)))
            if rows is None:
                rows = by_predicate[fact[0], len(values)] = []
            rows.append(values)
            if timed is not None:
                timed.append((fact if shared else (fact[0], *values), at))
        added = 0
        for (name, arity), rows in by_predicate.items():
            new = self.predicate(name, arity).add_many(rows)
            added += len(new)
            if self._entity_types is not None:
                for values in new:
                    self._count_entities(values, +1)
        self.count += added
        self.generation = next(GENERATIONS)
        if timed is not None:
            expiry, pushes = self._expiry, []
            for full, at in timed:
                if at is not None:
                    expiry[full] = at
                    pushes.append((full, at))
                else:
                    expiry.pop(full, None)  # given again without an expiry: it no longer expires
            if pushes:
                self._expire(pushes)
        return added

    def _expire(self, pairs: Iterable[tuple[tuple, float]]) -> None:
        """Note when each ``(fact, expires_at)`` expires, as `purge_expired` finds them (the
        caller sets `_expiry`)."""
        expiring, times, new = self._expiring, self._expiry_times, []
        self._crowded = (-1, INFINITY)
        for full, at in pairs:
            found = expiring.get(at)
            if found is None:
                expiring[at] = full
                new.append(at)
            elif found.__class__ is Many:
                found.append(full)
            else:
                expiring[at] = Many((found, full))
        if len(new) < len(times) // 8:  # a few into many (one part of a fill, say)
            for at in new:
                heapq.heappush(times, at)
        elif new:
            times += new
            heapq.heapify(times)
        if times:
            self.next_expiry = times[0]

    def add_rows(
        self,
        name: str,
        arity: int,
        rows: Iterable[tuple],
        expiries: dict[tuple, float] | None = None,
    ) -> int:
        """`add` for many argument tuples of one predicate, whose values already share their
        objects (as a snapshot's do). Their entities are not entered in the interning table
        (20 bytes a fact at 1 M facts): a later write of a fact naming one stores its own copy.
        ``expiries`` maps some of the tuples to when they expire. Returns how many were new.
        The caller holds the lock."""
        new = self.predicate(name, arity).add_many(rows)
        self.generation = next(GENERATIONS)
        self.count += len(new)
        if self._entity_types is not None:
            for values in new:
                self._count_entities(values, +1)
        if expiries:
            pairs = [((name, *values), at) for values, at in expiries.items()]
            self._expiry.update(pairs)
            self._expire(pairs)
        return len(new)

    def rows(self) -> CopiedRows:
        """A copy of every predicate's argument tuples and of the expiries, in one C call each
        (`CopiedRows.grouped` sorts them, without the lock). The caller holds the lock."""
        return CopiedRows(
            [
                (name, arity, pf.all.copy())
                for (name, arity), pf in self.predicates.items()
                if pf.all
            ],
            self._expiry.copy(),
        )

    def fill_from(self, other: FactIndex, turns: Turns) -> None:
        """Every fact of ``other``, with its expiry, into this index, which nothing reads yet (a
        copy built on a worker thread, `Authorizer.copy`): ``other``'s lock is held only while
        its facts are copied out (`rows`: one C call a predicate, and one for its expiries), and
        they are added a `CHUNK` at a time. A fact expired but not yet purged there is copied,
        and purged here as there."""
        with other.lock:
            rows = other.rows()
            interned = other._interned.copy()
        with self.lock:
            self._interned.update(interned)
            for name, arity, held, expiries in rows.grouped():
                for chunk in turns.chunks(held):
                    self.add_rows(name, arity, chunk)
                if expiries:
                    self.add_rows(name, arity, (), expiries)

    def let_go(self, turns: Turns) -> None:
        """Empty this index a part at a time (`Turns.empty`), on a worker thread beside an event
        loop: freed in one go, a million facts hold the GIL for a third of a second. Only for
        an index nothing reads any more: a read meanwhile would find facts missing. It holds
        no fact afterwards."""
        for pf in self.predicates.values():
            for index in pf.modes.values():
                turns.empty(index)
            turns.empty(pf.all)
        for each in (
            self._interned,
            self._released,
            self._expiry,
            self._expiring,
            self._expiry_times,
        ):
            turns.empty(each)
        self.count, self.next_expiry, self._entity_types = 0, INFINITY, None
        self._crowded = (-1, INFINITY)
        self.generation = next(GENERATIONS)

    def remove(self, fact: tuple) -> bool:
        pf = self.predicates.get((fact[0], len(fact) - 1))
        if pf is None or not pf.remove(tuple(fact[1:])):
            return False
        self.generation = next(GENERATIONS)
        self.count -= 1
        self._count_entities(fact[1:], -1)
        self._expiry.pop(fact, None)
        self._release(fact)
        return True

    def remove_all(self, facts: list[tuple], turns: Turns | None = None) -> int:
        """`remove` for each fact, with fewer steps per fact: the facts of each predicate are
        removed together (`PredicateFacts.remove_many`). Returns how many were held. With
        ``turns`` (on a worker thread, the lock held), a tick after each `CHUNK`, so that no
        C call holds the GIL long. The caller holds the lock."""
        facts = facts if isinstance(facts, list) else list(facts)
        by_predicate: dict[tuple[str, int], list[tuple]] = {}
        for chunk in _parts(facts, turns):
            for fact in chunk:
                rows = by_predicate.get((fact[0], len(fact) - 1))
                if rows is None:
                    rows = by_predicate[fact[0], len(fact) - 1] = []
                rows.append(fact[1:])
        removed, named = 0, set()
        for (name, arity), rows in by_predicate.items():
            pf = self.predicates.get((name, arity))
            if pf is None:
                continue
            gone = list(pf.remove_many(rows, turns))
            removed += len(gone)
            if self._entity_types is not None:
                for chunk in _parts(gone, turns):
                    for values in chunk:
                        self._count_entities(values, -1)
            for i in range(arity):
                for chunk in _parts(gone, turns):
                    named.update(map(itemgetter(i), chunk))
            if turns is not None:
                # What only these lists held, let go of a part at a time too.
                turns.empty(gone)
                turns.empty(rows)
        # Only facts held have an expiry: each fact given that has one was removed.
        pop = self._expiry.pop
        for chunk in _parts(facts, turns):
            for fact in chunk:
                pop(fact, None)
        interned, released = self._interned, self._released
        for chunk in _parts(list(named), turns):
            for value in chunk:
                if value.__class__ is Entity and (shared := interned.get(value)) is not None:
                    released.add(shared)
        if removed:
            self.count -= removed
            self.generation = next(GENERATIONS)
        return removed

    def _release(self, fact: tuple) -> None:
        """Note the shared entities ``fact`` names, for `let_go_of_released`."""
        interned = self._interned
        for value in fact[1:]:
            if value.__class__ is Entity and (shared := interned.get(value)) is not None:
                self._released.add(shared)

    def let_go_of_released(self) -> int:
        """Forget the shared copy of each entity that removed facts named and that nothing
        refers to any more (no fact, lookup index, expiry, compiled policy, or caller); return
        how many. The caller holds the lock, and none of the removed facts' tuples. One still
        referred to stays (until a fact naming it is removed again): an entity found equal to
        it later is shared with what holds it."""
        released, self._released = self._released, set()
        interned, count = self._interned, sys.getrefcount
        gone = 0
        for entity in released:
            if count(entity) <= _HELD_BY_NOTHING:
                del interned[entity]
                gone += 1
        return gone

    def purge_expired(self, now: float, turns: Turns | None = None) -> int:
        """Remove facts whose expiry has passed, together (`remove_all`); return how many. With
        ``turns`` (on a worker thread), a tick after each `CHUNK`. The caller holds the lock."""
        times, expiring, expiry = self._expiry_times, self._expiring, self._expiry
        self._crowded = (-1, INFINITY)
        due: list[tuple] = []
        while times and times[0] <= now:
            at = heapq.heappop(times)
            for chunk in _parts(items_of(expiring.pop(at)), turns):
                for fact in chunk:
                    if expiry.get(fact) == at:
                        due.append(fact)
                    else:
                        # Removed, or given another expiry, since: its entry here held its
                        # entities until now.
                        self._release(fact)
        self.next_expiry = times[0] if times else INFINITY
        removed = self.remove_all(due, turns) if due else 0
        fact = chunk = None  # no reference of this frame's keeps the facts' entities
        if turns is not None:
            turns.empty(due)
        else:
            del due
        self.let_go_of_released()
        return removed

    def crowded_expiry(self, limit: int) -> float:
        """The earliest time by which more than ``limit`` facts will have expired (counting
        those given another expiry or removed since), or infinity: the expiries are walked
        from the earliest, at most ``limit + 1`` of them, once until the expiries change (a
        replica asks at every turn of its follower). The caller holds the lock."""
        if self._crowded[0] == limit:
            return self._crowded[1]
        at = self._crowded_expiry(limit)
        self._crowded = (limit, at)
        return at

    def _crowded_expiry(self, limit: int) -> float:
        times, expiring = self._expiry_times, self._expiring
        count, frontier = 0, [(times[0], 0)] if times else []
        while frontier:
            at, i = heapq.heappop(frontier)
            found = expiring[at]
            count += len(found) if found.__class__ is Many else 1
            if count > limit:
                return at
            for child in (2 * i + 1, 2 * i + 2):
                if child < len(times):
                    heapq.heappush(frontier, (times[child], child))
        return INFINITY

    def expiry_of(self, fact: tuple) -> float | None:
        return self._expiry.get(fact)

    # -- reads ------------------------------------------------------------------------------

    def matching(self, pattern: tuple) -> Iterator[tuple]:
        """Facts that fit ``pattern`` (``None`` is a wildcard), using an index when one fits."""
        name, args = pattern[0], tuple(pattern[1:])
        pf = self.predicates.get((name, len(args)))
        if pf is None:
            return iter(())
        if None not in args:
            return iter([(name, *args)] if args in pf.all else [])
        return ((name, *values) for values in pf.candidates(args) if _fits(values, args))

    def __iter__(self) -> Iterator[tuple]:
        for (name, _), pf in list(self.predicates.items()):
            for values in list(pf.all):
                yield (name, *values)

    def entities_of(self, types: frozenset[str]) -> list[Entity]:
        """Every entity of the given types that appears in some fact. The caller holds the lock."""
        if self._entity_types is None:
            self._entity_types = {}
            for pf in self.predicates.values():
                for values in pf.all:
                    self._count_entities(values, +1)
        return [e for t in types for e in self._entity_types.get(t, ())]

    def _count_entities(self, values: Iterable[Any], delta: int) -> None:
        by_type = self._entity_types
        if by_type is None:
            return
        for v in values:
            if isinstance(v, Entity):
                counts = by_type.setdefault(v.type, {})
                n = counts.get(v, 0) + delta
                if n > 0:
                    counts[v] = n
                else:
                    counts.pop(v, None)


def _share(value: Any, known: dict, made: dict) -> Any:
    """``value`` as the index stores it: an entity as the one in ``known``, else in ``made``
    (entered there, its parts interned, if new); a string interned."""
    if isinstance(value, Entity):
        found = known.get(value)
        if found is None:
            found = made.get(value)
            if found is None:
                found = Entity(sys.intern(value.type), sys.intern(value.id))
                made[found] = found
        return found
    if isinstance(value, str):
        return sys.intern(value)
    return value


def _fits(values: tuple, args: tuple) -> bool:
    return all(a is None or a == v for a, v in zip(args, values, strict=True))
