"""Prometheus metrics of one server process, in a registry of its own."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from starlette.requests import Request
from starlette.responses import Response

from bastion.db import storage_full_report

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


class _DecisionCounts(Collector):
    """``bastion_decisions_total`` and ``bastion_decision_seconds``, counted in plain numbers on
    the event loop (where every decision is made) and turned into samples at scrape time: the
    client library's counter and histogram take a lock on each update, which cost a decision
    more than its evaluation."""

    def __init__(self) -> None:
        self.totals: dict[tuple[str, str], int] = {}
        # Requests answered in the protocol (`bastion.server.direct`).
        self.direct = 0
        # Gateway requests run from the protocol (`bastion.server.direct_gateway`).
        self.direct_gateway = 0
        # kind -> [count in each bucket (the last: over every bound), sum of seconds]
        self.latency: dict[str, list] = {}

    def count(self, kind: str, result: str, seconds: float) -> None:
        key = (kind, result)
        self.totals[key] = self.totals.get(key, 0) + 1
        latency = self._latency(kind)
        latency[0][bisect.bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        latency[1] += seconds

    def count_many(self, kind: str, allowed: int, seconds: list[float]) -> None:
        """``len(seconds)`` decisions, ``allowed`` of them allowed, each with its time."""
        if not seconds:
            return
        totals = self.totals
        for result, n in (("allow", allowed), ("deny", len(seconds) - allowed)):
            if n:
                totals[kind, result] = totals.get((kind, result), 0) + n
        counts, bucket = self._latency(kind)[0], bisect.bisect_left
        for each in seconds:
            counts[bucket(_LATENCY_BUCKETS, each)] += 1
        self.latency[kind][1] += sum(seconds)

    def _latency(self, kind: str) -> list:
        latency = self.latency.get(kind)
        if latency is None:
            latency = self.latency[kind] = [[0] * (len(_LATENCY_BUCKETS) + 1), 0.0]
        return latency

    def collect(self) -> Iterator[Metric]:
        totals = CounterMetricFamily(
            "bastion_decisions",
            "Decisions made, by kind (authorize, list, actions, query) and result.",
            labels=["kind", "result"],
        )
        for (kind, result), n in list(self.totals.items()):
            totals.add_metric([kind, result], n)
        yield totals
        yield CounterMetricFamily(
            "bastion_direct_answers",
            "Decision requests answered inside the HTTP protocol, all they needed in memory"
            " (the others go through the application).",
            value=self.direct,
        )
        yield CounterMetricFamily(
            "bastion_direct_gateway_requests",
            "Gateway POSTs to /mcp/<server> run from the HTTP protocol, past the application's"
            " middleware (the others go through the application).",
            value=self.direct_gateway,
        )
        latency = HistogramMetricFamily(
            "bastion_decision_seconds",
            "Time to evaluate a decision in process (not counting HTTP).",
            labels=["kind"],
        )
        bounds = [floatToGoString(b) for b in _LATENCY_BUCKETS] + ["+Inf"]
        for kind, (counts, total) in list(self.latency.items()):
            cumulative, running = [], 0
            for bound, n in zip(bounds, list(counts), strict=True):
                running += n
                cumulative.append((bound, running))
            latency.add_metric([kind], cumulative, total)
        yield latency


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # Counted on every decision: plain numbers, read at scrape time (`_DecisionCounts`).
        self._decisions = _DecisionCounts()
        self.registry.register(self._decisions)
        # decision(kind, result, seconds): count one decision and its evaluation time. The
        # counter's own method, so that each decision costs one call, not two.
        self.decision: Callable[[str, str, float], None] = self._decisions.count
        # decisions(kind, allowed, seconds): count a batch's decisions at once (`count_many`).
        self.decisions: Callable[[str, int, list[float]], None] = self._decisions.count_many
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
        self._records_unstorable = Gauge(
            "bastion_decision_records_unstorable",
            "Gateway decision records dropped since start because no write could store them.",
            registry=self.registry,
        )
        self._decision_log_dropped = Gauge(
            "bastion_decision_log_dropped",
            '/v1 decisions not written to the database (decision_log = "database") since start:'
            " more waited than decision_records_buffer while it was unavailable, or no write"
            " could store them.",
            registry=self.registry,
        )
        self._journal_failures = Gauge(
            "bastion_decision_journal_failures",
            "Decisions the journals could not take since start (a full disk, say): the gateway's,"
            ' and the decision service\'s with decision_log = "database".',
            registry=self.registry,
        )
        self._storage_full = Gauge(
            "bastion_storage_full",
            "1 while this process's writes are refused for want of room, until one goes in.",
            registry=self.registry,
        )
        self._storage_full.set_function(lambda: storage_full_report() is not None)

    def direct_answer(self) -> None:
        """Count one request answered in the protocol (`bastion.server.direct`)."""
        self._decisions.direct += 1

    def direct_gateway_request(self) -> None:
        """Count one gateway request run from the protocol (`bastion.server.direct_gateway`)."""
        self._decisions.direct_gateway += 1

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

    def observe_records_dropped(
        self, dropped: Callable[[], float], unstorable: Callable[[], float]
    ) -> None:
        self._records_dropped.set_function(dropped)
        self._records_unstorable.set_function(unstorable)

    def observe_journal_failures(self, failures: Callable[[], float]) -> None:
        self._journal_failures.set_function(failures)

    def observe_decision_log_dropped(self, dropped: Callable[[], float]) -> None:
        self._decision_log_dropped.set_function(dropped)


async def metrics_endpoint(request: Request) -> Response:
    metrics: Metrics = request.app.state.metrics
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
