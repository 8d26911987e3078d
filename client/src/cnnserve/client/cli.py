"""Subcommands of the client: ``cnnserve batch`` and ``cnnserve classify``.

Only the standard library is imported here; handlers import grpc, numpy and Pillow when they
run, and never torch or onnxruntime.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_URL = "localhost:8001"


def _connection_flags(p: argparse.ArgumentParser, *, timeout: float, retries: int) -> None:
    g = p.add_argument_group("connection")
    g.add_argument("--url", default=None,
                   help=f"server address host:port, or grpcs://host:port for TLS "
                        f"(env CNNSERVE_URL; default {DEFAULT_URL})")
    g.add_argument("--model", required=True, help="model name in the server's repository")
    g.add_argument("--model-version", default=None,
                   help="model version (default: the newest the server serves)")
    g.add_argument("--token", default=None,
                   help="bearer token (env CNNSERVE_TOKEN; prefer the variable: "
                        "command lines are visible to other users)")
    g.add_argument("--tls", action="store_true",
                   help="use TLS, verifying the server with the system's trusted roots")
    g.add_argument("--tls-ca", type=Path, default=None,
                   help="PEM CA certificate that verifies the server (implies --tls)")
    g.add_argument("--tls-cert", type=Path, default=None,
                   help="PEM client certificate for mutual TLS (with --tls-key)")
    g.add_argument("--tls-key", type=Path, default=None, help="PEM client private key")
    g.add_argument("--tls-server-name", default=None,
                   help="name to check in the server's certificate instead of the host")
    g.add_argument("--timeout", type=float, default=timeout,
                   help=f"deadline of each request attempt, seconds (default {timeout:g})")
    g.add_argument("--retries", type=int, default=retries,
                   help="retries of a request on UNAVAILABLE / RESOURCE_EXHAUSTED, with "
                        f"exponential backoff and jitter (default {retries})")


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add this part's subcommands to the ``cnnserve`` parser."""
    b = sub.add_parser(
        "batch", help="classify a dataset, folder or array file through the server",
        description="Send every item of INPUT to the server in batches and write one record "
                    "per item (id, predicted label, top-k with probabilities) to OUTPUT in "
                    "input order. Rerunning with the same OUTPUT resumes: items already "
                    "written are skipped. Exit status 1 if any item failed.")
    _connection_flags(b, timeout=60.0, retries=8)
    b.add_argument("--input", required=True,
                   help="a folder or glob of images, a single image, a .npy/.npz array "
                        "(uint8 pixels, or float model inputs), an IDX file, or a dataset "
                        "name such as fashion-mnist:test")
    b.add_argument("--output", required=True, type=Path, help="JSONL or CSV file to append to")
    b.add_argument("--format", choices=("jsonl", "csv"), default=None,
                   help="output format (default: csv if OUTPUT ends in .csv, else jsonl)")
    b.add_argument("--batch-size", type=int, default=64, help="items per request (default 64)")
    b.add_argument("--concurrency", type=int, default=4,
                   help="requests in flight at once (default 4)")
    b.add_argument("--top-k", type=int, default=3, help="classes per item (default 3)")
    b.add_argument("--retry-failed", action="store_true",
                   help="run again the items whose earlier record is an error")
    b.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    b.set_defaults(handler=_batch)

    c = sub.add_parser("classify", help="classify image files and print the top-k labels",
                       description="Classify each IMAGE (any format Pillow reads; resized and "
                                   "normalised for the model) and print its top-k labels.")
    _connection_flags(c, timeout=30.0, retries=3)
    c.add_argument("images", nargs="+", metavar="IMAGE", type=Path, help="image files")
    c.add_argument("--top-k", type=int, default=3, help="labels per image (default 3)")
    g = c.add_argument_group(
        "pixel scaling", "input = (pixel * SCALE - MEAN[c]) / STD[c], for models whose "
        "server publishes no normalisation (a flag given overrides what it publishes)")
    g.add_argument("--scale", type=float, default=None,
                   help="pixel multiplier (default 1/255: pixels 0..1; 1 keeps 0..255)")
    g.add_argument("--mean", type=_floats, default=None, metavar="M1,M2,M3",
                   help="per-channel mean subtracted after scaling (default 0)")
    g.add_argument("--std", type=_floats, default=None, metavar="S1,S2,S3",
                   help="per-channel divisor after the mean (default 1)")
    c.set_defaults(handler=_classify)


def _floats(text: str) -> tuple[float, ...]:
    """Comma-separated numbers, e.g. ``0.485,0.456,0.406``."""
    return tuple(float(part) for part in text.split(","))


def _connection(args: argparse.Namespace) -> dict[str, Any]:
    """URL, TLS and token keyword arguments from flags and environment."""
    from cnnserve.client._channel import TlsConfig

    tls: bool | TlsConfig = bool(args.tls)
    if args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name:
        tls = TlsConfig(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    return {"url": args.url or os.environ.get("CNNSERVE_URL") or DEFAULT_URL, "tls": tls,
            "token": args.token or os.environ.get("CNNSERVE_TOKEN") or None}


def _check_positive(**values: int) -> None:
    from cnnserve.common.errors import CnnserveError

    for name, value in values.items():
        if value < (0 if name == "retries" else 1):
            raise CnnserveError(f"--{name.replace('_', '-')} must be at least "
                                f"{0 if name == 'retries' else 1}, got {value}")


def _batch(args: argparse.Namespace) -> int:
    from cnnserve.client.batch.job import BatchOptions, run_batch_job
    from cnnserve.client.batch.results import Format

    _check_positive(batch_size=args.batch_size, concurrency=args.concurrency,
                    top_k=args.top_k, retries=args.retries)
    fmt: Format = args.format or ("csv" if args.output.suffix.lower() == ".csv" else "jsonl")
    options = BatchOptions(
        model=args.model, input=args.input, output=str(args.output), format=fmt,
        version=args.model_version, batch_size=args.batch_size, concurrency=args.concurrency,
        top_k=args.top_k, timeout=args.timeout, retries=args.retries,
        progress=not args.no_progress, retry_failed=args.retry_failed, **_connection(args))
    summary = run_batch_job(options)
    print(summary.format(), file=sys.stderr)
    if summary.failed:
        print(f"cnnserve batch: {summary.errors + summary.earlier_errors} items failed; their "
              f"records in {args.output} say why (rerun with --retry-failed to try them again)",
              file=sys.stderr)
        return 1
    return 0


def _classify(args: argparse.Namespace) -> int:
    import numpy as np

    from cnnserve.client._infer import PixelScaling
    from cnnserve.client.errors import ImageError
    from cnnserve.client.images import load_image
    from cnnserve.client.sync import InferenceClient

    _check_positive(top_k=args.top_k, retries=args.retries)
    status = 0
    with InferenceClient(timeout=args.timeout, retries=args.retries,
                         **_connection(args)) as client:
        info = client.model_info(args.model, args.model_version)
        pixels, names = [], []
        for path in args.images:
            try:
                pixels.append(load_image(path, info.image_shape))
                names.append(path)
            except ImageError as exc:
                print(f"{path}: error: {exc}", file=sys.stderr)
                status = 1
        if pixels:
            results = client.classify(args.model, np.stack(pixels), top_k=args.top_k,
                                      version=args.model_version,
                                      scaling=PixelScaling(args.scale, args.mean, args.std))
            for path, preds in zip(names, results, strict=True):
                print(f"{path}: " + ", ".join(f"{p.label} {p.probability:.4f}" for p in preds))
    return status
