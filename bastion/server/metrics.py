"""Prometheus metrics of one server process, in a registry of its own."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

_LATENCY_BUCKETS = (
    0.00001,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.05,
    0.25,
    1.0,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.decisions = Counter(
            "bastion_decisions_total",
            "Decisions made, by kind (authorize, list, actions, query) and result.",
            ["kind", "result"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "bastion_decision_seconds",
            "Time to evaluate a decision in process (not counting HTTP).",
            ["kind"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.writes = Counter(
            "bastion_writes_total",
            "Committed writes (facts or policy) made through this process.",
            ["kind"],
            registry=self.registry,
        )
        self.shadow = Counter(
            "bastion_shadow_would_total",
            "What shadow (monitor-only) rules would have done, not enforced: by rule and effect.",
            ["rule", "effect"],
            registry=self.registry,
        )
        self._children: dict[tuple[str, str], tuple] = {}
        self._facts = Gauge("bastion_facts", "Facts held in memory.", registry=self.registry)
        self._applied = Gauge(
            "bastion_changelog_applied_sequence",
            "Last change-log sequence applied by this process.",
            registry=self.registry,
        )
        self._lag = Gauge(
            "bastion_changelog_lag",
            "Changes known to be committed but not yet applied by this process.",
            registry=self.registry,
        )
        self._staleness = Gauge(
            "bastion_changelog_staleness_seconds",
            "Seconds since this process last confirmed it had applied every committed change.",
            registry=self.registry,
        )
        self._records_dropped = Gauge(
            "bastion_decision_records_dropped",
            "Gateway decision records dropped since start: more waited than"
            " decision_records_buffer while the database was unavailable.",
            registry=self.registry,
        )

    def decision(self, kind: str, result: str, seconds: float) -> None:
        """Count one decision and its evaluation time (label children are looked up once)."""
        children = self._children.get((kind, result))
        if children is None:
            children = (self.decisions.labels(kind, result), self.latency.labels(kind))
            self._children[(kind, result)] = children
        children[0].inc()
        children[1].observe(seconds)

    def shadow_fired(self, rule: str, effect: str) -> None:
        """Count one firing of a shadow rule (`bastion.signals.shadow`)."""
        self.shadow.labels(rule, effect).inc()

    def observe_state(
        self, facts: Callable[[], float], applied: Callable[[], float], lag: Callable[[], float]
    ) -> None:
        """Read these gauges at scrape time."""
        self._facts.set_function(facts)
        self._applied.set_function(applied)
        self._lag.set_function(lag)

    def observe_staleness(self, staleness: Callable[[], float]) -> None:
        self._staleness.set_function(staleness)

    def observe_records_dropped(self, dropped: Callable[[], float]) -> None:
        self._records_dropped.set_function(dropped)


async def metrics_endpoint(request: Request) -> Response:
    metrics: Metrics = request.app.state.metrics
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
