"""``cnnserve serve``: the gRPC inference server's command line.

Every flag has a ``CNNSERVE_*`` environment variable (listed in ``--help``); a flag wins over
its variable, which wins over the default. The flags are generated from the fields of
:class:`cnnserve.server.process.settings.Settings` (standard library only), and the handler imports
the server (grpcio, onnxruntime) only when it runs.
"""

from __future__ import annotations

import argparse
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
    from cnnserve.server.process import settings  # standard library only

    parser = sub.add_parser(
        "serve", help="serve models over gRPC (KServe v2 / Triton protocol)",
        description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Each flag's environment variable is shown as [env NAME]; flags win over "
               "variables.")
    options.add_flags(parser, settings.Settings, env_prefix=settings.ENV_PREFIX)
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from cnnserve.server.process.app import serve
    from cnnserve.server.process.logs import configure_logging
    from cnnserve.server.process.settings import Settings

    settings = Settings.build(vars(args), os.environ)
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(serve(settings))
    return 0
