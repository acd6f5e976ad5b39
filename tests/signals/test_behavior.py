"""Behaviour counters through a real bastion and the official MCP SDK client: a bulk-delete guard
holds further deletes once an agent has deleted too much in a minute, and results far above the
agent's baseline are masked and throttled; plus the counters' own arithmetic (sliding windows,
baselines) on a clock the test moves."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mcp.shared.exceptions import MCPError

from bastion.signals.behavior import BehaviorSettings, LocalBehavior, scope_keys
from tests.gateway.support import start

WRITE = "customers:read customers:write"

BULK = """
# More than 3 deletes a minute by one agent: the next ones wait for a person.
requires_approval(_user: User, "call", _tool: Tool) if
  context.annotations.destructiveHint = true and
  context.behavior.agent.destructive.minute.count >= 3;
"""

EXFILTRATION = """
# Searches returning far more than the agent's usual volume: emails masked, one call an hour.
far_above_baseline() if
  context.tool = "search_customers" and
  context.behavior.tool.bytes.minute.ratio > 4 and
  context.behavior.tool.bytes.minute.count > 600;
mask(_user: User, "call", _tool: Tool, "customers.*.email") if far_above_baseline();
rate_limit(_user: User, "call", _tool: Tool, 1, 3600) if far_above_baseline();
"""


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    with start(tmp_path_factory.mktemp("behavior"), policy_extra=BULK + EXFILTRATION) as r:
        yield r


async def attempt(client, seen, tool, arguments):
    try:
        result = await client.call_tool(tool, arguments)
        seen.setdefault("calls", []).append(("ok", result.content[0].text))
    except MCPError as e:
        seen.setdefault("calls", []).append(("error", e.error.data.get("reason")))


def records_for(bastion, target: str):
    bastion.flush()
    return [r for _, r in bastion.records.after(0, 100000) if r.target == target]


@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_after_the_threshold_of_deletes_in_a_minute_further_deletes_are_held(bastion, mode):
    async def script(client, seen):
        for n in range(5):
            await attempt(client, seen, "delete_customer", {"customer_id": f"c-{mode}-{n}"})
        # Reads go on: the guard is about destructive calls.
        await attempt(client, seen, "search_customers", {"query": "zzz"})

    seen = bastion.sdk("avery", "deskhttp", mode, script, WRITE)
    assert seen["calls"][:3] == [("ok", f"deleted c-{mode}-{n}") for n in range(3)]
    assert seen["calls"][3:5] == [("error", "approval_pending")] * 2
    assert seen["calls"][5][0] == "ok", seen["calls"]
    held = [
        r for r in records_for(bastion, 'Tool{"deskhttp/delete_customer"}') if r.result == "held"
    ]
    assert held, "the held deletes are recorded"
    # The record keeps the figure the policy read.
    figure = held[-1].context["behavior"]["agent"]["destructive"]["minute"]
    assert figure["count"] >= 3


def test_a_held_delete_never_reaches_the_upstream(bastion):
    before = len(bastion.recorder.messages())

    async def script(client, seen):
        for n in range(4):
            await attempt(client, seen, "delete_customer", {"customer_id": f"x-{n}"})

    seen = bastion.sdk("avery", "deskhttp", "legacy", script, WRITE)
    assert [c[0] for c in seen["calls"]] == ["ok", "ok", "ok", "error"]
    calls = [
        m["params"]["arguments"]["customer_id"]
        for m in bastion.recorder.messages()[before:]
        if m.get("method") == "tools/call" and m["params"]["name"] == "delete_customer"
    ]
    assert calls == ["x-0", "x-1", "x-2"]


def test_a_new_agent_of_the_same_user_starts_from_its_own_count(bastion):
    async def script(client, seen):
        await attempt(client, seen, "delete_customer", {"customer_id": "fresh-agent"})

    # Earlier tests' agents of avery deleted past the threshold; this agent has not.
    seen = bastion.sdk("avery", "deskhttp", "legacy", script, WRITE)
    assert seen["calls"] == [("ok", "deleted fresh-agent")]


def test_bytes_far_above_the_agents_baseline_mask_and_throttle(bastion):
    behavior = bastion.app.state.gateway.enforcer.behavior
    offset = [0.0]
    real = behavior.clock
    behavior.clock = lambda: real() + offset[0]
    # From the start of a minute: a key counted in less than half of its first window does
    # not seed its baseline with it.
    offset[0] = 60 - real() % 60 + 0.5
    try:

        async def script(client, seen):
            # A quiet minute: small answers teach the baseline.
            for _ in range(3):
                await attempt(client, seen, "search_customers", {"query": "zzz"})
            offset[0] += 120  # two minutes on: the quiet minute is a completed window
            # Then every customer, again and again, in one minute.
            for _ in range(6):
                await attempt(client, seen, "search_customers", {"query": ""})

        seen = bastion.sdk("avery", "deskhttp", "legacy", script, WRITE)
    finally:
        behavior.clock = real
    results = seen["calls"]
    assert all(kind == "ok" for kind, _ in results[:3])
    full = [json.loads(text) for kind, text in results[3:] if kind == "ok"]
    # The first full answers go out as the admin may see them (emails included) ...
    assert full[0]["customers"][0]["email"].endswith("@example.com")
    # ... until the volume is far above the baseline: then emails are masked ...
    masked = [f for f in full if f["customers"][0]["email"] == "[masked]"]
    assert masked, results
    # ... and the agent is throttled.
    assert ("error", "rate_limited") in results[3:]
    # Once masked, never unmasked again within the minute.
    first = full.index(masked[0])
    assert all(f["customers"][0]["email"] == "[masked]" for f in full[first:])


# -- the counters' arithmetic -------------------------------------------------------------------


def test_counts_slide_and_baselines_learn_from_completed_windows():
    now = [6000.0]  # the start of a minute, of ten minutes and of an hour
    b = LocalBehavior(BehaviorSettings(baseline_weight=0.5), clock=lambda: now[0])
    keys = scope_keys("sam", "agent-1", 'Tool{"desk/delete_customer"}')
    for n in range(4):
        b.observe(keys, refused=False, destructive=True, target="t", detail=f"arg{n}")
    figures = b.figures(keys[1], now[0])
    assert figures["destructive"]["minute"] == {"count": 4, "baseline": 0.0, "ratio": 4.0}
    assert figures["targets"]["minute"]["count"] == 1  # one tool
    assert b.figures(keys[2], now[0])["targets"]["minute"]["count"] == 4  # four arguments
    now[0] += 90  # half-way through the next minute: half the last one still counts
    figures = b.figures(keys[1], now[0])
    assert figures["destructive"]["minute"]["count"] == 2
    assert figures["destructive"]["minute"]["baseline"] == 4.0  # the first window seeds it
    now[0] += 60 * 5  # five quiet minutes: the baseline decays toward zero
    assert b.figures(keys[1], now[0])["destructive"]["minute"]["baseline"] < 0.5
    # The ten-minute and hour windows still hold the four calls.
    assert b.figures(keys[1], now[0])["calls"]["hour"]["count"] == 4


def test_a_key_first_counted_late_in_a_window_is_not_far_above_that_moment():
    """An agent first seen five seconds before ten minutes end, calling ten times a second
    before and after: its usual rate is not far above a baseline that those five seconds
    taught (it was, sixty times: the first window seeded the baseline with 50 calls). The next
    window, whole, seeds it; a key counted in most of its first window is scaled to a whole."""
    now = [600.0 * 100 - 5]
    b = LocalBehavior(clock=lambda: now[0])
    late, early = scope_keys("sam", "late", "t")[1], scope_keys("sam", "early", "t")[1]

    def calls(key: str, seconds: float) -> None:
        for _ in range(int(seconds * 10)):
            b.observe((key,), refused=False, destructive=False, target="t", detail="")
            now[0] += 0.1

    calls(late, 5 + 300)  # to the middle of the next window
    figure = b.figures(late, now[0])["calls"]["ten_minutes"]
    assert figure["baseline"] == 0.0  # not judged yet (the built-in spike needs a baseline)
    calls(late, 600)  # to the middle of the window after
    figure = b.figures(late, now[0])["calls"]["ten_minutes"]
    assert figure["baseline"] == pytest.approx(6000, abs=2) and 0.95 < figure["ratio"] < 1.05
    # First seen 200 s into a window, at one call a second: seeded as 600 calls, not 400.
    now[0] = 600.0 * 200 + 200
    for _ in range(400):
        b.observe((early,), refused=False, destructive=False, target="t", detail="")
        now[0] += 1
    assert b.figures(early, now[0])["calls"]["ten_minutes"]["baseline"] == pytest.approx(600)


def test_refusals_bytes_and_an_unknown_key_read_as_zero():
    now = [0.0]
    b = LocalBehavior(clock=lambda: now[0])
    keys = scope_keys("sam", "a", "T")
    b.observe(keys, refused=True, destructive=False, target="T", detail="")
    b.returned(keys, 1234)
    figures = b.figures(keys[0], now[0])
    assert figures["refusals"]["minute"]["count"] == 1
    assert figures["bytes"]["hour"]["count"] == 1234
    assert b.figures("user|nobody", now[0])["calls"]["minute"] == {
        "count": 0,
        "baseline": 0.0,
        "ratio": 0.0,
    }


def test_keys_and_targets_held_are_bounded():
    now = [0.0]
    b = LocalBehavior(BehaviorSettings(max_keys=3, max_targets=2), clock=lambda: now[0])
    for n in range(10):
        b.observe((f"agent|{n}",), refused=False, destructive=False, target="T", detail="")
    assert list(b._keys) == ["agent|7", "agent|8", "agent|9"]  # the oldest let go of
    # Past max_targets every call counts as a new target: an over-estimate, never an under one.
    for n in range(5):
        b.observe(("agent|x",), refused=False, destructive=False, target="same", detail="")
        b.observe(("agent|y",), refused=False, destructive=False, target=f"t{n}", detail="")
    assert b.figures("agent|x", now[0])["targets"]["minute"]["count"] == 1
    assert b.figures("agent|y", now[0])["targets"]["minute"]["count"] == 5


def _reference_figures(events, now, weight, c, seconds):
    """Counter ``c`` over windows of ``seconds`` at ``now``, from every message and result
    (``events``: time, calls, refusals, destructive, bytes, target) of one key, window by
    window: the definition the counters compute in O(1)."""
    index = int(now // seconds)
    first = int(events[0][0] // seconds)
    per_window: dict[int, list] = {}
    for at, *adds, target in events:
        counts = per_window.setdefault(int(at // seconds), [0, 0, 0, 0, set()])
        for i, n in enumerate(adds):
            counts[i] += n
        if target is not None:
            counts[4].add(target)

    def count(i):
        counts = per_window.get(i, [0, 0, 0, 0, set()])
        return len(counts[4]) if c == 4 else counts[c]

    # The completed windows. The first seeds the baseline, as a whole window's worth of the
    # share of it the key was counted in, if that is half or more; else the next one seeds it.
    share = ((first + 1) * seconds - events[0][0]) / seconds
    baseline, learned = 0.0, False
    for i in range(first, index):
        if learned:
            baseline = weight * count(i) + (1 - weight) * baseline
        elif i > first or share >= 0.5:
            baseline, learned = count(i) / (share if i == first else 1.0), True
    covered = 1 - (now - index * seconds) / seconds
    return count(index) + count(index - 1) * covered, baseline


@pytest.mark.parametrize("seed", range(10))
def test_counts_and_baselines_agree_with_their_definition_window_by_window(seed):
    import random

    rng = random.Random(seed)
    now = [rng.uniform(0, 1e6)]
    weight = rng.choice([0.2, 0.5, 1.0])
    b = LocalBehavior(BehaviorSettings(baseline_weight=weight), clock=lambda: now[0])
    keys = scope_keys("sam", "agent-1", 'Tool{"desk/search"}')
    events = []
    for _ in range(150):
        now[0] += rng.choice([0.5, 3, 20, 59, 61, 200, 599, 601, 1800, 3601])
        if rng.random() < 0.7:
            refused, destructive = rng.random() < 0.3, rng.random() < 0.3
            target = rng.choice("abcde")
            b.observe(keys[:2], refused, destructive, target=target, detail="")
            events.append((now[0], 1, int(refused), int(destructive), 0, target))
        else:
            size = rng.randrange(5000)
            b.returned(keys[:2], size)
            events.append((now[0], 0, 0, 0, size, None))
        at = now[0] + rng.choice([0, 10, 70, 700, 4000])
        figures = b.figures(keys[1], at)
        for c, name in enumerate(("calls", "refusals", "destructive", "bytes", "targets")):
            for window, seconds in (("minute", 60), ("ten_minutes", 600), ("hour", 3600)):
                count, baseline = _reference_figures(events, at, weight, c, seconds)
                figure = figures[name][window]
                assert figure["count"] == math.ceil(count - 1e-9), (name, window)
                assert figure["baseline"] == pytest.approx(baseline, rel=1e-6, abs=2e-3)


@pytest.mark.parametrize(
    "table",
    [
        {"baseline_weight": 0},
        {"baseline_weight": 1.5},
        {"baseline_weight": "high"},
        {"max_keys": 0},
        {"max_targets": -1},
        {"max_keys": 1.5},
        {"windows": 3},
    ],
)
def test_bad_behaviour_settings_are_refused_with_the_setting_named(table):
    with pytest.raises(ValueError, match="signals.behavior"):
        BehaviorSettings.from_table(table)


def test_default_behaviour_settings():
    assert BehaviorSettings.from_table({}) == BehaviorSettings(0.2, 100_000, 1_000)


def test_the_example_behaviour_policy_passes_its_own_tests():
    import subprocess
    import sys

    from tests.gateway.support import ROOT

    done = subprocess.run(
        [sys.executable, "-m", "bastion.cli", "policy", "test", "examples/behavior.polar"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed, 0 failed" in done.stdout


def test_the_view_makes_only_what_a_rule_reads_and_nothing_for_unknown_names():
    from bastion.policy.runtime import MISSING, context_value

    now = [0.0]
    b = LocalBehavior(clock=lambda: now[0])
    b.observe(scope_keys("sam", "a", "T"), refused=False, destructive=True, target="T", detail="")
    context = {"behavior": b.view("sam", "a", "T")}
    path = ("behavior", "agent", "destructive", "minute", "count")
    assert context_value(context, path) == 1
    for wrong in (
        ("behavior", "agents", "destructive", "minute", "count"),
        ("behavior", "agent", "deletes", "minute", "count"),
        ("behavior", "agent", "destructive", "1m", "count"),
    ):
        assert context_value(context, wrong) is MISSING
    # What the decision record keeps: the figure read, nothing else.
    assert json.loads(json.dumps(context)) == {
        "behavior": {
            "agent": {"destructive": {"minute": {"count": 1, "baseline": 0.0, "ratio": 1.0}}}
        }
    }


def test_a_view_read_by_index_makes_what_the_policy_lookup_makes():
    now = [0.0]
    b = LocalBehavior(clock=lambda: now[0])
    b.observe(scope_keys("sam", "a", "T"), refused=False, destructive=True, target="T", detail="")
    by_index, by_lookup = b.view("sam", "a", "T"), b.view("sam", "a", "T")
    figure = by_index["agent"]["destructive"]["minute"]
    assert figure == by_lookup.get("agent").get("destructive").get("minute")
    assert figure == {"count": 1, "baseline": 0.0, "ratio": 1.0}
    assert by_index["agent"]["destructive"]["minute"] is figure  # made once, then kept
    assert json.dumps(by_index) == json.dumps(by_lookup)
    with pytest.raises(KeyError):
        by_index["agents"]
    with pytest.raises(KeyError):
        by_index["agent"]["deletes"]
    with pytest.raises(KeyError):
        by_index["agent"]["destructive"]["1m"]
    assert by_index.get("agents", "absent") == "absent"
    assert json.dumps(by_index) == json.dumps(by_lookup)  # nothing made for a wrong name


def test_a_view_without_its_counters_refuses_the_rule_that_reads_it():
    from bastion.signals.behavior import BehaviorUnavailable, BehaviorView

    view = BehaviorView(None, scope_keys("sam", "a", "T"), 0.0)
    assert view.get("nonsense") is None  # not a scope: missing, like any absent field
    with pytest.raises(BehaviorUnavailable) as refused:
        view.get("agent")
    assert refused.value.reason == "behavior_unavailable"
    with pytest.raises(BehaviorUnavailable):
        view["agent"]  # as the built-in alerts read it


def test_signals_behavior_table_is_read_from_bastion_toml_and_checked(tmp_path):
    from bastion.server.config import ConfigError, ServerConfig

    path = tmp_path / "bastion.toml"
    path.write_text("[signals.behavior]\nbaseline_weight = 0.5\nmax_keys = 10\n")
    config = ServerConfig.load(path, env={})
    assert config.signals == {"behavior": {"baseline_weight": 0.5, "max_keys": 10}}
    path.write_text("[signals.behavior]\nmax_targets = 0\n")
    with pytest.raises(ConfigError, match="signals.behavior.max_targets must be a positive"):
        ServerConfig.load(path, env={})
    path.write_text("[signals]\nbehavior = 3\n")
    with pytest.raises(ConfigError, match=r"\[signals.behavior\] must be a table"):
        ServerConfig.load(path, env={})


def test_a_lazy_view_that_cannot_make_its_entries_is_refused_when_defined():
    import pytest

    from bastion.signals.behavior import _Lazy

    with pytest.raises(TypeError, match="_make"):

        class Nothing(_Lazy):  # no way to make an entry: never a view that answers nothing
            pass


def _figure_as_rounded(current, previous, baseline, covered):
    # The figure as it was computed with `round` on every value (before its short ways).
    count = math.ceil(current + previous * covered - 1e-9)
    base = round(baseline, 3)
    return {"count": count, "baseline": base, "ratio": round(count / max(base, 1.0), 3)}


_BASELINES = [
    0.0,
    -0.0,
    0,
    1,
    1.0,
    0.9995,
    0.99949,
    1.0004,
    1.0015,
    1.25,
    1.3337,
    2.5,
    1e-9,
    7,
    1e17,
]


@settings(max_examples=300, deadline=None)
@given(
    current=st.integers(0, 10**12),
    previous=st.integers(0, 10**12),
    baseline=st.one_of(
        st.sampled_from(_BASELINES),
        st.floats(0, 1e15, allow_nan=False),
        st.integers(0, 10**9),
    ),
    covered=st.floats(0, 1),
)
def test_a_figure_is_the_rounded_figure_value_and_type_alike(current, previous, baseline, covered):
    from bastion.signals.behavior import figure

    made = figure(current, previous, baseline, covered)
    wanted = _figure_as_rounded(current, previous, baseline, covered)
    assert json.dumps(made) == json.dumps(wanted)
    assert [type(v) for v in made.values()] == [type(v) for v in wanted.values()]
    assert math.copysign(1, made["baseline"]) == math.copysign(1, wanted["baseline"])
