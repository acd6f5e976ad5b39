"""The decision log of a process (`DecisionLog`): the last ``decision_log_size`` decisions, found
by their exact id, the oldest forgotten first."""

from __future__ import annotations

from bastion.server.api.decisions import DecisionLog
from bastion.server.keys import ApiKey


def keep(log: DecisionLog, n: int) -> list[str]:
    return [log.record("authorize", {"n": i}, True, i, 1, api="v1") for i in range(n)]


def test_every_decision_is_found_by_its_id_with_what_was_recorded():
    log = DecisionLog(10)
    ids = keep(log, 10)
    assert len(set(ids)) == 10
    for i, decision_id in enumerate(ids):
        record = log.get(decision_id)
        assert record is not None and record.id == decision_id
        assert (record.kind, record.request, record.result, record.seq) == (
            "authorize",
            {"n": i},
            True,
            i,
        )


def test_the_oldest_decisions_are_forgotten_first_and_the_last_size_kept():
    log = DecisionLog(7)
    ids = keep(log, 7 * 3 + 4)
    assert all(log.get(i) is None for i in ids[:-7])
    assert [log.get(i).request["n"] for i in ids[-7:]] == list(range(7 * 2 + 4, 7 * 3 + 4))
    assert all(log.made_here(i) for i in ids)


def test_only_the_exact_id_finds_a_decision():
    log = DecisionLog(100)
    ids = keep(log, 12)
    prefix, _, n = ids[6].rpartition("-")
    assert n == "7"
    for other in (
        f"{prefix}-007",
        f"{prefix}-+7",
        f"{prefix}- 7",
        f"{prefix}-7 ",
        f"{prefix}-7.0",
        f"{prefix}-1_1",  # int() reads it as 11
        f"{prefix}-0",
        f"{prefix}--5",
        f"{prefix}-107",  # the same slot of the ring, not made yet
        f"{prefix}-",
        f"{prefix}-{'9' * 5000}",
        f"other-{n}",
        n,
    ):
        assert log.get(other) is None, other
    assert log.get(f"{prefix}-7") is not None


def test_a_log_of_size_zero_keeps_nothing_but_still_names_each_decision():
    log = DecisionLog(0)
    ids = keep(log, 3)
    assert len(set(ids)) == 3
    assert all(log.get(i) is None and log.made_here(i) for i in ids)


def test_a_record_is_read_by_the_key_that_asked_for_it_and_by_admin_keys_only():
    def api_key(key_id: str, *scopes: str) -> ApiKey:
        return ApiKey(key_id, key_id, frozenset(scopes), 0.0, "test")

    log = DecisionLog(10)
    asked = log.get(log.record("authorize", {}, True, 1, 1, None, None, "k1", api="v1"))
    nobody = log.get(log.record("authorize", {}, True, 1, 1, api="v1"))
    assert asked is not None and nobody is not None and asked.asked_by == "k1"
    assert asked.readable_by(api_key("k1", "decide"))
    assert not asked.readable_by(api_key("k2", "decide", "facts:read", "authzen", "oso:read"))
    assert asked.readable_by(api_key("k2", "admin"))
    # A record no key asked for is read by admin keys only.
    assert not nobody.readable_by(api_key("k1", "decide"))
    assert nobody.readable_by(api_key("k2", "admin"))
