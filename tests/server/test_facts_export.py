"""``bastion facts export FILE`` puts a whole export under FILE or leaves FILE as it was: an
export that fails (the database cannot be opened, the server's stream breaks off part way)
exits non-zero and leaves the previous export whole, never a file cut at a line boundary that
would import "successfully" with facts missing."""

from __future__ import annotations

import json
import stat

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from bastion import Entity
from bastion.cli import main
from bastion.facts.store import FactStore
from tests.oauth.support import free_socket, serve

PREVIOUS = '{"predicate":"has_role","args":["previous"]}\n' * 3


def _previous_export(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text(PREVIOUS)
    return path


def _breaking_server():
    """A server whose export sends two facts, then fails (as a database lost mid-stream)."""

    async def export(request: Request) -> StreamingResponse:
        def lines():
            fact = {"predicate": "is_public", "args": [{"type": "Repo", "id": "r"}]}
            yield (json.dumps(fact) + "\n").encode()
            yield (json.dumps(fact) + "\n").encode()
            raise RuntimeError("the database went away (as the test asked)")

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return Starlette(routes=[Route("/v1/facts/export", export)])


def test_an_export_whose_stream_breaks_off_leaves_the_previous_one_whole(tmp_path, capsys):
    path = _previous_export(tmp_path)
    sock = free_socket()
    with serve(_breaking_server(), sock) as url:
        code = main(["facts", "export", str(path), "--url", url, "--api-key", "k"])
    assert code == 2
    assert str(path) in capsys.readouterr().err
    assert path.read_text() == PREVIOUS
    assert [p.name for p in tmp_path.iterdir()] == ["facts.jsonl"]  # no draft left


def test_an_export_that_cannot_open_its_database_leaves_the_previous_one_whole(tmp_path):
    path = _previous_export(tmp_path)
    nowhere = str(tmp_path / "no-such-folder" / "bastion.db")
    assert main(["facts", "export", str(path), "--database", nowhere]) == 2
    assert path.read_text() == PREVIOUS


def test_an_export_replaces_the_previous_one_whole_and_private(tmp_path):
    path = _previous_export(tmp_path)
    path.chmod(0o644)
    database = str(tmp_path / "bastion.db")
    store = FactStore.open(database)
    store.apply([("is_public", Entity("Repo", "anvil"))])
    store.close()
    assert main(["facts", "export", str(path), "--database", database]) == 0
    exported = [json.loads(line) for line in path.read_text().splitlines()]
    assert [fact["predicate"] for fact in exported] == ["is_public"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no draft left


def test_an_export_to_a_folder_or_into_a_missing_one_names_the_path_given(tmp_path, capsys):
    """Refused before anything is read, with the path given: the draft beside it is a name
    nobody gave, and must not be left behind."""
    database = str(tmp_path / "bastion.db")
    FactStore.open(database).close()
    folder = tmp_path / "exports"
    folder.mkdir()
    for target, message in (
        (folder, f"bastion: {folder}: is a folder, not a file"),
        (folder / "missing" / "facts.jsonl", f"there is no folder {folder / 'missing'}"),
    ):
        assert main(["facts", "export", str(target), "--database", database]) == 2
        err = capsys.readouterr().err
        assert message in err and ".tmp" not in err, err
        assert main(["facts", "snapshot", str(target), "--database", database]) == 2
        err = capsys.readouterr().err
        assert message in err and ".tmp" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bastion.db", "exports"]
    assert list(folder.iterdir()) == []
