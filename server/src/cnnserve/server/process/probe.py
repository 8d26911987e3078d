"""``python -m cnnserve.server.process.probe``: is the server serving? (container health check).

Calls the standard ``grpc.health.v1.Health/Check`` RPC once and exits 0 when the answer is
SERVING, 1 otherwise, printing one line that says why. Docker's HEALTHCHECK, Kubernetes'
exec probes and shell scripts can all use it; nothing is downloaded (no grpc_health_probe
binary), and it imports only grpcio and grpcio-health-checking (never torch or onnxruntime),
so it starts fast inside the server image.

Defaults come from the same ``CNNSERVE_*`` variables that configure the server in the same
container, so ``python -m cnnserve.server.process.probe`` with no arguments checks the local server:

- address: ``$CNNSERVE_PROBE_ADDRESS``, else ``$CNNSERVE_HOST:$CNNSERVE_GRPC_PORT`` with
  ``localhost`` for a wildcard bind address (the default 0.0.0.0) and port 8001 when unset;
- TLS: on when the server has a certificate (``CNNSERVE_TLS_CERT``) or a CA is given. The
  server is verified against ``$CNNSERVE_PROBE_TLS_CA``, else the server's client CA
  ``$CNNSERVE_TLS_CA``, else the server's own certificate (right for a self-signed one).
  For mutual TLS the probe presents ``$CNNSERVE_PROBE_TLS_CERT``/``_KEY``, else the server's
  own certificate and key (issue it for both serverAuth and clientAuth, or set those two).
  The name checked against the certificate is the address's host unless
  ``$CNNSERVE_PROBE_TLS_SERVER_NAME`` names another (the probe dials localhost).
- token: ``$CNNSERVE_PROBE_TOKEN``, else the server's ``$CNNSERVE_TOKEN``, sent as
  ``authorization: Bearer ...`` (health checks are open, but a proxy in front may want it).

Exit status: 0 SERVING; 1 anything else (NOT_SERVING, unknown model, unreachable, timeout,
TLS failure, bad arguments). Docker reserves status 2, so usage errors exit 1 as well.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

#: The server's own variables the probe reads; tests check `cnnserve serve --help` lists them.
SERVER_ENV = ("CNNSERVE_HOST", "CNNSERVE_GRPC_PORT", "CNNSERVE_TLS_CERT", "CNNSERVE_TLS_KEY",
              "CNNSERVE_TLS_CA", "CNNSERVE_TOKEN")
#: Bind addresses that mean "every interface": the probe then dials the loopback.
_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")
DEFAULT_GRPC_PORT = 8001
DEFAULT_TIMEOUT_S = 3.0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # Docker reads exit status 2 as "reserved"; a misconfigured probe must read as unhealthy.
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


@dataclass(frozen=True)
class ProbeTarget:
    """Where and how to call the health service. ``service`` "" is the whole server."""

    address: str
    service: str = ""
    timeout_s: float = DEFAULT_TIMEOUT_S
    tls: bool = False
    root_ca: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    server_name: str = ""
    token: str = ""


def default_address(env: Mapping[str, str]) -> str:
    """The local server's gRPC address from its ``CNNSERVE_HOST`` and ``CNNSERVE_GRPC_PORT``."""
    port = env.get("CNNSERVE_GRPC_PORT") or str(DEFAULT_GRPC_PORT)
    host = env.get("CNNSERVE_HOST", "").strip()
    host = "localhost" if host in _WILDCARD_HOSTS else host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal
    return f"{host}:{port}"


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """The probe's flags, with defaults taken from ``env`` (see the module docstring)."""
    parser = _Parser(
        prog="python -m cnnserve.server.process.probe",
        description="Check a cnnserve server with the gRPC health service; exit 0 if SERVING, "
                    "1 otherwise (one line says why).")
    parser.add_argument("--address", default=env.get("CNNSERVE_PROBE_ADDRESS")
                        or default_address(env),
                        help="host:port of the gRPC server (env CNNSERVE_PROBE_ADDRESS; default "
                             "$CNNSERVE_HOST:$CNNSERVE_GRPC_PORT, localhost for a wildcard "
                             f"host, port {DEFAULT_GRPC_PORT} when unset)")
    parser.add_argument("--model", default=env.get("CNNSERVE_PROBE_MODEL", ""),
                        help="check this model's health instead of the whole server's "
                             "(env CNNSERVE_PROBE_MODEL)")
    parser.add_argument("--timeout", type=float,
                        # a string default goes through type=float, so a bad value in the
                        # environment is a usage error (exit 1), not a traceback
                        default=env.get("CNNSERVE_PROBE_TIMEOUT") or str(DEFAULT_TIMEOUT_S),
                        help="seconds to wait for the answer, connecting included "
                             f"(env CNNSERVE_PROBE_TIMEOUT; default {DEFAULT_TIMEOUT_S})")
    parser.add_argument("--tls", action=argparse.BooleanOptionalAction, default=None,
                        help="use TLS (default: on when CNNSERVE_TLS_CERT or a CA is set)")
    parser.add_argument("--tls-ca", default=env.get("CNNSERVE_PROBE_TLS_CA")
                        or env.get("CNNSERVE_TLS_CA") or "",
                        help="PEM CA file to verify the server (env CNNSERVE_PROBE_TLS_CA, then "
                             "CNNSERVE_TLS_CA; default: trust the server's own certificate)")
    parser.add_argument("--tls-cert", default=env.get("CNNSERVE_PROBE_TLS_CERT") or "",
                        help="PEM client certificate for mutual TLS (env CNNSERVE_PROBE_TLS_CERT; "
                             "default: the server's certificate when CNNSERVE_TLS_CA is set)")
    parser.add_argument("--tls-key", default=env.get("CNNSERVE_PROBE_TLS_KEY") or "",
                        help="PEM key of --tls-cert (env CNNSERVE_PROBE_TLS_KEY)")
    parser.add_argument("--tls-server-name", default=env.get("CNNSERVE_PROBE_TLS_SERVER_NAME", ""),
                        help="name to verify in the server certificate instead of the address's "
                             "host (env CNNSERVE_PROBE_TLS_SERVER_NAME)")
    parser.add_argument("--token", default=env.get("CNNSERVE_PROBE_TOKEN")
                        or env.get("CNNSERVE_TOKEN") or "",
                        help="bearer token to send (env CNNSERVE_PROBE_TOKEN, then "
                             "CNNSERVE_TOKEN)")
    return parser


