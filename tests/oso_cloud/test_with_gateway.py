"""With a gateway, agent events feed the gateway's own behaviour counters (an agent's calls
through the gateway and those its application reports add up), and raise its built-in
behaviour alerts."""

from __future__ import annotations

import time
import uuid

from oso_cloud import Oso, Value

from tests.gateway.support import start
from tests.waits import eventually


def test_events_count_in_the_gateways_counters_and_raise_its_alerts(tmp_path):
    signals = {"alerts": {"bulk_destructive_count": 2, "repeat_write_seconds": 0.05}}
    with start(tmp_path, signals=signals) as running:
        key, _ = running.app.state.keys.create("app", ["oso:events"], created_by="test")
        oso = Oso(url=running.url, api_key=key)
        name = f"bot-{uuid.uuid4().hex[:6]}"
        events = oso.for_agents(name, uuid.uuid4(), [Value("User", "sam")])
        counters = running.app.state.gateway.enforcer.behavior
        assert running.app.state.behavior is counters
        alerts = running.app.state.alerts
        written = []  # the raisings written as they came
        raise_alert = alerts.raise_alert
        alerts.raise_alert = lambda *args: written.append(args) or raise_alert(*args)
        for i in range(5):
            events.tool_call_request("drop_table", {"table": f"t{i}"}, destructive=True)
        figures = counters.figures(f"agent|{name}", time.time())
        assert figures["calls"]["minute"]["count"] == 5
        assert figures["destructive"]["minute"]["count"] == 5
        assert counters.figures("user|sam", time.time())["calls"]["minute"]["count"] == 5
        # The third destructive call within a minute is past bulk_destructive_count (2); the
        # fourth and fifth raise it again: counted in memory, written soon after.
        raised = [a for a in alerts.store.list() if a.name == "bulk_destructive"]
        assert [a.principal for a in raised] == [f'Agent{{"{name}"}}'] and len(written) == 1
        assert eventually(lambda: alerts.store.get(raised[0].id).count >= 3, every=0.02), (
            "the raisings counted again were not written"
        )
