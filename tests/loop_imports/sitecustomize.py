"""Loaded by a `bastion serve` that a test starts with this folder first on PYTHONPATH: notes,
in the file ``BASTION_TEST_LOOP_IMPORTS`` names, each module loaded while an event loop runs in
the loading thread, with the frames of bastion's code that asked for it (the command line's own,
which runs the loop, left out): a module, tab, those frames innermost first."""

import asyncio.events
import os
import sys
import traceback

_NOTED = os.environ.get("BASTION_TEST_LOOP_IMPORTS")
_BASTION = os.sep + "bastion" + os.sep
_ENTRY = ("cli.py", "commands.py")


class _LoadsOnTheLoop:
    def find_spec(self, name, path=None, target=None):
        if asyncio.events._get_running_loop() is None:
            return None
        frames = [
            f"bastion/{f.filename.rpartition(_BASTION)[2]}:{f.lineno}:{f.name}"
            for f in traceback.extract_stack()[:-1]
            if _BASTION in f.filename and not f.filename.endswith(_ENTRY)
        ]
        with open(_NOTED, "a") as out:
            out.write(f"{name}\t{' < '.join(reversed(frames))}\n")
        return None  # found by the finders after this one, as before


if _NOTED:
    sys.meta_path.insert(0, _LoadsOnTheLoop())
