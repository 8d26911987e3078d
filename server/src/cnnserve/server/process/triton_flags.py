"""Triton's ``tritonserver`` flags that ``cnnserve serve`` does not support: each is an error
(exit 2) that says so, instead of argparse's bare "unrecognized arguments".

Triton flags whose meaning cnnserve shares are aliases of its own flags (``option(aliases=)``
in settings.py): ``--model-repository``, ``--model-control-mode``, ``--load-model``,
``--repository-poll-secs``, ``--exit-timeout-secs``, ``--grpc-port``, ``--metrics-port``,
``--strict-readiness``. Standard library only.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

#: Unsupported Triton flags and what to do instead (documented in the README).
UNSUPPORTED: dict[str, str] = {
    "--backend-config": "ONNX Runtime is the only backend; use --intra-op-threads, "
                        "--inter-op-threads and --graph-optimization",
    "--backend-directory": "ONNX Runtime is the only backend",
    "--repoagent-directory": "repository agents are not supported",
    "--model-load-thread-count": "models load one at a time",
    "--model-namespacing": "model names are unique in one repository",
    "--strict-model-config": "config.json is always required (written by cnnserve export)",
    "--disable-auto-complete-config": "config.json is always required (written by cnnserve "
                                      "export)",
    "--log-verbose": "use --log-level DEBUG",
    "--log-info": "use --log-level",
    "--log-warning": "use --log-level",
    "--log-error": "use --log-level",
    "--log-file": "logs go to stderr; redirect it",
    "--allow-http": "the REST endpoint is not switched by this flag",
    "--allow-grpc": "gRPC is always served",
    "--allow-metrics": "metrics are always served; bind --metrics-port to a closed address",
    "--allow-gpu-metrics": "GPU metrics are not collected",
    "--allow-cpu-metrics": "process_* metrics are always exported",
    "--metrics-interval-ms": "metrics are computed when scraped",
    "--trace-config": "tracing is OpenTelemetry's, set by OTEL_* environment variables",
    "--cache-config": "response caching is not supported",
    "--rate-limit": "use max_queue_size in model.json or --max-queue-size",
    "--pinned-memory-pool-byte-size": "memory pools are ONNX Runtime's",
    "--cuda-memory-pool-byte-size": "memory pools are ONNX Runtime's",
    "--min-supported-compute-capability": "ONNX Runtime's CUDA provider decides",
    "--buffer-manager-thread-count": "use --execution-workers",
    "--http-thread-count": "use --execution-workers",
    "--exit-on-error": "the server always exits when a model asked for at start fails",
    "--id": "the server's name is cnnserve",
    "--model-config-name": "each version has one config.json",
    "--grpc-infer-allocation-pool-size": "not applicable",
    "--grpc-use-ssl": "use --tls-cert and --tls-key",
    "--grpc-server-cert": "use --tls-cert",
    "--grpc-server-key": "use --tls-key",
    "--grpc-root-cert": "use --tls-ca",
}


class _Unsupported(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        flag = option_string or self.option_strings[0]
        parser.error(f"{flag} is a Triton flag cnnserve does not support: "
                     f"{UNSUPPORTED[flag]}")


def add_unsupported(parser: argparse.ArgumentParser) -> None:
    """Register every :data:`UNSUPPORTED` flag as an error naming what to use instead.

    A flag the parser already has (cnnserve grew the setting) is left to it.
    """
    known = set(parser._option_string_actions)
    for flag in UNSUPPORTED.keys() - known:
        parser.add_argument(flag, action=_Unsupported, dest="_unsupported_triton_flag")
