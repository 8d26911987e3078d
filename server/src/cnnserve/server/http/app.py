"""The REST server: routes of the KServe v2 / Triton HTTP protocol over the gRPC servicer.

Each route turns its path and body into the protocol request the gRPC servicer takes, awaits
the same servicer method (or, for inference, the shared :class:`Inference` path), and writes
the answer as JSON (messages.py, tensors.py). One engine, one validation, one set of metrics
for both protocols. Errors are answered ``{"error": "<message>"}`` with the HTTP status of the
domain error (:data:`HTTP_STATUS`); unexpected ones are logged and answered 500 "internal
server error". With a token every route except the two server health checks needs
``Authorization: Bearer <token>``, checked before the body is read.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from cnnserve.proto import grpc_service_pb2 as pb
from cnnserve.server.errors import InvalidRequest, ServingError, Status
from cnnserve.server.http.messages import to_json
from cnnserve.server.http.tensors import HEADER_LENGTH, from_response, to_request

if TYPE_CHECKING:
    from cnnserve.server.grpc.servicer import Context, InferenceServicer

logger = logging.getLogger(__name__)

#: HTTP status of each domain status (Triton's HTTP front end answers the same way).
HTTP_STATUS = {
    Status.INVALID_ARGUMENT: 400, Status.NOT_FOUND: 404, Status.UNAVAILABLE: 503,
    Status.DEADLINE_EXCEEDED: 504, Status.FAILED_PRECONDITION: 400, Status.INTERNAL: 500,
    Status.UNAUTHENTICATED: 401, Status.UNIMPLEMENTED: 501, Status.RESOURCE_EXHAUSTED: 429,
    Status.CANCELLED: 499,
}
#: Paths answered without a token, like the gRPC health checks.
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
INTERNAL_MESSAGE = "internal server error"
#: The servicer's handlers other than ModelInfer never read their context.
_NO_CONTEXT = cast("Context", None)
_MAX_BODY = web.AppKey("max_body_bytes", int)


def build_app(servicer: InferenceServicer, *, token: str | None,
              max_body_bytes: int) -> web.Application:
    """The aiohttp application serving ``servicer``'s engine over REST."""
    app = web.Application(client_max_size=max_body_bytes,
                          middlewares=[_errors, *([_auth(token)] if token else [])])
    app[_MAX_BODY] = max_body_bytes
    Routes(servicer).add_to(app.router)
    return app


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ServingError as exc:
        return error_response(HTTP_STATUS.get(exc.code, 500), str(exc))
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, f"the request body exceeds {request.app[_MAX_BODY]} bytes "
                              "(--max-message-bytes)")
    except web.HTTPException as exc:  # unknown path, wrong method
        return error_response(exc.status, exc.reason)
    except Exception:
        logger.exception("unexpected error in %s %s", request.method, request.path)
        return error_response(500, INTERNAL_MESSAGE)


def _auth(token: str) -> Middleware:
    expected = token.encode("utf-8")

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS or _bearer_ok(request.headers.get("Authorization"),
                                                    expected):
            return await handler(request)
        return error_response(401, "missing or invalid bearer token: send the header "
                              "'Authorization: Bearer <token>'")
    return check


def _bearer_ok(header: str | None, expected: bytes) -> bool:
    scheme, _, credential = (header or "").strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        credential.strip().encode("utf-8"), expected)


def error_response(status: int, message: str) -> web.Response:
    """``{"error": message}`` with ``status``."""
    return web.json_response({"error": message}, status=status)


class Routes:
    """The protocol's routes; paths with and without ``/versions/{version}`` alike."""

    def __init__(self, servicer: InferenceServicer) -> None:
        self._servicer = servicer

    def add_to(self, router: web.UrlDispatcher) -> None:
        """Register every route (the fixed ``/v2/models/stats`` before ``{model}``)."""
        router.add_get("/v2/health/live", self.live)
        router.add_get("/v2/health/ready", self.ready)
        router.add_get("/v2", self.server_metadata)
        router.add_get("/v2/models/stats", self.statistics)
        router.add_post("/v2/repository/index", self.index)
        router.add_post("/v2/repository/models/{model}/load", self.load)
        router.add_post("/v2/repository/models/{model}/unload", self.unload)
        for model in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            router.add_get(model, self.model_metadata)
            router.add_get(model + "/ready", self.model_ready)
            router.add_get(model + "/config", self.model_config)
            router.add_get(model + "/stats", self.statistics)
            router.add_post(model + "/infer", self.infer)

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        answer = await self._servicer.ServerReady(pb.ServerReadyRequest(), _NO_CONTEXT)
        return web.json_response({"ready": answer.ready}, status=200 if answer.ready else 503)

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        answer = await self._servicer.ModelReady(
            pb.ModelReadyRequest(name=name, version=version), _NO_CONTEXT)
        return web.json_response({"name": name, "ready": answer.ready},
                                 status=200 if answer.ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        answer = await self._servicer.ServerMetadata(pb.ServerMetadataRequest(), _NO_CONTEXT)
        return web.json_response(to_json(answer))

    async def model_metadata(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        answer = await self._servicer.ModelMetadata(
            pb.ModelMetadataRequest(name=name, version=version), _NO_CONTEXT)
        return web.json_response(to_json(answer))

    async def model_config(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        answer = await self._servicer.ModelConfig(
            pb.ModelConfigRequest(name=name, version=version), _NO_CONTEXT)
        return web.json_response(to_json(answer.config))  # Triton answers the bare config

    async def statistics(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        answer = await self._servicer.ModelStatistics(
            pb.ModelStatisticsRequest(name=name, version=version), _NO_CONTEXT)
        return web.json_response(to_json(answer))

    async def index(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidRequest("'ready' must be true or false")
        answer = await self._servicer.RepositoryIndex(pb.RepositoryIndexRequest(ready=ready),
                                                      _NO_CONTEXT)
        return web.json_response([to_json(m) for m in answer.models])

    async def load(self, request: web.Request) -> web.Response:
        load = pb.RepositoryModelLoadRequest(model_name=request.match_info["model"])
        for key in _parameters(await _json_body(request)):
            load.parameters[key].string_param = ""  # any parameter is refused by name
        await self._servicer.RepositoryModelLoad(load, _NO_CONTEXT)
        return web.json_response({})

    async def unload(self, request: web.Request) -> web.Response:
        unload = pb.RepositoryModelUnloadRequest(model_name=request.match_info["model"])
        for key, value in _parameters(await _json_body(request)).items():
            if isinstance(value, bool):
                unload.parameters[key].bool_param = value
            else:
                unload.parameters[key].string_param = str(value)
        await self._servicer.RepositoryModelUnload(unload, _NO_CONTEXT)
        return web.json_response({})

    async def infer(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        rest = to_request(name, version, await request.read(),
                          request.headers.get(HEADER_LENGTH))
        answer = await self._servicer.inference.infer(rest.request, None)
        body, header_length = from_response(answer, rest)
        if header_length is None:
            return web.Response(body=body, content_type="application/json")
        return web.Response(body=body, content_type="application/octet-stream",
                            headers={HEADER_LENGTH: str(header_length)})


def _model(request: web.Request) -> tuple[str, str]:
    return request.match_info.get("model", ""), request.match_info.get("version", "")


async def _json_body(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object; an empty body is ``{}``."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def _parameters(body: dict[str, Any]) -> dict[str, Any]:
    params = body.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidRequest("'parameters' must be a JSON object")
    return params
