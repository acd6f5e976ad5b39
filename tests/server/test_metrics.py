"""Decision counts (`bastion.server.metrics`): a batch counted at once gives the samples that
counting each of its decisions gives."""

from __future__ import annotations

from prometheus_client import generate_latest

from bastion.server.metrics import Metrics


def test_a_batch_counted_at_once_is_counted_as_each_of_its_decisions():
    seconds = [0.000004, 0.00002, 0.0003, 0.0000001, 0.7, 2.5, 0.00005, 0.00001]
    allowed = [True, False, True, True, False, False, True, True]
    one_by_one, at_once = Metrics(), Metrics()
    for each, yes in zip(seconds, allowed, strict=True):
        one_by_one.decision("authorize", "allow" if yes else "deny", each)
    one_by_one.decision("list", "deny", 0.001)
    at_once.decisions("authorize", sum(allowed), seconds)
    at_once.decisions("list", 0, [0.001])
    at_once.decisions("actions", 0, [])  # nothing decided: nothing counted
    assert generate_latest(at_once.registry) == generate_latest(one_by_one.registry)
    assert b'bastion_decisions_total{kind="authorize",result="allow"} 5.0' in generate_latest(
        at_once.registry
    )
