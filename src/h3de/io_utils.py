"""Atomic file writing: a reader never sees a half-written output; output folders an error left empty are removed.

Temporary files and folders are created with the ordinary mode (0o666 / 0o777 less the umask, 0644 / 0755
under umask 022), so outputs are as readable as any other file the user writes (``tempfile.mkstemp`` would
make them 0600).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "atomic_write",
    "atomic_path",
    "atomic_dir",
    "csv_text",
    "missing_folders",
    "remove_empty_folders",
    "removed_if_left_empty",
]


def _temporary_name(path: Path, suffix: str = "") -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp{suffix}"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the final suffix(es) so writers that dispatch on them (nibabel) work. The file
    exists (empty) when the block starts, with the umask-derived mode.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _temporary_name(path, "".join(path.suffixes))
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask applies
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty folder beside ``path``; if the block succeeds, it replaces ``path`` and its contents.

    The old folder is renamed aside, the new one renamed into place, then the old one removed: no file of
    an earlier run survives, and ``path`` never holds a half-written set (between the two renames it is
    briefly absent). On failure the new folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _temporary_name(path)
        try:
            tmp.mkdir(0o777)  # the umask applies
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        old = _temporary_name(path, ".old") if path.exists() else None
        if old is not None:
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if old is not None:
                os.replace(old, path)
            raise
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def atomic_write(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def csv_text(header: list[str], rows: list[list]) -> str:
    """CSV text of a header and rows (``\\n`` line ends)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def missing_folders(path: str | os.PathLike) -> list[Path]:
    """``path`` and those of its parents that do not exist (yet), deepest first."""
    path = Path(path).absolute()
    return [p for p in (path, *path.parents) if not p.exists()]


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty; stop at the first that is not (or is gone)."""
    for folder in folders:
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return


@contextlib.contextmanager
def removed_if_left_empty(path: str | os.PathLike) -> Iterator[Path]:
    """Yield the output folder ``path``; if the block raises, remove the folders it made there and left empty.

    Those are ``path`` and its parents when they did not exist before the block, and folders made inside ``path``;
    each is removed (deepest first) only if it holds nothing. Folders that existed before, and any with a file in
    it, stay. Commands that make an output folder and can then fail wrap their work in it, so that an error leaves
    no empty folder behind.
    """
    path = Path(path).absolute()
    made = missing_folders(path)
    before = {Path(folder) for folder, _, _ in os.walk(path)}
    try:
        yield path
    except BaseException:
        for folder, _, _ in os.walk(path, topdown=False):
            if Path(folder) not in before and Path(folder) != path:
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
        remove_empty_folders(made)
        raise
