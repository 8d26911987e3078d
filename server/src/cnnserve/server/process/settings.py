"""The server's settings: one frozen object per process, built in ``main()`` only.

Each field is set, in order of precedence, by its command-line flag, by its ``CNNSERVE_*``
environment variable, or by its default. The field's metadata carries the flag's help text
(with unit and default) so ``cnnserve serve --help`` and this class cannot drift apart.
Importing this module reads neither ``sys.argv`` nor the environment; it needs only the
standard library, so the CLI can describe the flags without importing the server.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnserve.common.errors import CnnserveError

ENV_PREFIX = "CNNSERVE_"
MiB = 1024 * 1024


def _doc(help: str, *, choices: tuple[str, ...] = (), flag: str = "",
         repeat: bool = False) -> dict[str, Any]:
    """Field metadata: the flag's help text, allowed values, flag name if not derived from
    the field name, and whether the flag repeats (a tuple field)."""
    return {"help": help, "choices": choices, "flag": flag, "repeat": repeat}


@dataclass(frozen=True)
class Settings:
    """Everything ``cnnserve serve`` is configured by. See each field's help for its unit."""

    repository: Path = field(default=Path("models"), metadata=_doc(
        "model repository folder (default: models)"))
    models: tuple[str, ...] = field(default=(), metadata=_doc(
        "model to load at start; repeat for several (env: comma-separated); default: every "
        "model in the repository", flag="--model", repeat=True))
    host: str = field(default="0.0.0.0", metadata=_doc(
        "address the gRPC and metrics servers bind (default: 0.0.0.0)"))
    grpc_port: int = field(default=8001, metadata=_doc(
        "gRPC port; 0 picks a free one (default: 8001)"))
    metrics_port: int = field(default=8002, metadata=_doc(
        "Prometheus /metrics HTTP port; 0 picks a free one (default: 8002)"))
    device: str = field(default="cpu", metadata=_doc(
        "default execution provider; a model's model.json overrides it (default: cpu)",
        choices=("cpu", "cuda", "auto")))
    control_mode: str = field(default="none", metadata=_doc(
        "none: load all at start; explicit: load/unload by RPC only; poll: like none and "
        "rescan the repository (default: none)", choices=("none", "explicit", "poll")))
    poll_interval_s: float = field(default=5.0, metadata=_doc(
        "seconds between repository scans in poll mode (default: 5)", flag="--poll-interval"))
    intra_op_threads: int = field(default=1, metadata=_doc(
        "ONNX Runtime intra-op threads per session; 0 = its default, one per core. 1 costs "
        "the least CPU per image: batches are spread over the execution workers instead "
        "(LeNet on 2 cores: 11 us of CPU per image at batch 16 with 1 thread, 18 with 2) "
        "(default: 1)"))
    inter_op_threads: int = field(default=0, metadata=_doc(
        "ONNX Runtime inter-op threads per session; 0 = its default (default: 0)"))
    execution_workers: int = field(default=2, metadata=_doc(
        "threads that run ONNX Runtime; also the most batches one model runs at once (the "
        "first whenever requests wait, each further one only for a full batch) (default: 2)"))
    graph_optimization: str = field(default="all", metadata=_doc(
        "ONNX Runtime graph optimisation level (default: all)",
        choices=("disable", "basic", "extended", "all")))
    warmup: bool = field(default=True, metadata=_doc(
        "run each model once before it is READY (default: on)"))
    max_queue_delay_us: int | None = field(default=None, metadata=_doc(
        "longest a request waits for a batch to fill, microseconds, for models whose "
        "model.json sets none (default: model.json's value)"))
    max_queue_size: int | None = field(default=None, metadata=_doc(
        "requests waiting per model version before new ones are refused, for models whose "
        "model.json sets none (default: model.json's value)"))
    grace_period_s: float = field(default=20.0, metadata=_doc(
        "seconds queued and in-flight requests get to finish on SIGTERM/SIGINT (default: 20)",
        flag="--grace-period"))
    tls_cert: Path | None = field(default=None, metadata=_doc(
        "PEM server certificate; enables TLS (with --tls-key)"))
    tls_key: Path | None = field(default=None, metadata=_doc(
        "PEM private key of --tls-cert"))
    tls_ca: Path | None = field(default=None, metadata=_doc(
        "PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)"))
    token: str | None = field(default=None, repr=False, metadata=_doc(
        "bearer token clients must send as 'authorization: Bearer <token>'; health checks "
        "stay open. Prefer the environment variable: flags show in the process list"))
    max_message_bytes: int = field(default=256 * MiB, metadata=_doc(
        "largest gRPC message sent or received, bytes (default: 268435456 = 256 MiB)"))
    log_format: str = field(default="text", metadata=_doc(
        "log line format (default: text)", choices=("text", "json")))
    log_level: str = field(default="INFO", metadata=_doc(
        "lowest level logged (default: INFO)", choices=("DEBUG", "INFO", "WARNING", "ERROR")))
    port_file: Path | None = field(default=None, metadata=_doc(
        'write the bound ports as JSON {"grpc_port": N, "metrics_port": M} here once serving '
        "(useful with port 0)"))

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise CnnserveError("--tls-cert and --tls-key go together: give both or neither")
        if self.tls_ca is not None and self.tls_cert is None:
            raise CnnserveError("--tls-ca (mutual TLS) needs --tls-cert and --tls-key")
        for name in ("grpc_port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise CnnserveError(f"{flag_of(name)} must be in 0..65535, "
                                    f"got {getattr(self, name)}")
        positive = ("execution_workers", "max_message_bytes", "poll_interval_s")
        for name in positive:
            if getattr(self, name) <= 0:
                raise CnnserveError(f"{flag_of(name)} must be positive, got {getattr(self, name)}")
        if self.grace_period_s < 0:
            raise CnnserveError(f"--grace-period must be >= 0, got {self.grace_period_s}")
        if self.token is not None and not self.token:
            raise CnnserveError("--token must not be empty")

    @classmethod
    def build(cls, flags: Mapping[str, Any], environ: Mapping[str, str]) -> Settings:
        """Settings from parsed flags (None = not given) over ``CNNSERVE_*`` over defaults.

        Raises CnnserveError naming the variable for an environment value that does not
        parse, and for inconsistent settings (TLS key without certificate, bad ports...).
        """
        values: dict[str, Any] = {}
        for f in fields():
            if flags.get(f.name) is not None:
                value = flags[f.name]
                values[f.name] = tuple(value) if f.metadata["repeat"] else value
            elif env_of(f.name) in environ:
                values[f.name] = _parse_env(f, environ[env_of(f.name)])
        return cls(**values)


