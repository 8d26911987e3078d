"""Helpers for the deployment tests: Dockerfile and compose parsing, a tiny model, a server.

Kept out of conftest.py because only tests/test_deploy.py and
tests/test_dockerfile_commands.py use them. Nothing here needs a Docker engine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE_SCHEMA = ROOT.parent / "shared" / "schemas" / "compose-spec.json"
VENV_BIN = Path(sys.executable).parent


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


def serve_unavailable_reason() -> str | None:
    """Why a real ``cnnserve serve`` cannot run yet (None when it can)."""
    result = subprocess.run([sys.executable, "-m", "cnnserve", "serve", "--help"],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        return ("`cnnserve serve` is not available yet (server/cli.py registers no working "
                f"'serve'): {result.stderr.strip().splitlines()[-1:] or result.stdout[-200:]}")
    return None


@dataclass
class RunningServer:
    process: subprocess.Popen[str]
    grpc_port: int
    metrics_port: int
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def metrics_text(self) -> str:
        import urllib.request
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            return str(reply.read().decode("utf-8"))


@contextlib.contextmanager
def running_server(repository: Path, workdir: Path,
                   extra: Sequence[str] = ()) -> Iterator[RunningServer]:
    """Start ``cnnserve serve`` on 127.0.0.1 free ports, wait until it is SERVING, stop it after.

    Uses the server's ``--port-file`` so no port is guessed. Raises AssertionError with the
    server's log when it exits early or is not serving within 60 s.
    """
    port_file = workdir / "ports.json"
    log = workdir / "server.log"
    cmd = [str(VENV_BIN / "cnnserve"), "serve", "--repository", str(repository),
           "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
           "--port-file", str(port_file), *extra]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True,
                                cwd=workdir)
    try:
        def ports() -> dict[str, int] | None:
            if proc.poll() is not None:
                raise AssertionError(f"cnnserve serve exited with {proc.returncode}:\n"
                                     f"{log.read_text()}")
            if not port_file.exists():
                return None
            with contextlib.suppress(json.JSONDecodeError):
                return dict(json.loads(port_file.read_text()))
            return None

        bound = wait_until(ports, 60, "the server's port file")
        server = RunningServer(proc, int(bound["grpc_port"]), int(bound["metrics_port"]), log)
        wait_until(lambda: probe(server.address).returncode == 0, 60, "the server to be SERVING")
        yield server
    finally:
        stop_process(proc)


def probe(address: str, *args: str, env: Mapping[str, str] | None = None,
          python: str = sys.executable) -> subprocess.CompletedProcess[str]:
    """Run ``python -m cnnserve.server.probe --address ADDRESS ...``."""
    return subprocess.run([python, "-m", "cnnserve.server.probe", "--address", address, *args],
                          capture_output=True, text=True, timeout=30,
                          env=dict(os.environ if env is None else env))


# -- a tiny model -----------------------------------------------------------------------

TINY_WEIGHTS = [[1.0, 0.0, -1.0], [0.5, 0.5, 0.5], [-1.0, 2.0, 0.0], [0.0, 0.0, 1.0]]
TINY_LABELS = ("ant", "bee", "cat")


def write_tiny_model(repository: Path, name: str = "tiny", version: int = 1) -> Path:
    """Write ``<repository>/<name>/<version>/`` with a 4 -> 3 softmax(x @ W) ONNX model.

    Uses the onnx package (dev/train extra) only here, in the test process; the server under
    test loads the file with onnxruntime alone.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.array(TINY_WEIGHTS, dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
        initializer=[weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder = repository / name / str(version)
    folder.mkdir(parents=True)
    onnx.save(model, str(folder / "model.onnx"))
    config = {"name": name, "max_batch_size": 8, "platform": "onnxruntime_onnx",
              "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
              "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}],
              "labels": list(TINY_LABELS)}
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


_TRITON_SCRIPT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as g
from tritonclient.utils import InferenceServerException
address, model, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = g.InferenceServerClient(address)
x = np.arange(8, dtype=np.float32).reshape(2, 4) / 8
outputs = []
for _ in range(count):
    inp = g.InferInput("input", [2, 4], "FP32")
    inp.set_data_from_numpy(x)
    outputs.append(client.infer(model, [inp], client_timeout=10).as_numpy("probabilities").tolist())
failures = []
bad = g.InferInput("input", [2, 3], "FP32")
bad.set_data_from_numpy(np.zeros((2, 3), dtype=np.float32))
for name, inputs in ((model, [bad]), ("no-such-model", [bad])):
    try:
        client.infer(name, inputs, client_timeout=10)
    except InferenceServerException as exc:
        failures.append(exc.status())
print(json.dumps({"outputs": outputs, "failures": failures}))
"""


def drive_requests(address: str, model: str, count: int) -> dict[str, Any]:
    """Send ``count`` good requests and two bad ones (wrong shape, unknown model) with tritonclient.

    Runs in a child process: tritonclient's generated protos share the ``inference`` package
    with cnnserve's and must not meet them in one process. Returns the outputs and the
    failure status codes.
    """
    result = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT, address, model, str(count)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def expected_tiny_output() -> list[list[float]]:
    """softmax(x @ W) for the input :func:`drive_requests` sends."""
    import numpy as np
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 8
    logits = x @ np.array(TINY_WEIGHTS, dtype=np.float32)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).tolist()  # type: ignore[no-any-return]
