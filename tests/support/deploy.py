"""Helpers for the deployment tests: Dockerfile and compose parsing, processes.

Kept out of conftest.py because only the deployment tests use them. Nothing here needs a
Docker engine.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
COMPOSE_SCHEMA = ROOT.parent / "shared" / "schemas" / "compose-spec.json"
VENV_BIN = Path(sys.executable).parent


def load_yaml(path: Path) -> Any:
    """A YAML file, parsed safely."""
    import yaml
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# -- Dockerfiles ----------------------------------------------------------------------------

@dataclass
class Instruction:
    """One Dockerfile instruction: ``keyword`` upper-case, ``flags`` like --from=builder."""

    keyword: str
    args: str
    flags: dict[str, str] = field(default_factory=dict)

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form RUN/CMD/ENTRYPOINT, None for the shell form."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
        return value


@dataclass
class Stage:
    """One ``FROM`` stage: its base image (ARG defaults substituted), name and instructions."""

    base: str
    name: str
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self, base_env: Mapping[str, str] | None = None) -> dict[str, str]:
        """The stage's ENV values, expanded like Docker does (``$PATH`` from ``base_env``)."""
        env = dict(base_env or {})
        for inst in self.all("ENV"):
            for item in shlex.split(inst.args):
                key, _, value = item.partition("=")
                env[key] = expand(value, env)
        return env


def read_instructions(path: Path) -> list[Instruction]:
    """Instructions of a Dockerfile: continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path}: the last instruction ends with a line continuation"
    result = []
    for text in logical:
        keyword, _, rest = text.partition(" ")
        flags: dict[str, str] = {}
        rest = rest.strip()
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            name, _, value = flag[2:].partition("=")
            flags[name] = value
            rest = rest.strip()
        result.append(Instruction(keyword.upper(), rest, flags))
    return result


def read_stages(path: Path) -> dict[str, Stage]:
    """The Dockerfile's stages by name (unnamed stages by index), in order."""
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for inst in read_instructions(path):
        if inst.keyword == "ARG" and current is None:
            name, _, default = inst.args.partition("=")
            args[name.strip()] = default.strip()
        elif inst.keyword == "FROM":
            words = inst.args.split()
            base = expand(words[0], args)
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            current = Stage(base, name, [])
            stages[name] = current
        else:
            assert current is not None, f"{path}: {inst.keyword} before FROM"
            current.instructions.append(inst)
    return stages


def global_args(path: Path) -> dict[str, str]:
    """ARG defaults declared before the first FROM."""
    result = {}
    for inst in read_instructions(path):
        if inst.keyword == "FROM":
            break
        if inst.keyword == "ARG":
            name, _, default = inst.args.partition("=")
            result[name.strip()] = default.strip()
    return result


def healthcheck_command(stage: Stage) -> list[str]:
    """The exec-form command of the stage's HEALTHCHECK (asserts it is one)."""
    inst = stage.last("HEALTHCHECK")
    assert inst is not None, f"stage {stage.name} has no HEALTHCHECK"
    keyword, _, rest = inst.args.partition(" ")
    assert keyword.upper() == "CMD", inst.args
    command = Instruction("CMD", rest).exec_form
    assert command is not None, f"HEALTHCHECK must use the exec form: {inst.args}"
    return command


_VAR = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}"
                  r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*)|(?P<dollar>\$))")


def expand(text: str, env: Mapping[str, str], *, strict: bool = False) -> str:
    """Expand ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}`` and ``$$``.

    The subset Dockerfiles and compose files use here. With ``strict`` an unset variable
    without a default raises KeyError, as ``${VAR:?}`` would.
    """
    def one(match: re.Match[str]) -> str:
        if match.group("dollar"):
            return "$"
        name = match.group("braced") or match.group("plain")
        op, arg = match.group("op") or "", match.group("arg") or ""
        value = env.get(name)
        if op == ":-" and not value:
            return arg
        if op == "-" and value is None:
            return arg
        if op in (":?", "?") and not value:
            raise KeyError(f"${{{name}}} is required: {arg}")
        if value is None:
            if strict:
                raise KeyError(name)
            return ""
        return value

    return _VAR.sub(one, text)


def variables_in(text: str) -> dict[str, str | None]:
    """Variables referenced in ``text`` with their ``:-`` default (None when there is none)."""
    found: dict[str, str | None] = {}
    for match in _VAR.finditer(text):
        name = match.group("braced") or match.group("plain")
        if name:
            default = match.group("arg") if match.group("op") in (":-", "-") else None
            found.setdefault(name, default)
    return found


def interpolate(node: Any, env: Mapping[str, str]) -> Any:
    """Compose-style interpolation of every string in a loaded YAML document."""
    if isinstance(node, str):
        return expand(node, env)
    if isinstance(node, list):
        return [interpolate(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    return node


def merge_compose(base: Any, override: Any) -> Any:
    """Merge an override file into a compose document (mappings merge, scalars replace)."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge_compose(base[key], value) if key in base else value
        return merged
    return override


# -- processes --------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for programs that cannot report port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    """Poll ``predicate`` until it returns something truthy; AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = 15.0) -> int:
    """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return int(proc.returncode)