def fields() -> Iterator[dataclasses.Field[Any]]:
    """The settings fields, in declaration order."""
    yield from dataclasses.fields(Settings)


def flag_of(name: str) -> str:
    """The command-line flag of a settings field, e.g. ``--grpc-port``."""
    f = Settings.__dataclass_fields__[name]
    return f.metadata["flag"] or "--" + name.replace("_", "-")


def env_of(name: str) -> str:
    """The environment variable of a settings field, e.g. ``CNNSERVE_GRPC_PORT``."""
    return ENV_PREFIX + flag_of(name)[2:].replace("-", "_").upper() + (
        "S" if Settings.__dataclass_fields__[name].metadata["repeat"] else "")


def parser_of(f: dataclasses.Field[Any]) -> Callable[[str], Any]:
    """How one value of the field is parsed from text (a flag argument or env value)."""
    kind = str(f.type)
    if "Path" in kind:
        return Path
    if kind.startswith("int"):
        return int
    if kind.startswith("float"):
        return float
    if kind.startswith("bool"):
        return _parse_bool
    return str


def _parse_env(f: dataclasses.Field[Any], text: str) -> Any:
    try:
        if f.metadata["repeat"]:
            return tuple(part.strip() for part in text.split(",") if part.strip())
        value = parser_of(f)(text)
    except ValueError as exc:
        raise CnnserveError(f"{env_of(f.name)}={text!r}: {exc}") from exc
    if f.metadata["choices"] and value not in f.metadata["choices"]:
        raise CnnserveError(f"{env_of(f.name)}={text!r}: must be one of "
                            f"{', '.join(f.metadata['choices'])}")
    return value


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")
