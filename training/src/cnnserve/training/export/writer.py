"""Writing model versions into the repository so that readers never see a partial one.

A version is assembled in a hidden staging folder inside the model folder (``.tmp-...``;
:func:`cnnserve.common.repository.list_versions` ignores every name that is not a positive
integer), flushed to disk, then renamed to ``<model>/<version>`` in one ``rename`` call. A
forced re-export swaps the old and new folders in one call where Linux allows it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

from cnnserve.common import repository
from cnnserve.common.errors import CnnserveError
from cnnserve.common.files import fsync_dir, fsync_tree, make_staging_dir, write_atomically
from cnnserve.common.repository import POLICY_FILE, ModelPolicy, list_versions

STAGING_PREFIX = ".tmp-export-"


class RepositoryWriteError(CnnserveError):
    """A model name, version or repository folder that cannot take the new version."""


def check_model_name(name: str) -> None:
    """Raise :class:`RepositoryWriteError` unless ``name`` is a valid model folder name.

    The rule is the repository contract's (:func:`cnnserve.common.repository.check_model_name`),
    the same one the server applies to every name a client sends.
    """
    try:
        repository.check_model_name(name)
    except repository.ConfigError as exc:
        raise RepositoryWriteError(str(exc)) from None


def next_version(model_dir: Path) -> int:
    """The next free version of the model in ``model_dir``: highest existing + 1, or 1."""
    return max(list_versions(model_dir), default=0) + 1


def stage(model_dir: Path) -> Path:
    """Create and return an empty staging folder inside ``model_dir`` (created if needed)."""
    return make_staging_dir(model_dir, STAGING_PREFIX)


def publish(staging: Path, model_dir: Path, version: int, *, force: bool) -> Path:
    """Flush ``staging`` to disk and rename it to ``model_dir/<version>``; return that path.

    An existing version is replaced only with ``force`` (see :func:`_replace`). Raises
    :class:`RepositoryWriteError` when the version exists without ``force``, including one
    that another export created meanwhile.
    """
    fsync_tree(staging)
    target = model_dir / str(version)
    if target.exists():
        if not force:
            raise RepositoryWriteError(f"version {version} of model '{model_dir.name}' already "
                                       f"exists at {target}; pass --force to replace it")
        _replace(staging, target, model_dir)
    else:
        try:
            # rename(2) refuses a non-empty target, so two exports racing for one version
            # cannot overwrite each other: the loser gets this error.
            staging.rename(target)
        except OSError as exc:
            raise RepositoryWriteError(f"version {version} of model '{model_dir.name}' was "
                                       f"created by someone else meanwhile ({exc.strerror}); "
                                       "export again") from exc
    fsync_dir(model_dir)
    return target


def _replace(staging: Path, target: Path, model_dir: Path) -> None:
    """Put ``staging`` at ``target`` and delete the old ``target`` folder.

    Linux's renameat2(RENAME_EXCHANGE) swaps the two folders in one step, so a server polling
    the repository never sees the version missing; elsewhere the old folder is moved aside
    first (the version is absent for the instant between the two renames).
    """
    if _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old version
        return
    old = model_dir / f"{STAGING_PREFIX}replaced-{target.name}-{uuid.uuid4().hex[:8]}"
    target.rename(old)
    try:
        staging.rename(target)
    except OSError:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap paths ``a`` and ``b``; False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # no libc symbol (musl before 1.2.5, old glibc)
        return False
    at_fdcwd, rename_exchange = -100, 2
    ok = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
    return bool(ok)  # EINVAL/ENOSYS (filesystem or kernel without it): use the fallback


def ensure_policy(model_dir: Path) -> bool:
    """Write a starting ``model.json`` into ``model_dir`` if it has none; True if written.

    It holds only the version policy: batching keys left out fall back to the server's
    --max-queue-delay-us / --max-queue-size flags and then to ModelPolicy's defaults, so
    writing them here would silently override the operator's server-wide settings.
    """
    path = model_dir / POLICY_FILE
    if path.exists():
        return False
    policy = {"version_policy": ModelPolicy().version_policy}
    write_atomically(path, json.dumps(policy, indent=2, sort_keys=True) + "\n")
    return True


def discard(staging: Path, model_dir: Path, *, created_model_dir: bool) -> None:
    """Remove a staging folder after a failure, and the model folder if this export made it."""
    shutil.rmtree(staging, ignore_errors=True)
    if created_model_dir:
        with contextlib.suppress(OSError):  # rmdir only removes it while empty
            model_dir.rmdir()
