"""ModelStreamInfer: many inference requests on one bidirectional stream, as Triton serves it.

Each request on the stream starts as soon as it arrives (so a stream's requests batch together
in the engine like concurrent unary calls) and is answered by one ModelStreamInferResponse
when it finishes: answers may overtake each other, and clients match them by the request
``id`` echoed in ``infer_response``. A request that fails is answered with ``error_message``
(the same message a unary call would get as its status details; unexpected errors only
"internal server error") and the stream stays open. At most :data:`STREAM_WINDOW` requests of
one stream run at once; beyond that the stream stops reading, and gRPC flow control pushes
back on the client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from cnnserve.proto import grpc_service_pb2 as pb
from cnnserve.server.errors import ServingError
from cnnserve.server.grpc.inference import Inference

logger = logging.getLogger(__name__)

#: Requests of one stream in flight at once (a bound on the memory one client can tie up).
STREAM_WINDOW = 1024
INTERNAL_MESSAGE = "internal server error"


async def answer_stream(inference: Inference, requests: AsyncIterator[pb.ModelInferRequest]
                        ) -> AsyncIterator[pb.ModelStreamInferResponse]:
    """Yield one response per request of ``requests``, in completion order.

    Ends when the client half-closes the stream and every request has been answered; when
    the call is cancelled, the requests still running are cancelled with it.
    """
    answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
    window = asyncio.Semaphore(STREAM_WINDOW)
    running: set[asyncio.Future[None]] = set()

    async def answer(request: pb.ModelInferRequest) -> None:
        try:
            answers.put_nowait(pb.ModelStreamInferResponse(
                infer_response=await inference.infer(request, None)))
        except ServingError as exc:
            answers.put_nowait(_error(request, str(exc)))
        except Exception:
            logger.exception("unexpected error in ModelStreamInfer")
            answers.put_nowait(_error(request, INTERNAL_MESSAGE))
        finally:
            window.release()

    async def read() -> None:
        try:
            async for request in requests:
                await window.acquire()
                task = asyncio.ensure_future(answer(request))
                running.add(task)
                task.add_done_callback(running.discard)
            if running:
                await asyncio.wait(set(running))
        finally:
            answers.put_nowait(None)

    reader = asyncio.ensure_future(read())
    try:
        while (response := await answers.get()) is not None:
            yield response
        await reader  # re-raises a failure to read the stream
    finally:
        reader.cancel()
        for task in list(running):
            task.cancel()


def _error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    """A failed request's answer: the message, and the id so clients can match it."""
    return pb.ModelStreamInferResponse(error_message=message, infer_response=pb.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version, id=request.id))
