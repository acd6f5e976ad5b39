"""The OpenAPI document says exactly what a real `bastion serve` accepts and answers: schemathesis
(every check, the stateful phase included) against /v1/openapi.json finds no server error and no
difference between the document and the server. Bounded in examples and time, for CI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import find, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample

from bastion.server.openapi import NO_NUL, openapi_document
from tests.approvals.support import DELETE, REPORT, SEND, Holder
from tests.approvals.support import config as approvals_config
from tests.server.conftest import ADMIN_KEY, POLICY, ServerProcess

ROOT = Path(__file__).resolve().parents[2]
# A schema-valid request may still be refused by the policy in force (an undeclared entity type,
# an undefined predicate, a fact the policy cannot use, a policy that does not load): that is
# the 422 of the document, not a malformed request.
CONFIG = """
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]
"""


def served_with_approvals(tmp_path: Path, database: str) -> ServerProcess:
    """`bastion serve` on ``database`` with a gateway, so /v1/approvals has approvals to answer,
    and a few held calls and a held result for its links to lead to."""
    policy = tmp_path / "policy.polar"
    policy.write_text(POLICY)
    server = ServerProcess(database, tmp_path, str(policy))
    toml = tmp_path / "bastion.toml"
    toml.write_text(approvals_config(server.url, database, tmp_path / "keys"))
    server.env["BASTION_CONFIG"] = str(toml)
    server.start()
    holder = Holder(database, tmp_path / "keys", server.url)
    try:
        holder.hold(SEND)
        holder.hold(DELETE)
        holder.hold(REPORT, kind="review", result={"rows": [1, 2]})
    finally:
        holder.close()
    raise_alerts(database)
    return server


def raise_alerts(database: str) -> None:
    """Two alerts, for /v1/alerts's links to lead to."""
    from bastion.db import Database
    from bastion.facts.model import Entity
    from bastion.signals.alerts import Alerts, AlertSettings, AlertStore

    store = AlertStore(Database(database))
    try:
        alerts = Alerts(store, AlertSettings(), lambda: None, "http://bastion.test")
        alerts.raise_alert("bulk_delete", "high", Entity("Agent", "a1"), "d-1")
        alerts.raise_alert("refusal_burst", "medium", Entity("User", "sam"), "d-2")
    finally:
        store.db.close()


def test_schemathesis_finds_no_server_error_and_no_difference_from_the_document(
    tmp_path, database_url
):
    # On PostgreSQL too: what it refuses that SQLite takes (a NUL, an index entry too long, a
    # number past a 32-bit column) was a 500 there alone (tests/security/test_nul.py,
    # test_index_limits.py).
    server = served_with_approvals(tmp_path, database_url)
    try:
        # Oso Cloud's /api has a run of its own (tests/oso_cloud/test_openapi.py): within one
        # time budget, its operations would take examples from these.
        check_with_schemathesis(server, tmp_path, ["--exclude-path-regex", "^/api/"])
    finally:
        server.stop()


def check_with_schemathesis(
    server: ServerProcess,
    tmp_path: Path,
    filters: list[str] | None = None,
    phases: str = "examples,coverage,fuzzing,stateful",
) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    command = [
        str(Path(sys.executable).parent / "st"),
        "--config-file",
        str(config),
        "run",
        f"{server.url}/v1/openapi.json",
        "--checks",
        "all",
        "--phases",
        phases,
        "--header",
        f"Authorization: Bearer {ADMIN_KEY}",
        "--max-examples",
        "25",
        "--max-time",
        "60",
        "--seed",
        "9",
        "--workers",
        "1",
        "--generation-database",
        "none",
        "--no-color",
        *(filters or []),
    ]
    env = {
        **os.environ,
        # JSON lines bodies (facts import and export) are arrays of lines in the document.
        "SCHEMATHESIS_HOOKS": "tests.server.schemathesis_hooks",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0, report[-20000:]
    # The summary counts failures as "N failed"; a warning such as "Authentication failed: an
    # operation returned only 401/403" (an approval that the fuzzer never reaches) is no failure.
    summary = report.split("SUMMARY")[-1]
    assert " passed" in report and not re.search(r"\b\d+ failed\b", summary), report[-5000:]
    assert "Traceback" not in server.log.read_text()


def schemas(node, into: list[dict]) -> list[dict]:
    """Every schema object in ``node`` of the document (and some objects that hold them)."""
    if isinstance(node, dict):
        into.append(node)
        for value in node.values():
            schemas(value, into)
    elif isinstance(node, list):
        for value in node:
            schemas(value, into)
    return into


def test_the_document_says_no_string_or_key_may_hold_a_nul():
    """Every route refuses U+0000 (tests/security/test_nul.py): the document allows it nowhere,
    or schemathesis's requests with a NUL would be refused while the document allows them."""
    found = schemas(openapi_document(), [])
    strings = [s for s in found if s.get("type") == "string" or "string" in s.get("type", [])]
    assert strings and all({"pattern", "enum", "const"} & s.keys() for s in strings)
    objects = [s for s in found if s.get("type") == "object"]
    assert objects and all(
        s.get("additionalProperties") is False or "pattern" in s.get("propertyNames", {})
        for s in objects
    )
    patterns = {s["pattern"] for s in found if isinstance(s.get("pattern"), str)}
    assert NO_NUL in patterns and len(patterns) > 3
    for pattern in patterns:
        # A NUL is among the first characters Hypothesis tries: a pattern that allows one is
        # found out within these examples.
        with pytest.raises(NoSuchExample):
            find(
                st.from_regex(pattern, fullmatch=True),
                lambda text: "\x00" in text,
                settings=settings(max_examples=300, database=None),
            )
