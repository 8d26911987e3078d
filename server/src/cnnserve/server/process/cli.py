"""``cnnserve serve`` and ``cnnserve inspect``: the gRPC inference server's command line.

Every flag has a ``CNNSERVE_*`` environment variable (listed in ``--help``); a flag wins over
its variable, which wins over the default. The flags are generated from the fields of
:class:`cnnserve.server.process.settings.Settings` (standard library only), and the handler imports
the server (grpcio, onnxruntime) only when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

_DESCRIPTION = """\
Serve the models of a model repository over gRPC (KServe Open Inference Protocol v2 with
Triton's extensions: tritonclient and perf_analyzer work unchanged), with Prometheus
metrics over HTTP. SIGTERM or SIGINT drains: health turns NOT_SERVING, new requests are
refused, queued and in-flight requests finish within --grace-period, then it exits 0.
"""


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the ``serve`` subcommand to the ``cnnserve`` parser."""
    from cnnserve.common import options  # standard library only
    from cnnserve.server.process import settings, triton_flags  # standard library only

    parser = sub.add_parser(
        "serve", help="serve models over gRPC (KServe v2 / Triton protocol)",
        description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Each flag's environment variable is shown as [env NAME]; flags win over "
               "variables. Triton's spellings of the same settings are accepted beside each "
               "flag; other tritonserver flags (--backend-config, --log-verbose, ...) are "
               "refused with what to use instead.")
    options.add_flags(parser, settings.Settings, env_prefix=settings.ENV_PREFIX)
    # `cnnserve serve models`, as `tritonserver` users and `python -m http.server` habits have it.
    parser.add_argument("repository_dir", nargs="?", type=Path, metavar="REPOSITORY",
                        help="model repository folder (same as --repository)")
    triton_flags.add_unsupported(parser)
    parser.set_defaults(handler=_serve)

    inspect = sub.add_parser(
        "inspect", help="show what the server would serve from a model folder or ONNX file",
        description="Load PATH the way 'cnnserve serve' would (the same files, checks and "
                    "warm-up, on the CPU unless the model asks for a GPU) and print each "
                    "version's signature and batching, and where each came from: config.json, "
                    "Triton's config.pbtxt, or derived from the ONNX graph. PATH is an ONNX "
                    "file (described alone), a version folder, a model folder or a repository. "
                    "Exit status 1 if anything would fail to load.")
    inspect.add_argument("path", metavar="PATH", help="ONNX file, version, model or repository")
    inspect.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                         help="device for models that do not choose one (default: cpu)")
    inspect.set_defaults(handler=_inspect)


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed flags, the positional repository merged into ``repository``."""
    from cnnserve.common.errors import UsageError

    flags = vars(args).copy()
    positional = flags.pop("repository_dir", None)
    if positional is not None:
        if flags.get("repository") not in (None, positional):
            raise UsageError(f"two repositories given: {positional} and --repository "
                             f"{flags['repository']}; give one")
        flags["repository"] = positional
    return flags


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from cnnserve.server.process.app import serve
    from cnnserve.server.process.logs import configure_logging
    from cnnserve.server.process.settings import Settings
    from cnnserve.server.telemetry import tracing

    settings = Settings.build(_flags(args), os.environ)
    configure_logging(settings.log_level, settings.log_format)
    tracing.configure(os.environ)  # OTLP export only when OTEL_EXPORTER_OTLP_ENDPOINT is set
    try:
        asyncio.run(serve(settings))
    finally:
        tracing.shutdown()  # flushes spans not yet exported
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cnnserve.server.process.inspect import inspect_path
    from cnnserve.server.runtime.ort import RuntimeOptions

    return inspect_path(Path(args.path), RuntimeOptions(device=args.device))
