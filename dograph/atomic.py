"""Files and directories written whole or not at all: built under a temporary name beside the target, then renamed
over it (``os.replace`` is atomic on POSIX within one file system).

Every writer of a file another process or a later run may read (checkpoints, metrics, mixer histories, stage and
sweep results, evaluation scores, run records, caches) goes through this module, so a crash never leaves a torn
file and processes sharing a directory never see each other's temporaries: a temporary's name carries the process
id and a random suffix.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def temporary_beside(path: Path) -> Path:
    """A hidden name next to ``path`` that no other process or call uses."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def replace_atomically(path: Path, write: Callable[[Path], Any], *, durable: bool = False) -> None:
    """``write`` a temporary file beside ``path``, then rename it over ``path`` (the temporary never stays).

    ``durable``: flush the file to disk before the rename (checkpoints: a power cut must not leave a name
    pointing at an empty file).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(path)
    try:
        write(tmp)
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def open_atomically(path: Path, mode: str = "w", *, durable: bool = False, **kwargs: Any) -> Iterator[IO[Any]]:
    """``open`` for writing a temporary beside ``path``; on a clean exit it is renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(path)
    try:
        with open(tmp, mode, **kwargs) as handle:
            yield handle
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str, *, durable: bool = False) -> None:
    """``path.write_text(text)``, whole or not at all."""
    replace_atomically(path, lambda tmp: tmp.write_text(text), durable=durable)


def publish_directory(tmp: Path, target: Path, *, marker: str | None = None, replace: bool = False) -> None:
    """Move a finished directory ``tmp`` into place as ``target``.

    ``replace``: an existing ``target`` is removed first (a run record written again). Otherwise another
    process may have published ``target`` first: then ``tmp`` is discarded when ``target`` holds ``marker``
    (its build is complete), and the error is raised when it does not.
    """
    if replace and target.exists():
        shutil.rmtree(target)
    try:
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if marker is None or not (target / marker).is_file():
            raise
