"""The /api paths of the OpenAPI document say exactly what a real `bastion serve` accepts and
answers: schemathesis (every check) finds no server error and no difference between the document
and the server."""

from __future__ import annotations

from tests.oso_cloud.conftest import POLICY
from tests.server.conftest import ServerProcess
from tests.server.test_openapi import check_with_schemathesis


def test_schemathesis_finds_no_server_error_in_the_oso_cloud_api(tmp_path):
    policy = tmp_path / "policy.polar"
    policy.write_text(POLICY)
    server = ServerProcess(str(tmp_path / "bastion.db"), tmp_path, str(policy)).start()
    try:
        # No stateful phase: no /api answer names something another operation takes.
        check_with_schemathesis(
            server, tmp_path, ["--include-path-regex", "^/api/"], "examples,coverage,fuzzing"
        )
    finally:
        server.stop()
