"""Reference servers the server benchmark measures cnnserve against.

``constant``: a plain grpc.aio KServe v2 server that answers every ModelInfer with one
precomputed all-zero response, running no model: the ceiling of what gRPC in Python can do here.
``naive``: the same server calling ONNX Runtime once per request on the event loop, with no
batching and no validation: what you get without a serving system.
``batched``: the least a batching server has to do: decode, queue, one hand-off per batch to
a worker thread running ONNX Runtime (one intra-op thread), split, answer. No validation,
metrics, deadlines or error handling: the floor under cnnserve's design.

All three serve one ONNX model (float32 or uint8 input, float32 outputs) under whatever
model name is asked for and answer what
perf_analyzer needs: ServerMetadata, ModelMetadata, ModelConfig (``max_batch_size`` > 0),
ModelStatistics (request, row and execution counts; durations all zero) and raw output tensors.
The wire types are tritonclient's generated stubs (Triton's own proto), not cnnserve's.

Run: python benchmarks/baseline_servers.py {constant,naive,batched} --port N --model m.onnx
"""

from __future__ import annotations

import argparse
import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

MAX_BATCH_SIZE = 256
Array = np.ndarray[Any, Any]


def _session(model: str, intra_op_threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


#: ONNX Runtime's type string -> (protocol datatype, numpy dtype, model-config enum name).
_TYPES = {"tensor(float)": ("FP32", np.float32, "TYPE_FP32"),
          "tensor(uint8)": ("UINT8", np.uint8, "TYPE_UINT8")}


def _dims(shape: list[Any]) -> list[int]:
    """The shape without its batch axis; a symbolic dimension becomes -1."""
    return [d if isinstance(d, int) else -1 for d in shape[1:]]


class ConstantServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """Answers ModelInfer with zeros of the model's output shapes, whatever was sent."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self._session = session
        self._inputs = [(i.name, _dims(i.shape)) for i in session.get_inputs()]
        self._outputs = [(o.name, _dims(o.shape)) for o in session.get_outputs()]
        # The input's datatype as the graph declares it: float32, or the uint8 pixels that
        # `cnnserve export` writes by default. Outputs are float32.
        self._in_type = _TYPES[session.get_inputs()[0].type]
        self._cache: dict[int, pb.ModelInferResponse] = {}
        self.requests = self.rows = self.executions = 0
        self._names: set[str] = set()  # model names asked about: the ones statistics list

    def _encode(self, model: str, request_id: str, outputs: list[Array]
                ) -> pb.ModelInferResponse:
        response = pb.ModelInferResponse(model_name=model, model_version="1", id=request_id)
        for (name, _), array in zip(self._outputs, outputs, strict=True):
            response.outputs.add(name=name, datatype="FP32", shape=list(array.shape))
            response.raw_output_contents.append(np.ascontiguousarray(array).tobytes())
        return response

    def _decode(self, request: pb.ModelInferRequest) -> Array:
        spec = request.inputs[0]
        rows = int(spec.shape[0])
        self.requests += 1
        self.rows += rows
        return np.frombuffer(request.raw_input_contents[0], self._in_type[1]).reshape(
            list(spec.shape))

    async def ModelInfer(self, request: pb.ModelInferRequest, context: object
                         ) -> pb.ModelInferResponse:
        rows = int(request.inputs[0].shape[0])
        self.requests += 1
        self.executions += 1
        self.rows += rows
        if rows not in self._cache:
            zeros = [np.zeros([rows, *dims], np.float32) for _, dims in self._outputs]
            self._cache[rows] = self._encode(request.model_name, "", zeros)
        response = pb.ModelInferResponse()
        response.CopyFrom(self._cache[rows])
        response.id = request.id
        return response

    async def ServerLive(self, request: Any, context: object) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: object) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: Any, context: object) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request: Any, context: object) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="reference", version="1",
                                         extensions=["model_configuration", "statistics"])

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: object
                            ) -> pb.ModelMetadataResponse:
        self._names.add(request.name)
        meta = pb.ModelMetadataResponse(name=request.name, versions=["1"],
                                        platform="onnxruntime_onnx")
        for name, dims in self._inputs:
            meta.inputs.add(name=name, datatype=self._in_type[0], shape=[-1, *dims])
        for name, dims in self._outputs:
            meta.outputs.add(name=name, datatype="FP32", shape=[-1, *dims])
        return meta

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: object
                          ) -> pb.ModelConfigResponse:
        config = mc.ModelConfig(name=request.name, platform="onnxruntime_onnx",
                                backend="onnxruntime", max_batch_size=MAX_BATCH_SIZE)
        for name, dims in self._inputs:
            config.input.add(name=name, data_type=getattr(mc, self._in_type[2]), dims=dims)
        for name, dims in self._outputs:
            config.output.add(name=name, data_type=mc.TYPE_FP32, dims=dims)
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: object
                              ) -> pb.ModelStatisticsResponse:
        """The counts of all requests, whichever name they used, under each name asked for."""
        response = pb.ModelStatisticsResponse()
        for name in [request.name] if request.name else sorted(self._names):
            stats = response.model_stats.add(name=name, version="1", inference_count=self.rows,
                                             execution_count=self.executions)
            # perf_analyzer tells which version served it by the queue count that grew.
            for counter in ("success", "queue", "compute_input", "compute_infer",
                            "compute_output"):
                getattr(stats.inference_stats, counter).count = self.requests
        return response


class NaiveServicer(ConstantServicer):
    """Runs ONNX Runtime on each request as it arrives, on the event loop, unbatched."""

    async def ModelInfer(self, request: pb.ModelInferRequest, context: object
                         ) -> pb.ModelInferResponse:
        x = self._decode(request)
        self.executions += 1
        outputs = self._session.run(None, {self._inputs[0][0]: x})
        return self._encode(request.model_name, request.id, outputs)


class BatchedServicer(ConstantServicer):
    """Merges whatever is queued into one ONNX Runtime run in a worker thread."""

    def __init__(self, session: ort.InferenceSession) -> None:
        super().__init__(session)
        self._worker = ThreadPoolExecutor(1)
        self._queue: list[tuple[Array, asyncio.Future[list[Array]]]] = []
        self._busy = False
        self._collector: asyncio.Task[None] | None = None

    async def ModelInfer(self, request: pb.ModelInferRequest, context: object
                         ) -> pb.ModelInferResponse:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[Array]] = loop.create_future()
        self._queue.append((self._decode(request), done))
        if not self._busy:
            self._busy = True
            self._collector = loop.create_task(self._collect())
        return self._encode(request.model_name, request.id, await done)

    def _run(self, inputs: list[Array]) -> list[list[Array]]:
        """One ORT run over all ``inputs``; each output split back per request."""
        batch = inputs[0] if len(inputs) == 1 else np.concatenate(inputs)
        outputs = self._session.run(None, {self._inputs[0][0]: batch})
        offsets = np.cumsum([len(x) for x in inputs])[:-1]
        per_output = [np.split(out, offsets) for out in outputs]
        return [list(parts) for parts in zip(*per_output, strict=True)]

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            batch, self._queue = self._queue, []
            self.executions += 1
            results = await loop.run_in_executor(self._worker, self._run, [x for x, _ in batch])
            for (_, done), outputs in zip(batch, results, strict=True):
                done.set_result(outputs)
        self._busy = False


async def serve(kind: str, port: int, model: str) -> None:
    """Serve ``model`` on 127.0.0.1:``port`` with the ``kind`` reference servicer, forever."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 256 << 20),
                                      ("grpc.max_send_message_length", 256 << 20)])
    servicer = (BatchedServicer(_session(model, intra_op_threads=1)) if kind == "batched"
                else NaiveServicer(_session(model)) if kind == "naive"
                else ConstantServicer(_session(model)))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["constant", "naive", "batched"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True, help="the model.onnx to serve")
    args = parser.parse_args()
    asyncio.run(serve(args.kind, args.port, args.model))


if __name__ == "__main__":
    main()
