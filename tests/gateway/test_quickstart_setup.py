"""`examples/quickstart/setup.py` (what `make run` runs first) on either database."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bastion.db import Database
from bastion.facts.store import FactStore
from bastion.oauth.store import OAuthStore

SETUP = Path(__file__).parents[2] / "examples" / "quickstart" / "setup.py"


def test_the_quickstart_sets_up_a_database_and_makes_only_a_sqlite_files_folder(
    database_url, tmp_path
):
    target = database_url if "://" in database_url else str(tmp_path / "new" / "bastion.db")
    done = subprocess.run(
        [sys.executable, str(SETUP), target], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    store = FactStore.open(target)
    try:
        assert store.head() >= 1  # the quickstart's facts
    finally:
        store.close()
    db = Database(target)
    try:
        assert {"sam", "avery"} <= {row[0] for row in OAuthStore(db).users()}
    finally:
        db.close()
    # A PostgreSQL URL is not a path: no folder named after it (a "postgresql:" one was made).
    made = {p.name for p in tmp_path.iterdir()}
    assert made == ({"new"} if "://" not in database_url else set())
