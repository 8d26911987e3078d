"""Subcommands of the client: ``cnnserve batch`` and ``cnnserve classify``.

The flags are generated from :class:`~cnnserve.client.options.BatchOptions` and
:class:`~cnnserve.client.options.ClassifyOptions` (standard library only); handlers import
grpc, numpy and Pillow when they run, and never torch or onnxruntime.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from cnnserve.client.options import ENV_PREFIX, BatchOptions, ClassifyOptions
from cnnserve.common.options import add_flags

_EPILOG = "A flag's environment variable is shown as [env NAME]; flags win over variables."


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add this part's subcommands to the ``cnnserve`` parser."""
    b = sub.add_parser(
        "batch", help="classify a dataset, folder or array file through the server",
        description="Send every item of INPUT to the server in batches and write one record "
                    "per item (id, predicted label, top-k with probabilities) to OUTPUT in "
                    "input order. Rerunning with the same OUTPUT resumes: items already "
                    "written are skipped. Exit status 1 if any item failed.", epilog=_EPILOG)
    add_flags(b, BatchOptions, env_prefix=ENV_PREFIX)
    b.set_defaults(handler=_batch)

    c = sub.add_parser("classify", help="classify image files and print the top-k labels",
                       description="Classify each IMAGE (any format Pillow reads; resized and "
                                   "normalised for the model) and print its top-k labels.",
                       epilog=_EPILOG)
    add_flags(c, ClassifyOptions, env_prefix=ENV_PREFIX)
    c.set_defaults(handler=_classify)


def _batch(args: argparse.Namespace) -> int:
    from cnnserve.client import _tracing
    from cnnserve.client.batch.job import run_batch_job

    options = BatchOptions.build(vars(args), os.environ)
    # Spans of the job's requests go over OTLP only when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    provider = _tracing.configure(os.environ)
    try:
        summary = run_batch_job(options)
    finally:
        if provider is not None:
            provider.shutdown()  # flush the spans before the process exits
    print(summary.format(), file=sys.stderr)
    if summary.failed:
        print(f"cnnserve batch: {summary.errors + summary.earlier_errors} items failed; their "
              f"records in {options.output} say why (rerun with --retry-failed to try them "
              "again)", file=sys.stderr)
        return 1
    return 0


def _classify(args: argparse.Namespace) -> int:
    import numpy as np

    from cnnserve.client._infer import PixelScaling
    from cnnserve.client.errors import ImageError
    from cnnserve.client.images import load_image
    from cnnserve.client.sync import InferenceClient

    options = ClassifyOptions.build(vars(args), os.environ)
    status = 0
    with InferenceClient(options.address, timeout=options.timeout, retries=options.retries,
                         tls=options.tls_setting(), token=options.token) as client:
        info = client.model_info(options.model, options.model_version)
        pixels, names = [], []
        for path in options.images:
            try:
                pixels.append(load_image(path, info.image_shape))
                names.append(path)
            except ImageError as exc:
                print(f"{path}: error: {exc}", file=sys.stderr)
                status = 1
        if pixels:
            results = client.classify(options.model, np.stack(pixels), top_k=options.top_k,
                                      version=options.model_version,
                                      scaling=PixelScaling(options.scale, options.mean,
                                                           options.std))
            for path, preds in zip(names, results, strict=True):
                print(f"{path}: " + ", ".join(f"{p.label} {p.probability:.4f}" for p in preds))
    return status
