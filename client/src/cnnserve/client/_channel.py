"""Channel settings shared by the sync and asyncio clients: address, TLS, token, options."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from cnnserve.common.errors import CnnserveError, UsageError

#: Largest message either side may send, bytes: batch jobs carry many images per request and
#: grpcio's 4 MiB default is too small for them.
MAX_MESSAGE_BYTES = 512 * 1024 * 1024

#: Channel options. grpcio backs off reconnecting to a dead server for up to 120 s; a short
#: cap lets the client's own retries reach a restarted server within a second or two.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 30_000),
)


@dataclass(frozen=True)
class TlsConfig:
    """TLS for the channel; every path is a PEM file.

    ``ca_cert`` verifies the server (None: the system's trusted roots). ``client_cert`` and
    ``client_key`` (both or neither) authenticate the client for mutual TLS.
    ``server_name`` overrides the name checked against the server's certificate (for a
    certificate issued to a name other than the address dialled, e.g. in tests).
    """

    ca_cert: Path | str | None = None
    client_cert: Path | str | None = None
    client_key: Path | str | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """Read the PEM files; raises :class:`CnnserveError` naming a missing file."""
        if (self.client_cert is None) != (self.client_key is None):
            raise CnnserveError("mutual TLS needs both a client certificate and its key")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_cert, "CA certificate"),
            private_key=_read(self.client_key, "client key"),
            certificate_chain=_read(self.client_cert, "client certificate"))


def _read(path: Path | str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CnnserveError(f"cannot read the {what} {path}: {exc.strerror}") from exc


@dataclass(frozen=True)
class ChannelSpec:
    """Where and how to connect: the target, credentials (None: plaintext) and options."""

    target: str
    credentials: grpc.ChannelCredentials | None
    options: tuple[tuple[str, int | str], ...]
    metadata: tuple[tuple[str, str], ...]


def channel_spec(url: str, tls: bool | TlsConfig, token: str | None) -> ChannelSpec:
    """Resolve the clients' ``url``/``tls``/``token`` arguments.

    ``url`` is ``host:port``, optionally prefixed ``grpc://`` (plaintext) or ``grpcs://``
    (TLS with the system's roots unless ``tls`` says otherwise). ``token`` is sent as
    ``authorization: Bearer <token>`` on every call.
    """
    target = url
    use_tls: bool | TlsConfig = tls
    for scheme, secure in (("grpcs://", True), ("grpc://", False)):
        if url.startswith(scheme):
            target = url[len(scheme):]
            use_tls = tls if tls is not False else secure
    target = target.rstrip("/")
    _check_target(url, target)
    options: list[tuple[str, int | str]] = list(CHANNEL_OPTIONS)
    credentials = None
    if use_tls is not False:
        config = use_tls if isinstance(use_tls, TlsConfig) else TlsConfig()
        credentials = config.credentials()
        if config.server_name:
            options.append(("grpc.ssl_target_name_override", config.server_name))
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    return ChannelSpec(target, credentials, tuple(options), metadata)


#: What a gRPC address looks like, for the messages that reject another kind.
GRPC_ADDRESS_HINT = ("a gRPC address is host:port, e.g. localhost:8001 (cnnserve serve "
                     "--grpc-port), or grpcs://host:port for TLS")


def _check_target(url: str, target: str) -> None:
    """Reject an address that cannot be a gRPC server's before any connection is tried.

    Raises UsageError (the CLI exits 2): an empty address, an HTTP URL (the metrics or a
    REST endpoint), another scheme, or a path after the port.
    """
    if not target:
        raise UsageError(f"server address {url!r} is empty; {GRPC_ADDRESS_HINT}")
    scheme, sep, _ = target.partition("://")
    if sep:
        what = "an HTTP URL" if scheme.lower() in ("http", "https") else f"a {scheme}:// URL"
        raise UsageError(f"server address {url!r} is {what}, not a gRPC address; "
                         f"{GRPC_ADDRESS_HINT}")
    if "/" in target:
        raise UsageError(f"server address {url!r} has a path ({target[target.index('/'):]!r}); "
                         f"{GRPC_ADDRESS_HINT}")
