"""Packaging: one import root, every module importable from the installed wheel, light extras."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(ROOT)],
        check=True, capture_output=True, text=True)
    (found,) = out.glob("cnnserve-*.whl")
    return found


def test_wheel_installs_one_import_root(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"cnnserve", next(t for t in tops if t.endswith(".dist-info"))}, tops
    for required in ("cnnserve/cli/__init__.py", "cnnserve/common/repository.py",
                     "cnnserve/training/py.typed", "cnnserve/server/py.typed",
                     "cnnserve/client/py.typed", "cnnserve/proto/grpc_service_pb2.py",
                     "cnnserve/proto/grpc_service_pb2_grpc.py",
                     "cnnserve/proto/grpc_service.proto", "cnnserve/server/engine/core.py"):
        assert required in names, f"{required} missing from the wheel"


def test_every_module_imports_from_the_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, text=True)
    script = f"""
import importlib, pkgutil, sys
sys.path.insert(0, {str(target)!r})
import cnnserve
# A namespace package (no part owns cnnserve/__init__.py): the installed copy comes first.
assert getattr(cnnserve, "__file__", None) is None
assert list(cnnserve.__path__)[0].startswith({str(target)!r}), list(cnnserve.__path__)
names = [m.name for m in pkgutil.walk_packages([{str(target)!r} + "/cnnserve"], "cnnserve.")
         if not m.name.endswith("__main__")]
for name in names:
    mod = importlib.import_module(name)
    assert mod.__file__.startswith({str(target)!r}), (name, mod.__file__)
print(len(names))
"""
    # Run from an empty folder so the source tree cannot shadow the installed copy.
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) >= 20


def _modules_loaded_after(code: str) -> set[str]:
    probe = code + "\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_server_never_imports_torch() -> None:
    loaded = _modules_loaded_after(
        "import importlib, pkgutil, cnnserve.server as s\n"
        "for m in pkgutil.walk_packages(s.__path__, 'cnnserve.server.'):\n"
        "    importlib.import_module(m.name)\n"
        "from cnnserve.cli import build_parser\n"
        "build_parser()\n")
    assert "cnnserve.server.engine.core" in loaded
    assert "torch" not in loaded


def test_serve_help_does_not_import_torch() -> None:
    loaded = _modules_loaded_after(
        "from cnnserve.cli import main\n"
        "try:\n    main(['serve', '--help'])\nexcept SystemExit:\n    pass\n")
    assert "torch" not in loaded and "onnxruntime" not in loaded


@pytest.mark.parametrize(("part", "forbidden"), [
    ("client", ("torch", "onnxruntime", "onnx")),
    ("server", ("torch",)),
    ("common", ("torch", "onnxruntime", "grpcio")),
])
def test_each_part_builds_alone_without_heavy_dependencies(
        part: str, forbidden: tuple[str, ...], tmp_path: Path) -> None:
    """``pip install ./client`` is a small install of its own: its own package, light needs."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT / part)],
        check=True, capture_output=True, text=True)
    (found,) = tmp_path.glob(f"cnnserve_{part}-*.whl")
    archive = zipfile.ZipFile(found)
    packages = {n.split("/")[1] for n in archive.namelist() if n.startswith("cnnserve/")}
    expected = {"common", "cli"} if part == "common" else {part}
    assert packages == expected, packages
    assert not any(n == "cnnserve/__init__.py" for n in archive.namelist())
    metadata = next(n for n in archive.namelist() if n.endswith("METADATA"))
    requires = [line.split(":", 1)[1].strip().split(" ")[0].split(">")[0].split("=")[0]
                for line in archive.read(metadata).decode().splitlines()
                if line.startswith("Requires-Dist:")]
    assert not set(requires) & set(forbidden), requires


def test_each_parts_requirements_match_the_root_extra() -> None:
    """The root distribution's extras and the parts' own requirements cannot drift apart."""
    import tomllib

    def requires(folder: Path) -> set[str]:
        data = tomllib.loads((folder / "pyproject.toml").read_text(encoding="utf-8"))
        return {r for r in data["project"]["dependencies"] if not r.startswith("cnnserve-")}

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))[
        "project"]["optional-dependencies"]
    for part, extra in (("server", "serve"), ("client", "client"), ("training", "train")):
        own = requires(ROOT / part) | requires(ROOT / "common")
        if part != "training":
            own |= requires(ROOT / "proto")
        assert own <= set(extras[extra]), (part, sorted(own - set(extras[extra])))
