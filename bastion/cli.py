"""The ``bastion`` command line. Each area registers its own sub-commands."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that define ``register(subparsers)``; each adds its commands and sets ``func``.
COMMAND_MODULES = [
    "bastion.policy.commands",
    "bastion.server.commands",
    "bastion.oauth.commands",
    "bastion.audit.commands",
    "bastion.approvals.commands",
    "bastion.signals.commands",
    "bastion.agents.commands",
    "bastion.signals.alert_commands",
    "bastion.delegation.task_commands",
    "bastion.connections.commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bastion", description="Authorization for AI agents and MCP."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
