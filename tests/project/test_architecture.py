"""ARCHITECTURE.md stays true: every path it names exists, and the import rules it states hold."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVER = ROOT / "server" / "src" / "cnnserve" / "server"
#: Short paths in the document are relative to a part's package folder.
BASES = (ROOT, SERVER, ROOT / "client" / "src" / "cnnserve" / "client",
         ROOT / "training" / "src" / "cnnserve" / "training")
DOC = ROOT / "ARCHITECTURE.md"

#: Backticked tokens and bare words in code blocks that look like files or folders.
_PATHLIKE = re.compile(r"^[\w.*/-]+(/|\.py|\.md|\.toml|\.proto|\.sh)$|^[\w.-]+/[\w.*/-]+$")


def _mentioned_paths() -> set[str]:
    text = DOC.read_text(encoding="utf-8")
    tokens = set(re.findall(r"`([^`\s]+)`", text))
    for block in re.findall(r"```\n(.*?)```", text, re.S):
        tokens.update(block.split())
    return {t.rstrip(",:;)") for t in tokens
            if "<" not in t and "://" not in t and _PATHLIKE.match(t.rstrip(",:;)"))}


def _exists(token: str) -> bool:
    if "*" in token:
        return any(any(base.glob(token)) for base in BASES)
    return any((base / token).exists() for base in BASES)


def test_every_path_the_architecture_names_exists() -> None:
    paths = _mentioned_paths()
    assert len(paths) > 30, sorted(paths)  # the check must see the document's paths
    missing = sorted(p for p in paths if not _exists(p))
    assert not missing, f"ARCHITECTURE.md names paths that do not exist: {missing}"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_layers_import_only_downwards_and_nothing_below_the_wire_imports_grpc() -> None:
    order = ["http", "grpc", "engine", "batching", "runtime"]
    wire = {"grpc", "aiohttp"}
    problems = []
    for layer in order:
        higher = order[:order.index(layer)]
        below_wire = order.index(layer) >= order.index("engine")
        for path in (SERVER / layer).rglob("*.py"):
            for name in _imports(path):
                if (below_wire and name.split(".")[0] in wire) or any(
                        name.startswith(f"cnnserve.server.{h}") for h in higher):
                    problems.append(f"{path.relative_to(ROOT)} imports {name}")
    for path in [SERVER / "errors.py", *(SERVER / "telemetry").rglob("*.py")]:
        for name in _imports(path):
            if name.split(".")[0] in wire or any(
                    name.startswith(f"cnnserve.server.{h}") for h in order):
                problems.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not problems, problems


def test_training_and_client_never_import_the_server() -> None:
    offenders = [f"{p.relative_to(ROOT)}: {n}"
                 for part in ("training", "client", "common")
                 for p in (ROOT / part / "src").rglob("*.py")
                 for n in _imports(p) if n.startswith("cnnserve.server")]
    assert not offenders, offenders
