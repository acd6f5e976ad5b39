"""``bastion signals set|clear|list`` on a real SQLite file, as an operator runs them: the write
goes through the change log as a signal fact; what the policy in force cannot hold, or what is
malformed, is refused with a message and exit status 2, and nothing is written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bastion.facts.model import Entity
from bastion.facts.store import FactStore
from tests.signals.test_api import POLICY


@pytest.fixture
def database(tmp_path):
    path = str(tmp_path / "bastion.db")
    store = FactStore.open(path)
    store.put_policy(POLICY)
    store.close()
    return path


def bastion(*args: str, config: str = "/nonexistent") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bastion.cli", "signals", *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "BASTION_CONFIG": config},
    )


def signals(database: str) -> list[tuple]:
    store = FactStore.open(database)
    try:
        return [f.fact for f in store.get(("signal", None, None, None, None, None))]
    finally:
        store.close()


def test_set_list_and_clear_a_signal(database):
    done = bastion(
        "set",
        "User:sam",
        "device_compliant",
        "false",
        "--source",
        "mdm",
        "--ttl",
        "60",
        "--database",
        database,
    )
    assert done.returncode == 0, done.stderr
    assert 'User{"sam"} device_compliant = false' in done.stdout
    [fact] = signals(database)
    assert fact[:5] == ("signal", Entity("User", "sam"), "device_compliant", False, "mdm")

    listed = bastion("list", "--subject", "User:sam", "--json", "--database", database)
    assert listed.returncode == 0, listed.stderr
    [signal] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert signal["value"] is False and signal["expires_at"] - signal["set_at"] == pytest.approx(
        60, abs=2
    )

    # Set again: replaced, not added.
    assert (
        bastion(
            "set", "User:sam", "device_compliant", "true", "--source", "mdm", "--database", database
        ).returncode
        == 0
    )
    assert [f[3] for f in signals(database)] == [True]

    cleared = bastion("clear", "User:sam", "--database", database)
    assert cleared.returncode == 0, cleared.stderr
    assert "cleared 1 signal" in cleared.stdout
    assert signals(database) == []


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("set", "User:sam", "device_compliant", "yes", "--source", "mdm"), "cannot hold"),
        (("set", "Printer:p1", "device_compliant", "true", "--source", "mdm"), "subject"),
        (("set", "sam", "device_compliant", "true", "--source", "mdm"), "Type:id"),
        (("set", "User:sam", "device compliant", "true", "--source", "mdm"), "name"),
        (("set", "User:sam", "device_compliant", "true", "--source", "m d m"), "source"),
    ],
)
def test_a_refused_signal_writes_nothing(database, args, words):
    done = bastion(*args, "--database", database)
    assert done.returncode == 2
    assert words in done.stderr
    assert signals(database) == []


def test_the_configured_maximum_ttl_holds_on_the_command_line_too(database, tmp_path):
    config = tmp_path / "bastion.toml"
    config.write_text("[signals.api]\nmax_ttl_seconds = 100\ndefault_ttl_seconds = 50\n")
    args = (
        "set",
        "User:sam",
        "device_compliant",
        "true",
        "--source",
        "mdm",
        "--database",
        database,
    )
    done = bastion(*args, "--ttl", "101", config=str(config))
    assert done.returncode == 2 and "from 1 to 100" in done.stderr
    assert signals(database) == []
    assert bastion(*args, "--ttl", "100", config=str(config)).returncode == 0
