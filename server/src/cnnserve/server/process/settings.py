"""The server's settings: one frozen object per process, built in ``main()`` only.

Each field is set, in order of precedence, by its command-line flag, by its ``CNNSERVE_*``
environment variable, or by its default. The field's metadata carries the flag's help text
(with unit and default) so ``cnnserve serve --help`` and this class cannot drift apart.
Importing this module reads neither ``sys.argv`` nor the environment; it needs only the
standard library, so the CLI can describe the flags without importing the server.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cnnserve.common import options
from cnnserve.common.device import Device
from cnnserve.common.errors import CnnserveError
from cnnserve.common.options import option

ENV_PREFIX = "CNNSERVE_"
MiB = 1024 * 1024


ControlMode = Literal["none", "explicit", "poll"]
GraphOptimization = Literal["disable", "basic", "extended", "all"]
LogFormat = Literal["text", "json"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
MetricsNames = Literal["cnnserve", "triton"]


@dataclass(frozen=True)
class Settings:
    """Everything ``cnnserve serve`` is configured by. See each field's help for its unit."""

    repository: Path = option(Path("models"),
        "model repository folder: cnnserve export's layout, Triton's (config.pbtxt) or bare "
        "ONNX files in version folders; also the positional argument (default: models)",
        aliases=("--model-repository",))
    models: tuple[str, ...] = option((),
        "model to load at start; repeat for several (env: comma-separated); default: every "
        "model in the repository", flag="--model", aliases=("--load-model",))
    host: str = option("0.0.0.0",
        "address the gRPC, REST and metrics servers bind (default: 0.0.0.0)")
    grpc_port: int = option(8001,
        "gRPC port; 0 picks a free one (default: 8001)")
    http_port: int = option(8000,
        "KServe v2 / Triton REST (HTTP/JSON) port; 0 picks a free one, -1 turns REST off "
        "(default: 8000)")
    metrics_port: int = option(8002,
        "Prometheus /metrics HTTP port; 0 picks a free one (default: 8002)")
    device: Device = option("cpu",
        "default execution provider; a model's model.json overrides it (default: cpu)")
    control_mode: ControlMode = option("none",
        "none: load all at start; explicit: load/unload by RPC only; poll: like none and "
        "rescan the repository (default: none)", aliases=("--model-control-mode",))
    poll_interval_s: float = option(5.0,
        "seconds between repository scans in poll mode (default: 5)", flag="--poll-interval",
        aliases=("--repository-poll-secs",))
    intra_op_threads: int | None = option(None,
        "ONNX Runtime intra-op threads per batch; 0 = its default, one per core; a model's "
        "model.json intra_op_threads overrides it (default: from the usable cores so that "
        "threads x execution workers fits them: 1 on up to 3 cores, 2 on 4-15, 4 on 16-63)")
    cpus: int | None = option(None,
        "usable cores the thread defaults are sized for, e.g. a container's CPU limit (Kubernetes "
        "passes limits.cpu through the Downward API) (default: the CPU affinity capped by the "
        "cgroup CPU quota)")
    inter_op_threads: int = option(0,
        "ONNX Runtime inter-op threads per session; 0 = its default (default: 0)")
    execution_workers: int | None = option(None,
        "threads that run ONNX Runtime batches; also the most batches one model runs at once "
        "unless its model.json sets instance_count (default: usable cores / intra-op threads; "
        "cores = CPU affinity capped by the cgroup CPU quota)")
    graph_optimization: GraphOptimization = option("all",
        "ONNX Runtime graph optimisation level (default: all)")
    warmup: bool = option(True,
        "run each model once before it is READY (default: on)")
    strict_readiness: bool = option(True,
        "server readiness (ServerReady, overall health) requires every model asked for at "
        "start to be READY; off: ready as soon as started (default: on)")
    max_queue_delay_us: int | None = option(None,
        "longest a request waits for a batch to fill, microseconds, for models whose "
        "model.json sets none (default: model.json's value)")
    max_queue_size: int | None = option(None,
        "requests waiting per model version before new ones are refused, for models whose "
        "model.json sets none (default: model.json's value)")
    grace_period_s: float = option(20.0,
        "seconds queued and in-flight requests get to finish on SIGTERM/SIGINT (default: 20)",
        flag="--grace-period", aliases=("--exit-timeout-secs",))
    tls_cert: Path | None = option(None,
        "PEM server certificate; enables TLS (with --tls-key)")
    tls_key: Path | None = option(None,
        "PEM private key of --tls-cert")
    tls_ca: Path | None = option(None,
        "PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)")
    token: str | None = option(
        None, "bearer token clients must send as 'authorization: Bearer <token>'; health "
        "checks stay open. Prefer the environment variable: flags show in the process list",
        repr=False)
    metrics_tls_cert: Path | None = option(None,
        "PEM certificate for the metrics endpoint; serves it over HTTPS only (with "
        "--metrics-tls-key). May be the gRPC certificate")
    metrics_tls_key: Path | None = option(None,
        "PEM private key of --metrics-tls-cert")
    metrics_token: str | None = option(
        None, "bearer token scrapers must send as 'Authorization: Bearer <token>' (Prometheus: "
        "authorization.credentials_file); default: /metrics is open. Prefer the environment "
        "variable: flags show in the process list", repr=False)
    reuse_port: bool = option(False,
        "let another server bind the same gRPC port (SO_REUSEPORT) while this one runs: for a "
        "rolling restart on one port, start the new server before SIGTERMing the old; "
        "clients move over when the old one's connections close (default: off, a second "
        "server on the port fails to start)")
    max_message_bytes: int = option(256 * MiB,
        "largest gRPC message sent or received, bytes (default: 268435456 = 256 MiB)")
    log_format: LogFormat = option("text",
        "log line format (default: text)")
    log_level: LogLevel = option("INFO",
        "lowest level logged (default: INFO)")
    metrics_names: MetricsNames = option("cnnserve",
        "metric names on /metrics: cnnserve (cnnserve_*, process_*, python_*) or triton "
        "(those and Triton's nv_inference_* names, for dashboards written for Triton) "
        "(default: cnnserve)")
    port_file: Path | None = option(None,
        'write the bound ports as JSON {"grpc_port": N, "http_port": H, "metrics_port": M} '
        "here once serving (useful with port 0; http_port is null without REST)")

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise CnnserveError("--tls-cert and --tls-key go together: give both or neither")
        if (self.metrics_tls_cert is None) != (self.metrics_tls_key is None):
            raise CnnserveError("--metrics-tls-cert and --metrics-tls-key go together: give "
                                "both or neither")
        if self.metrics_token is not None and not self.metrics_token:
            raise CnnserveError("--metrics-token must not be empty")
        if self.tls_ca is not None and self.tls_cert is None:
            raise CnnserveError("--tls-ca (mutual TLS) needs --tls-cert and --tls-key")
        for name in ("grpc_port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise CnnserveError(f"{flag_of(name)} must be in 0..65535, "
                                    f"got {getattr(self, name)}")
        positive = ("execution_workers", "max_message_bytes", "poll_interval_s", "cpus")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise CnnserveError(f"{flag_of(name)} must be positive, got {getattr(self, name)}")
        if self.intra_op_threads is not None and self.intra_op_threads < 0:
            raise CnnserveError(f"--intra-op-threads must be >= 0, got {self.intra_op_threads}")
        if self.grace_period_s < 0:
            raise CnnserveError(f"--grace-period must be >= 0, got {self.grace_period_s}")
        if not -1 <= self.http_port <= 65535:
            raise CnnserveError(f"--http-port must be in 0..65535, or -1 for no REST, got "
                                f"{self.http_port}")
        if self.token is not None and not self.token:
            raise CnnserveError("--token must not be empty")

    @classmethod
    def build(cls, flags: Mapping[str, Any], environ: Mapping[str, str]) -> Settings:
        """Settings from parsed flags (None = not given) over ``CNNSERVE_*`` over defaults.

        Raises CnnserveError naming the variable for an environment value that does not
        parse, and for inconsistent settings (TLS key without certificate, bad ports...).
        """
        return options.build_options(cls, flags, environ, env_prefix=ENV_PREFIX)


def fields() -> Iterator[dataclasses.Field[Any]]:
    """The settings fields, in declaration order."""
    yield from options.option_fields(Settings)


def flag_of(name: str) -> str:
    """The command-line flag of a settings field, e.g. ``--grpc-port``."""
    return options.flag_of(Settings, name)


def env_of(name: str) -> str:
    """The environment variable of a settings field, e.g. ``CNNSERVE_GRPC_PORT``."""
    return options.env_of(Settings, name, ENV_PREFIX)
