"""Reference servers the server benchmark measures cnnserve against.

``constant``: a plain grpc.aio KServe v2 server that answers every ModelInfer with one
precomputed response, running no model: the ceiling of what gRPC in Python can do here.
``naive``: the same server calling ONNX Runtime once per request on the event loop, with no
batching: what you get without a serving system.
``batched``: the least a batching server has to do: decode, queue, one hand-off per batch to
a worker thread running ONNX Runtime (one intra-op thread), split, answer. No validation,
metrics, statistics, deadlines or error handling: the floor under cnnserve's design.

Run: python benchmarks/baseline_servers.py {constant,naive,batched} --port N [--model m.onnx]
"""

from __future__ import annotations

import argparse
import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np

from cnnserve.proto import grpc_service_pb2 as pb
from cnnserve.proto import grpc_service_pb2_grpc as pb_grpc


class ConstantServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """Answers ModelInfer with the same ten logits per batch item, whatever was sent."""

    def __init__(self) -> None:
        self._cache: dict[int, pb.ModelInferResponse] = {}

    def _response(self, rows: int) -> pb.ModelInferResponse:
        if rows not in self._cache:
            out = pb.ModelInferResponse(model_name="lenet", model_version="1")
            out.outputs.add(name="logits", datatype="FP32", shape=[rows, 10])
            out.raw_output_contents.append(np.zeros((rows, 10), np.float32).tobytes())
            self._cache[rows] = out
        return self._cache[rows]

    async def ModelInfer(self, request: pb.ModelInferRequest, context: object
                         ) -> pb.ModelInferResponse:
        response = pb.ModelInferResponse()
        response.CopyFrom(self._response(int(request.inputs[0].shape[0])))
        response.id = request.id
        return response

    async def ServerReady(self, request: pb.ServerReadyRequest, context: object
                          ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)


class NaiveServicer(ConstantServicer):
    """Runs ONNX Runtime on each request as it arrives, on the event loop, unbatched."""

    def __init__(self, model: str) -> None:
        super().__init__()
        import onnxruntime as ort

        self._session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])

    async def ModelInfer(self, request: pb.ModelInferRequest, context: object
                         ) -> pb.ModelInferResponse:
        spec = request.inputs[0]
        x = np.frombuffer(request.raw_input_contents[0], np.float32).reshape(list(spec.shape))
        (logits,) = self._session.run(None, {spec.name: x})
        out = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        out.outputs.add(name="logits", datatype="FP32", shape=list(logits.shape))
        out.raw_output_contents.append(np.ascontiguousarray(logits).tobytes())
        return out


class BatchedServicer(ConstantServicer):
    """Merges whatever is queued into one ONNX Runtime run in a worker thread."""

    def __init__(self, model: str) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self._session = ort.InferenceSession(model, options,
                                             providers=["CPUExecutionProvider"])
        self._worker = ThreadPoolExecutor(1)
        self._queue: list[tuple[np.ndarray[Any, Any], asyncio.Future[Any]]] = []
        self._busy = False
        self._collector: asyncio.Task[None] | None = None

    async def ModelInfer(self, request: pb.ModelInferRequest, context: object
                         ) -> pb.ModelInferResponse:
        spec = request.inputs[0]
        x = np.frombuffer(request.raw_input_contents[0], np.float32).reshape(list(spec.shape))
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._queue.append((x, done))
        if not self._busy:
            self._busy = True
            self._collector = loop.create_task(self._collect())
        logits = await done
        out = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        out.outputs.add(name="logits", datatype="FP32", shape=list(logits.shape))
        out.raw_output_contents.append(logits.tobytes())
        return out

    def _run(self, inputs: list[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        batch = inputs[0] if len(inputs) == 1 else np.concatenate(inputs)
        (logits,) = self._session.run(None, {"input": batch})
        offsets = np.cumsum([len(x) for x in inputs])[:-1]
        return list(np.split(logits, offsets))

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            batch, self._queue = self._queue, []
            outputs = await loop.run_in_executor(self._worker, self._run, [x for x, _ in batch])
            for (_, done), logits in zip(batch, outputs, strict=True):
                done.set_result(logits)
        self._busy = False


async def serve(kind: str, port: int, model: str | None) -> None:
    server = grpc.aio.server()
    servicer = (ConstantServicer() if kind == "constant" else NaiveServicer(str(model))
                if kind == "naive" else BatchedServicer(str(model)))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=["constant", "naive", "batched"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", help="model.onnx for the naive and batched servers")
    args = parser.parse_args()
    asyncio.run(serve(args.kind, args.port, args.model))


if __name__ == "__main__":
    main()
