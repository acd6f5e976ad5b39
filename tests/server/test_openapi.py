"""The OpenAPI document says exactly what a real `bastion serve` accepts and answers: schemathesis
(every check, the stateful phase included) against /v1/openapi.json finds no server error and no
difference between the document and the server. Bounded in examples and time, for CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.server.conftest import ADMIN_KEY

ROOT = Path(__file__).resolve().parents[2]
# A schema-valid request may still be refused by the policy in force (an undeclared entity type,
# an undefined predicate, a fact the policy cannot use, a policy that does not load): that is
# the 422 of the document, not a malformed request.
CONFIG = """
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]
"""


def test_schemathesis_finds_no_server_error_and_no_difference_from_the_document(serve, tmp_path):
    server = serve(str(tmp_path / "bastion.db"))
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
        "examples,coverage,fuzzing,stateful",
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
    assert " passed" in report and "failed" not in report.split("SUMMARY")[-1], report[-5000:]
    assert "Traceback" not in server.log.read_text()
