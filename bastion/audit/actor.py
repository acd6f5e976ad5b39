"""Who an audit event names as having made a change: the one spelling of each kind of actor."""

from __future__ import annotations

import getpass

# The server's own actions (a first signing key, retention, a refresh token used twice).
SERVER = "server"


def cli_actor() -> str:
    """``cli:<os user>`` for an administrator's command; ``cli`` when the environment names no
    user (a container without one)."""
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:
        return "cli"
