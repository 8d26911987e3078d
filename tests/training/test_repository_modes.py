"""An exported repository is readable by another user: ordinary modes, honouring the umask.

The server often runs as a different user from the one who exported (a container's uid, a
service account). Version folders used to be created 0700 by ``mkdtemp`` and ``model.json``
0600 by ``mkstemp``; this proves the export and the atomic-write helper give 0755/0644 under
the usual umask, and, where the tests run as root, that user ``nobody`` can read everything.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cnnserve.common.files import make_staging_dir, write_atomically
from cnnserve.common.repository import CONFIG_FILE, MODEL_FILE, POLICY_FILE
from cnnserve.training.export.exporter import export_checkpoint
from tests.support.export import make_checkpoint

NOBODY = 65534


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder every user can enter (pytest's own tmp folders are 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="cnnserve-modes-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_and_staging_folder_get_ordinary_modes(shared_dir: Path,
                                                            umask_022: None) -> None:
    write_atomically(shared_dir / "a.json", "{}")
    staging = make_staging_dir(shared_dir, ".tmp-")
    assert _mode(shared_dir / "a.json") == 0o644
    assert _mode(staging) == 0o755
    assert [p.name for p in shared_dir.iterdir() if p.name.endswith(".tmp")] == []


def test_modes_honour_a_stricter_umask(shared_dir: Path) -> None:
    old = os.umask(0o077)
    try:
        write_atomically(shared_dir / "private.json", "{}")
        staging = make_staging_dir(shared_dir, ".tmp-")
    finally:
        os.umask(old)
    assert _mode(shared_dir / "private.json") == 0o600
    assert _mode(staging) == 0o700


def test_exported_version_is_readable_by_another_user(shared_dir: Path, umask_022: None,
                                                      tmp_path: Path) -> None:
    result = export_checkpoint(make_checkpoint(tmp_path / "tiny.pt", epochs=1),
                               shared_dir / "models", "tiny")
    model_dir = result.version_dir.parent
    assert _mode(model_dir / POLICY_FILE) == 0o644
    assert _mode(result.version_dir) == 0o755
    for name in (CONFIG_FILE, MODEL_FILE):
        assert _mode(result.version_dir / name) == 0o644, name
    if os.geteuid() != 0:
        pytest.skip("reading as another user needs root to switch users; modes checked above")
    files = [model_dir / POLICY_FILE, result.version_dir / CONFIG_FILE,
             result.version_dir / MODEL_FILE]
    # The interpreter starts as root (it may live in a folder nobody cannot enter), then
    # drops to nobody before it reads anything.
    script = (f"import os, sys\nos.setgroups([])\nos.setgid({NOBODY})\nos.setuid({NOBODY})\n"
              "for p in sys.argv[1:]:\n    open(p, 'rb').read()\n"
              "print('read', len(sys.argv) - 1, 'as uid', os.getuid())")
    done = subprocess.run([sys.executable, "-c", script, *map(str, files)],
                          capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"read 3 as uid {NOBODY}"
