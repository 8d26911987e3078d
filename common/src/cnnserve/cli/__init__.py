"""The ``cnnserve`` command: one entry point, one subcommand per job.

Each part registers its own subcommands from a ``cli`` module that imports only the
standard library, so ``cnnserve serve`` never imports torch and ``cnnserve batch`` never
imports torch or onnxruntime. Handlers import their heavy dependencies when they run.

Exit status: 0 on success, 1 when the job failed (the message says why), 2 for a usage error
(argparse's own, and :class:`~cnnserve.common.errors.UsageError` raised by a handler).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from cnnserve.common import __version__
from cnnserve.common.errors import CnnserveError, UsageError

# The extra that provides each part, for the message when its packages are missing.
_EXTRA_OF_MODULE = {"torch": "train", "onnx": "train", "matplotlib": "train",
                    "onnxruntime": "serve", "grpc": "serve or client",
                    "prometheus_client": "serve", "PIL": "client"}


# Each part registers its subcommands from a standard-library-only module. A part that is
# not installed (say only cnnserve-client is) simply contributes no subcommands.
_PART_CLIS = ("cnnserve.training.cli", "cnnserve.server.process.cli", "cnnserve.client.cli")


def build_parser() -> argparse.ArgumentParser:
    """Return the parser with the subcommands of every installed part registered."""
    parser = argparse.ArgumentParser(
        prog="cnnserve",
        description="Train CNNs, export them to ONNX and serve them over gRPC "
                    "(KServe v2 / Triton).",
    )
    parser.add_argument("--version", action="version", version=f"cnnserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in _PART_CLIS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not module_name.startswith(exc.name):
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code: int = args.handler(args)
    except UsageError as exc:
        # The command line was wrong: argparse's own usage errors exit 2 too.
        print(f"cnnserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except CnnserveError as exc:
        print(f"cnnserve {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        extra = _EXTRA_OF_MODULE.get(top)
        if extra is None:
            raise
        print(f"cnnserve {args.command}: error: this command needs the Python package '{top}'; "
              f"install it with: pip install 'cnnserve[{extra.split()[0]}]'", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cnnserve {args.command}: interrupted", file=sys.stderr)
        return 130
    return code
