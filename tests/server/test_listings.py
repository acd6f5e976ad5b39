"""Every listing reads its ``limit`` the same way, in the API and on the command line, with one
bound for both."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from bastion.cli import build_parser
from bastion.server.app import create_app
from bastion.server.config import ServerConfig
from tests.approvals.support import config, store_policy_and_facts
from tests.server.conftest import ADMIN_KEY

# Each listing, the most it returns, and the command line that lists the same.
LISTINGS = [
    ("/v1/facts", 1000, None),
    ("/v1/approvals", 200, ["approvals", "list"]),
    ("/v1/signals", 1000, ["signals", "list"]),
    ("/v1/alerts", 500, ["alerts", "list"]),
    ("/v1/tasks", 500, ["tasks", "list"]),
]
NOT_WHOLE_NUMBERS = ["0", "-1", "+5", " 5", "5 ", "1_0", "5.0", "1e2", "\u0665", "x", ""]


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """An app with a gateway configured, which approvals come with."""
    tmp = tmp_path_factory.mktemp("listings")
    database = f"sqlite:///{tmp / 'bastion.db'}"
    path = tmp / "bastion.toml"
    path.write_text(config("http://127.0.0.1:1", database, tmp / "keys"))
    store_policy_and_facts(database)
    settings = ServerConfig.load(path, env={"BASTION_ADMIN_KEY": ADMIN_KEY})
    with TestClient(create_app(settings)) as client:
        client.headers["authorization"] = f"Bearer {ADMIN_KEY}"
        yield client


@pytest.mark.parametrize(("path", "most", "command"), LISTINGS)
def test_a_listing_takes_a_limit_from_1_to_its_most_and_refuses_anything_else(
    api, path, most, command
):
    for good in ("1", str(most), "007"):
        r = api.get(path, params={"limit": good})
        assert r.status_code == 200, (good, r.text)
    for bad in [*NOT_WHOLE_NUMBERS, str(most + 1), "9" * 5000]:
        r = api.get(path, params={"limit": bad})
        assert r.status_code == 400, (bad, r.text)
        assert f"limit must be a whole number from 1 to {most}" in r.json()["detail"]


@pytest.mark.parametrize(("path", "most", "command"), [x for x in LISTINGS if x[2]])
def test_a_command_lines_limit_is_its_listings_bound(path, most, command, capsys):
    assert build_parser().parse_args([*command, "--limit", str(most)]).limit == most
    assert build_parser().parse_args(command).limit == 100
    for bad in [*NOT_WHOLE_NUMBERS, str(most + 1)]:
        with pytest.raises(SystemExit) as ended:
            build_parser().parse_args([*command, "--limit", bad])
        assert ended.value.code == 2
        assert f"give a whole number from 1 to {most}" in capsys.readouterr().err
