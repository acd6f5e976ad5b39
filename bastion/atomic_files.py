"""Files put in place whole and durably: key files, secrets, snapshots and exports.

Each is written to a file of its own beside the target (mode 0600 unless told), flushed and
fsynced, then put under its name in one step (a link for a file that must not exist yet, so of
two replicas making it at once one wins and the other reads the winner's; a rename for one that
is replaced), and the folder is fsynced. A crash, a full disk or a failed write at any point
leaves the old file (or none) under the name, never part of the new one.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def create(path: str | os.PathLike, data: bytes, mode: int = 0o600) -> bool:
    """Write ``data`` as the new file ``path``; False, and nothing changed, if a file is there
    already (another process made it first: theirs is kept)."""
    path = Path(path)
    with _draft(path, "wb", mode) as (out, draft):
        out.write(data)
    try:
        os.link(draft, path)
    except FileExistsError:
        return False
    finally:
        draft.unlink()
    _sync_folder(path.parent)
    return True


@contextmanager
def replacing(path: str | os.PathLike, mode: int = 0o600, text: bool = False) -> Iterator[IO]:
    """A file to write (binary, or UTF-8 text) that takes ``path``'s place when the block ends;
    if the block raises, ``path`` keeps what it held (or stays absent)."""
    path = Path(path)
    with _draft(path, "w" if text else "wb", mode) as (out, draft):
        yield out
    try:
        os.replace(draft, path)
    except OSError as e:
        draft.unlink(missing_ok=True)
        raise _about(path, e) from None
    except BaseException:
        draft.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


@contextmanager
def _draft(path: Path, how: str, mode: int) -> Iterator[tuple[IO, Path]]:
    """A new file beside ``path``, open for the block, then flushed, fsynced and closed; removed
    if the block or any of that fails."""
    if not path.name or path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    draft = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as e:
        raise _about(path, e) from None
    try:
        with os.fdopen(fd, how, encoding="utf-8" if "b" not in how else None) as out:
            yield out, draft
            out.flush()
            os.fsync(out.fileno())
    except OSError as e:
        draft.unlink(missing_ok=True)
        # A full disk refuses the draft's write or its close: said of the file asked for.
        raise (_about(path, e) if e.filename is None else e) from None
    except BaseException:
        draft.unlink(missing_ok=True)
        raise


def _about(path: Path, error: OSError) -> OSError:
    """``error`` naming the file asked for, not the draft beside it (a name nobody gave)."""
    if isinstance(error, FileNotFoundError):
        return FileNotFoundError(error.errno, f"there is no folder {path.parent}", str(path))
    return type(error)(error.errno, error.strerror, str(path))


def _sync_folder(folder: Path) -> None:
    """Make the new name itself durable: it is an entry of the folder."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
