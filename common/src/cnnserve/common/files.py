"""Atomic file writes with ordinary permissions: the one helper every part writes files with.

Readers (a server polling the repository, a resumed batch job) see the old file or the new
one, never a part of it. What appears has the modes a plain ``open()``/``mkdir`` would give
under the process umask (0644 files, 0755 folders with the usual 022), never the 0600/0700
that ``tempfile`` uses: a model exported by one user must be readable by a server that runs
as another.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

FILE_MODE = 0o666  # before the umask, as open(2) with O_CREAT is usually asked
DIR_MODE = 0o777  # before the umask, as mkdir(2) is usually asked


def current_umask() -> int:
    """The process umask, read without changing it where the system allows (Linux /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    # Elsewhere the only portable way is to set it and put it back (racy only against
    # another thread doing the same, which nothing in cnnserve does).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(path: Path, data: str | bytes, *, mode: int = FILE_MODE,
                     durable: bool = True) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically, with ``mode`` less the umask.

    The data goes to a hidden temporary file beside ``path`` that is renamed over it; with
    ``durable`` it is fsynced first, and the folder after. The parent folder is created if
    needed. Raises :class:`OSError` (disk full, read-only folder); the temporary file is
    removed then and ``path`` is untouched.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode & ~current_umask())
            fh.write(payload)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def make_staging_dir(parent: Path, prefix: str) -> Path:
    """Create an empty hidden folder in ``parent`` with ordinary folder modes; return it.

    Like :func:`tempfile.mkdtemp` (a unique name, never an existing folder) but with mode
    0777 less the umask instead of 0700, so the folder can be renamed into place as is.
    """
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    folder.chmod(DIR_MODE & ~current_umask())
    return folder


def fsync_tree(folder: Path) -> None:
    """Flush every file below ``folder`` and the folder itself to disk."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    """Flush ``folder``'s entries: a rename is durable only once its folder is flushed."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
