"""The options of ``cnnserve batch`` and ``cnnserve classify``: one frozen dataclass each.

Each field is one flag (its name, default and help in one place; :mod:`cnnserve.common.options`
generates the argparse flags from them). The connection flags both commands share are the
fields of :class:`ConnectionOptions`; a command's class inherits them and may change their
defaults. Only ``--url`` and ``--token`` also read a variable (``CNNSERVE_URL``,
``CNNSERVE_TOKEN``); a flag wins over its variable, an empty variable counts as unset.
Standard library only, so ``cnnserve --help`` describes the flags without importing grpc.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from cnnserve.common import options
from cnnserve.common.errors import CnnserveError
from cnnserve.common.options import option

if TYPE_CHECKING:
    from cnnserve.client._channel import TlsConfig

ENV_PREFIX = "CNNSERVE_"
DEFAULT_URL = "localhost:8001"

Format = Literal["jsonl", "csv", "parquet"]
Engine = Literal["local", "ray"]
OptionsT = TypeVar("OptionsT", bound="ConnectionOptions")


@dataclass(frozen=True, kw_only=True)
class ConnectionOptions:
    """Where the server is, which model, and how to reach it: flags every client command has."""

    url: tuple[str, ...] = option((DEFAULT_URL,),
        "server address host:port, or grpcs://host:port for TLS; repeat it (variable: "
        "comma-separated) to spread a --engine ray job over several servers "
        f"(default {DEFAULT_URL})", env="URL")
    model: str = option(help="model name in the server's repository", env=False)
    model_version: str | None = option(None,
        "model version (default: the newest the server serves)", env=False)
    token: str | None = option(None,
        "bearer token; prefer the variable: command lines are visible to other users",
        repr=False)
    tls: bool = option(False,
        "use TLS, verifying the server with the system's trusted roots (default off)",
        env=False)
    tls_ca: Path | None = option(None,
        "PEM CA certificate that verifies the server (implies --tls)", env=False)
    tls_cert: Path | None = option(None,
        "PEM client certificate for mutual TLS (with --tls-key)", env=False)
    tls_key: Path | None = option(None, "PEM client private key", env=False)
    tls_server_name: str | None = option(None,
        "name to check in the server's certificate instead of the host", env=False)
    timeout: float = option(30.0,
        "deadline of each request attempt, seconds (default 30)", env=False)
    retries: int = option(3,
        "retries of a request on UNAVAILABLE / RESOURCE_EXHAUSTED, with exponential backoff "
        "and jitter (default 3)", env=False)

    def __post_init__(self) -> None:
        given: Any = self.url
        if isinstance(given, str):  # one address, as callers naturally pass it
            object.__setattr__(self, "url", (given,))
        if not self.url or not all(self.url):
            raise CnnserveError("--url must name a server, e.g. localhost:8001")
        if self.retries < 0:
            raise CnnserveError(f"--retries must be at least 0, got {self.retries}")
        if self.timeout <= 0:
            raise CnnserveError(f"--timeout must be positive, got {self.timeout:g}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise CnnserveError("--tls-cert and --tls-key go together: give both or neither")

    @property
    def address(self) -> str:
        """The server, for commands that talk to one; raises if several were given."""
        if len(self.url) > 1:
            raise CnnserveError(f"this command talks to one server; got --url "
                                f"{', '.join(self.url)} (several are for --engine ray)")
        return self.url[0]

    def tls_setting(self) -> bool | TlsConfig:
        """The SDK's ``tls=`` argument: False, True, or the files of a :class:`TlsConfig`."""
        if self.tls_ca or self.tls_cert or self.tls_key or self.tls_server_name:
            from cnnserve.client._channel import TlsConfig

            return TlsConfig(self.tls_ca, self.tls_cert, self.tls_key, self.tls_server_name)
        return self.tls

    @classmethod
    def build(cls: type[OptionsT], flags: Mapping[str, Any], environ: Mapping[str, str] = {},
              **fixed: Any) -> OptionsT:
        """The options from parsed flags (None = not given) over variables over defaults.

        Raises :class:`CnnserveError` for a value out of range, naming its flag.
        """
        set_vars = {k: v for k, v in environ.items() if v}  # CNNSERVE_TOKEN= means no token
        return options.build_options(cls, flags, set_vars, env_prefix=ENV_PREFIX, **fixed)


def _at_least(minimum: int, **values: int) -> None:
    for name, value in values.items():
        if value < minimum:
            raise CnnserveError(f"--{name.replace('_', '-')} must be at least {minimum}, "
                                f"got {value}")


def floats(text: str) -> tuple[float, ...]:
    """Comma-separated numbers, e.g. ``0.485,0.456,0.406``; raises ValueError otherwise."""
    return tuple(float(part) for part in text.split(","))


