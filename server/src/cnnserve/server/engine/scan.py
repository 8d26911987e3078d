"""Reading the repository folder: fingerprints of what is on disk, policy files, selection.

Everything here that touches the disk is blocking and runs in the repository's worker thread.
A version's fingerprint is the (name, mtime_ns, size, inode) of every file in its folder
(model.onnx, config.json, external data, a differently named model file), a model's that of
every file directly in the model folder (model.json, config.pbtxt, label files), so a
re-export (new files, even of the same size) reads as a change; folders whose names start
with "." (export's staging folders) are never models or versions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cnnserve.common.repository import MODEL_FILE, ModelPolicy, list_versions

#: (name, mtime_ns, size, inode) of each file that defines a version; a change means "reload".
Fingerprint = tuple[tuple[str, int, int, int], ...]


@dataclass(frozen=True)
class ModelScan:
    """What a model folder held at one moment."""

    name: str
    policy: Fingerprint
    versions: Mapping[int, Fingerprint]


def select_versions(policy: ModelPolicy,
                    available: Mapping[int, object]) -> tuple[list[int], list[int]]:
    """(versions to try, newest first; versions the policy names that are not on disk)."""
    newest_first = sorted(available, reverse=True)
    specific = policy.version_policy.get("specific")
    if specific is None:
        return newest_first, []
    wanted = sorted(set(specific), reverse=True)
    return [v for v in wanted if v in available], [v for v in wanted if v not in available]


def read_policy(path: Path, max_queue_delay_us: int | None = None,
                max_queue_size: int | None = None) -> ModelPolicy:
    """model.json with the server-wide batching defaults for the fields it does not set.

    Blocking (reads the file). Raises ConfigError for an invalid model.json.
    """
    policy = ModelPolicy.load(path)
    given: dict[str, Any] = {}
    if path.exists():
        given = json.loads(path.read_text(encoding="utf-8")).get("dynamic_batching") or {}
    batching = policy.dynamic_batching
    if max_queue_delay_us is not None and "max_queue_delay_microseconds" not in given:
        batching = replace(batching, max_queue_delay_microseconds=max_queue_delay_us)
    if max_queue_size is not None and "max_queue_size" not in given:
        batching = replace(batching, max_queue_size=max_queue_size)
    return replace(policy, dynamic_batching=batching)


def _files(folder: Path) -> Fingerprint:
    """(name, mtime_ns, size, inode) of each plain file directly in ``folder``, by name."""
    stats = []
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return ()
    for path in entries:
        try:
            st = path.stat()
        except OSError:
            continue
        if not path.name.startswith(".") and not path.is_dir():
            stats.append((path.name, st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(stats)


@dataclass(frozen=True)
class Layout:
    """Where the models of a repository folder live.

    Usually the folder holds model folders: ``root/<model>/<version>/``. KServe's storage
    initializer instead puts ONE model at the mount path: ``root/<version>/`` when the
    storageUri names a model folder, or ``root/model.onnx`` when it names the file itself.
    Then the root is that model's folder (``single``: its name, from ``--model`` or else the
    folder's own name), and a bare ``model.onnx`` at the root is its version 1 (``flat``).
    """

    root: Path
    single: str | None = None
    flat: bool = False

    def model_dir(self, name: str) -> Path:
        """The folder of model ``name`` (its model.json, config.pbtxt, version folders)."""
        return self.root if self.single is not None else self.root / name

    def version_dir(self, name: str, version: int) -> Path:
        """The folder that holds version ``version`` of model ``name``."""
        return self.root if self.flat else self.model_dir(name) / str(version)


def detect_layout(root: Path, names: Sequence[str] = ()) -> Layout:
    """The layout of ``root`` (blocking: lists it); ``names`` are the models asked for.

    A root that holds version folders (positive integers) or a ``model.onnx`` is a single
    model's folder, named ``names[0]`` when one name was asked for, else after the folder.
    """
    if not root.is_dir():
        return Layout(root)
    single = names[0] if len(names) == 1 else root.name
    if list_versions(root):
        return Layout(root, single)
    if (root / MODEL_FILE).is_file():
        return Layout(root, single, flat=True)
    return Layout(root)


def scan_model(layout: Layout, name: str) -> ModelScan | None:
    """Fingerprint one model folder (blocking); None if it does not exist."""
    if layout.single is not None:
        if name != layout.single:
            return None
        if layout.flat:
            files = _files(layout.root)
            return ModelScan(name, files, {1: files})
    folder = layout.model_dir(name)
    if name.startswith(".") or not folder.is_dir():
        return None
    versions = {v: _files(folder / str(v)) for v in list_versions(folder)}
    return ModelScan(name, _files(folder), versions)


def scan_repository(layout: Layout) -> dict[str, ModelScan]:
    """Fingerprint every model folder (blocking); folders starting with "." are ignored."""
    if layout.single is not None:
        scan = scan_model(layout, layout.single)
        return {} if scan is None else {layout.single: scan}
    scans = {}
    for entry in sorted(layout.root.iterdir()):
        scan = scan_model(layout, entry.name)
        if scan is not None:
            scans[entry.name] = scan
    return scans
