"""`bastion COMMAND ...` is parsed with the module of COMMAND alone (bastion/cli.py, `COMMANDS`)."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.cli import COMMAND_MODULES, COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]


def commands_of(module: str) -> set[str]:
    """What ``module`` registers: its commands, and each sub-command of a command it adds to
    (or makes) that another module adds to as well."""
    sub = argparse.ArgumentParser().add_subparsers()
    importlib.import_module(module).register(sub)
    found = set()
    for command, parser in sub.choices.items():
        shared = sum(command in _registered(other) for other in COMMAND_MODULES if other != module)
        if not shared:
            found.add(command)
            continue
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                found.update(f"{command} {name}" for name in action.choices)
    return found


def _registered(module: str) -> set[str]:
    sub = argparse.ArgumentParser().add_subparsers()
    importlib.import_module(module).register(sub)
    return set(sub.choices)


def test_the_table_names_the_module_that_registers_each_command():
    table = {}
    for module in COMMAND_MODULES:
        for command in commands_of(module):
            assert command not in table, f"{command!r} is registered by two modules"
            table[command] = module
    assert table == COMMANDS


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_parses_with_its_own_module_alone(command):
    words = command.split()
    with pytest.raises(SystemExit) as done:
        build_parser(words).parse_args([*words, "--help"])
    assert done.value.code == 0


def test_help_of_a_command_several_modules_add_to_names_all_its_sub_commands(capsys):
    with pytest.raises(SystemExit):
        build_parser(["policy", "--help"]).parse_args(["policy", "--help"])
    shown = capsys.readouterr().out
    assert all(c.split()[1] in shown for c in COMMANDS if c.startswith("policy "))


def test_a_word_that_is_no_command_is_refused_naming_every_command(capsys):
    with pytest.raises(SystemExit) as done:
        build_parser(["nosuch"]).parse_args(["nosuch"])
    assert done.value.code == 2
    refused = capsys.readouterr().err
    assert all(repr(command.split()[0]) in refused for command in COMMANDS)


def test_checking_a_policy_imports_neither_the_server_nor_the_gateway():
    """Starting `bastion policy check` costs the policy package, not every command's modules
    (most of a second of CPU more when it imported them all)."""
    script = (
        "import json, sys\n"
        "from bastion.cli import main\n"
        f"status = main(['policy', 'check', {str(ROOT / 'examples' / 'gitclub.polar')!r}])\n"
        "print(json.dumps([status, sorted(sys.modules)]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert done.returncode == 0, done.stderr
    status, modules = json.loads(done.stdout.splitlines()[-1])
    assert status == 0
    assert "bastion.policy.commands" in modules
    for heavy in ("bastion.server.app", "bastion.gateway", "bastion.oauth.server", "psycopg"):
        assert heavy not in modules, heavy
