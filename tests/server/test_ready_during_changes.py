"""/readyz and /metrics answer while a change holds the fact lock (a large import going in, a
purge): they read how many facts are held without waiting for it, as docs/operations.md says
a load balancer's health check must be answered then."""

from __future__ import annotations

import httpx

from tests.gateway.support import start


def test_readyz_and_metrics_answer_while_the_fact_lock_is_held(tmp_path):
    with start(tmp_path) as running:
        facts = running.app.state.replica.authz.facts
        held = len(facts)
        # The lock held as a change going in holds it.
        with facts._index.lock, httpx.Client(base_url=running.url, timeout=5) as http:
            ready = http.get("/readyz")
            metrics = http.get("/metrics")
        assert ready.status_code == 200 and ready.json()["facts"] == held > 0, ready.text
        assert metrics.status_code == 200, metrics.text