@dataclass(frozen=True, kw_only=True)
class ClassifyOptions(ConnectionOptions):
    """``cnnserve classify``: print the top-k labels of a few image files."""

    images: tuple[Path, ...] = option(help="image files", positional=True, metavar="IMAGE")
    top_k: int = option(3, "labels per image (default 3)", env=False)
    # Pixel scaling: input = (pixel * SCALE - MEAN[c]) / STD[c], for models whose server
    # publishes no normalisation (a flag given overrides what it publishes).
    scale: float | None = option(
        None, "pixel multiplier for models that publish no normalisation (default 1/255: "
        "pixels 0..1; 1 keeps 0..255)", env=False)
    mean: tuple[float, ...] | None = option(
        None, "per-channel mean subtracted after scaling, comma-separated, e.g. "
        "0.485,0.456,0.406 (default 0)", env=False, parse=floats, metavar="M1,M2,M3")
    std: tuple[float, ...] | None = option(
        None, "per-channel divisor after the mean, comma-separated (default 1)", env=False,
        parse=floats, metavar="S1,S2,S3")

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least(1, top_k=self.top_k)


@dataclass(frozen=True, kw_only=True)
class BatchOptions(ConnectionOptions):
    """``cnnserve batch`` (and :func:`cnnserve.client.batch.job.run_batch_job`): one job."""

    timeout: float = option(60.0,
        "deadline of each request attempt, seconds (default 60)", env=False)
    retries: int = option(8,
        "retries of a request the server refuses as overloaded (RESOURCE_EXHAUSTED), with "
        "exponential backoff and jitter; a server that is down or restarting is waited for "
        "instead, see --max-outage (default 8)", env=False)
    input: str = option(help=
        "a folder or glob of images, a single image, a .npy/.npz array (uint8 pixels, or float "
        "model inputs), an IDX file, or a dataset name such as fashion-mnist:test", env=False)
    output: Path = option(help="JSONL or CSV file to append to", env=False)
    format: Format | None = option(None,
        "output format (default: csv if OUTPUT ends in .csv, else jsonl)", env=False)
    batch_size: int = option(64, "items per request (default 64)", env=False)
    concurrency: int = option(4, "requests in flight at once (default 4)", env=False)
    top_k: int = option(3, "classes per item (default 3)", env=False)
    retry_failed: bool = option(False,
        "run again the items whose earlier record is an error (default off)", env=False)
    max_outage: float = option(300.0,
        "longest the job waits for a server that is down or restarting, seconds; all "
        "requests pause meanwhile and no item fails. Past it the job stops, and rerunning "
        "it resumes (default 300)", env=False)
    summary_json: Path | None = option(None,
        "also write the summary (counts, items/s, latency percentiles, accuracy) as JSON here",
        env=False)
    engine: Engine = option("local",
        "local: this process sends the requests; ray: a Ray Data job, its output a folder of "
        "one part file per block (needs the batch-ray extra) (default local)", env=False)
    ray_address: str | None = option(None,
        "Ray cluster to run on, e.g. 10.0.0.1:6379 (default: RAY_ADDRESS, else the cluster "
        "started last on this machine, else a new local one)", env=False)
    repository: Path | None = option(None,
        "--engine ray in-process mode: each Ray actor runs ONNX Runtime on "
        "REPOSITORY/MODEL/VERSION (the newest without --model-version), a path every node can "
        "read, instead of calling servers", env=False)
    ray_actors: int | None = option(None,
        "--engine ray: actors in the pool (default: in-process, the cluster's CPUs / "
        "--ray-threads; via servers, --concurrency)", env=False)
    ray_threads: int = option(1,
        "--engine ray in-process: ONNX Runtime threads per actor; each actor reserves that "
        "many CPUs (default 1)", env=False)
    block_size: int = option(1024,
        "--engine ray: items per block, the unit of Ray's work, retries and resume; one "
        "output file each (default 1024)", env=False)
    progress: bool = option(True,
        "progress on stderr: a bar on a terminal, plain lines otherwise (default on)",
        env=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "output", Path(self.output))  # callers may pass a str
        _at_least(1, batch_size=self.batch_size, concurrency=self.concurrency,
                  top_k=self.top_k)
        _at_least(1, ray_threads=self.ray_threads, block_size=self.block_size,
                  ray_actors=self.ray_actors or 1)
        if self.engine == "local":
            ray_only = {"Parquet output": self.output_format == "parquet",
                        "--repository": self.repository is not None,
                        "--ray-address": self.ray_address is not None,
                        "--ray-actors": self.ray_actors is not None,
                        "several --url": len(self.url) > 1}
            given = [flag for flag, used in ray_only.items() if used]
            if given:
                raise CnnserveError(f"{', '.join(given)} need --engine ray")
        if self.max_outage < 0:
            raise CnnserveError(f"--max-outage must be >= 0 seconds, got {self.max_outage:g}")

    @property
    def output_format(self) -> Format:
        """``format``, or what the output's suffix says (``.csv``, ``.parquet``, else JSONL)."""
        if self.format is not None:
            return self.format
        suffix = self.output.suffix.lower()
        return "csv" if suffix == ".csv" else "parquet" if suffix == ".parquet" else "jsonl"
