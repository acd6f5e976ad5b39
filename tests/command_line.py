"""`bastion` commands run by the CLI's own main in the test process, as a new process runs them.

A new Python takes about a second to start and import bastion; a test that runs twenty commands
for what they print and the status they end with, not for the process itself (its environment
inherited, its signals, a pipe), runs them here instead. A test whose point is the process
runs ``python -m bastion.cli`` as before.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import traceback
from collections.abc import Mapping
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest.mock import patch


def bastion_in_process(
    *args: str, env: Mapping[str, str], stdin: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """`bastion *args` with ``env`` as its whole environment, ``stdin`` as its input and ``cwd``
    (if given) as its working directory: the stdout, stderr and exit status that ``python -m
    bastion.cli`` gives (`main`'s status; a `SystemExit`'s as `sys.exit` makes it one; 1 and the
    traceback for an exception), with WARNING logs on stderr as Python's last-resort handler
    writes them when nothing configured logging. What a command may set for the process (the environment, the working directory,
    the outbound proxy, the cached trust stores) is put back after it, so nothing passes to the
    next test."""
    from bastion import outbound_proxy, tls
    from bastion.cli import main

    given = dict(env)  # before os.environ, which ``env`` may be, is changed
    out, err = io.StringIO(), io.StringIO()
    last_resort = logging.StreamHandler(err)
    last_resort.setLevel(logging.WARNING)
    saved_environ = os.environ.copy()
    saved_proxy = outbound_proxy.configured()
    saved_cwd = os.getcwd()
    _become(given)
    logging.getLogger().addHandler(last_resort)
    try:
        if cwd is not None:
            os.chdir(cwd)
        with (
            redirect_stdout(out),
            redirect_stderr(err),
            patch.object(sys, "stdin", io.StringIO(stdin or "")),
        ):
            try:
                code = main(list(args))
            except SystemExit as done:
                if done.code is None or isinstance(done.code, int):
                    code = done.code or 0
                else:
                    print(done.code, file=sys.stderr)
                    code = 1
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        logging.getLogger().removeHandler(last_resort)
        os.chdir(saved_cwd)
        _become(saved_environ)
        outbound_proxy.configure(saved_proxy)
        tls.trust.cache_clear()
        tls.file_context.cache_clear()
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def _become(environment: dict[str, str]) -> None:
    """``os.environ`` made ``environment`` key by key, never emptied on the way: a thread of
    the test process (a server an in-process fixture runs) reading it meanwhile sees no
    variable missing that both have."""
    for name in [name for name in os.environ if name not in environment]:
        del os.environ[name]
    for name, value in environment.items():
        if os.environ.get(name) != value:
            os.environ[name] = value
