"""Starting and stopping the REST server (aiohttp) on the gRPC server's event loop.

aiohttp because it is asyncio-native: it runs on the same loop as ``grpc.aio``, so REST
requests reach the one engine and batcher with no thread hop or second loop.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from aiohttp import web

from cnnserve.common.errors import CnnserveError
from cnnserve.server.http.app import build_app

if TYPE_CHECKING:
    from cnnserve.server.grpc.servicer import InferenceServicer
    from cnnserve.server.process.settings import Settings

#: Seconds an idle keep-alive connection stays open after the server stops listening.
SHUTDOWN_TIMEOUT_S = 1.0


class HttpServer:
    """A started REST server bound to ``port``; :meth:`stop` closes it."""

    def __init__(self, runner: web.AppRunner, port: int) -> None:
        self._runner = runner
        self.port = port

    async def stop(self) -> None:
        """Stop listening and close the connections (requests in progress finish first)."""
        await self._runner.cleanup()


async def create_http_server(servicer: InferenceServicer, settings: Settings, host: str,
                             port: int) -> HttpServer:
    """Bind and start REST on ``host:port`` (0: a free port) with the settings' TLS and token.

    Raises CnnserveError if a TLS file cannot be used or the address cannot be bound.
    """
    app = build_app(servicer, token=settings.token, max_body_bytes=settings.max_message_bytes)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=_tls(settings),
                           reuse_port=settings.reuse_port or None)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise CnnserveError(f"cannot serve REST on {host}:{port}: {exc.strerror}") from exc
    except BaseException:
        await runner.cleanup()
        raise
    server = site._server  # aiohttp exposes the bound sockets only here
    sockets = getattr(server, "sockets", None) or ()
    bound = sockets[0].getsockname()[1] if sockets else port
    return HttpServer(runner, int(bound))


def _tls(settings: Settings) -> ssl.SSLContext | None:
    """The settings' TLS as an SSLContext (mutual TLS with --tls-ca); None for plaintext."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
        if settings.tls_ca is not None:
            context.load_verify_locations(settings.tls_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise CnnserveError(f"cannot use the TLS files for REST: {exc}") from exc
    return context