def resolve_target(args: argparse.Namespace, env: Mapping[str, str]) -> ProbeTarget:
    """Turn parsed flags into a :class:`ProbeTarget`, filling TLS files from the server's env."""
    server_cert = env.get("CNNSERVE_TLS_CERT") or ""
    tls = args.tls if args.tls is not None else bool(server_cert or args.tls_ca)
    root_ca = args.tls_ca or (server_cert if tls else "")
    client_cert, client_key = args.tls_cert, args.tls_key
    if tls and not client_cert and env.get("CNNSERVE_TLS_CA"):
        # The server asks for client certificates; present its own identity.
        client_cert, client_key = server_cert, env.get("CNNSERVE_TLS_KEY") or ""
    return ProbeTarget(
        address=args.address, service=args.model, timeout_s=args.timeout, tls=tls,
        root_ca=Path(root_ca) if root_ca else None,
        client_cert=Path(client_cert) if client_cert else None,
        client_key=Path(client_key) if client_key else None,
        server_name=args.tls_server_name, token=args.token)


def check(target: ProbeTarget) -> tuple[bool, str]:
    """Call Health/Check once; return (serving, one-line reason). Never raises for RPC errors.

    Raises OSError if a TLS file named in ``target`` cannot be read.
    """
    what = f"model '{target.service}'" if target.service else "server"
    options: list[tuple[str, str | int]] = []
    if target.server_name:
        options.append(("grpc.ssl_target_name_override", target.server_name))
    channel = (grpc.secure_channel(target.address, _credentials(target), options=options)
               if target.tls else grpc.insecure_channel(target.address, options=options))
    metadata = (("authorization", f"Bearer {target.token}"),) if target.token else None
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=target.service),
                           timeout=target.timeout_s, metadata=metadata, wait_for_ready=False)
    except grpc.RpcError as exc:
        return False, _explain(exc, target, what)
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return True, f"SERVING: {what} at {target.address}"
    return False, f"{status}: {what} at {target.address} is not serving"


def _credentials(target: ProbeTarget) -> grpc.ChannelCredentials:
    def read(path: Path | None) -> bytes | None:
        return path.read_bytes() if path else None

    return grpc.ssl_channel_credentials(root_certificates=read(target.root_ca),
                                        private_key=read(target.client_key),
                                        certificate_chain=read(target.client_cert))


def _explain(exc: grpc.RpcError, target: ProbeTarget, what: str) -> str:
    call = cast("grpc.Call", exc)  # the RpcError of a failed unary call is also its Call
    code, details = call.code(), call.details() or ""
    details = " ".join(details.split())  # one line, whatever the server or the stack said
    if code == grpc.StatusCode.NOT_FOUND:
        return f"NOT_FOUND: the server at {target.address} does not know {what}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"DEADLINE_EXCEEDED: no answer from {target.address} within {target.timeout_s:g} s"
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"UNAVAILABLE: cannot reach {target.address} ({details})"
    return f"{code.name}: health check of {what} at {target.address} failed ({details})"


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run the probe; returns the exit status (0 SERVING, 1 otherwise) after printing a line."""
    environ = os.environ if env is None else env
    args = build_parser(environ).parse_args(argv)
    try:
        target = resolve_target(args, environ)
        serving, reason = check(target)
    except OSError as exc:
        serving, reason = False, f"cannot read TLS file {exc.filename}: {exc.strerror}"
    except ValueError as exc:  # e.g. a negative timeout or a malformed address
        serving, reason = False, f"invalid probe settings: {exc}"
    print(reason, file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
