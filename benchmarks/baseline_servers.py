"""Reference servers the server benchmark measures cnnserve against.

``constant``: a plain grpc.aio KServe v2 server that answers every ModelInfer with one
precomputed response, running no model: the ceiling of what gRPC in Python can do here.
``naive``: the same server calling ONNX Runtime once per request on the event loop, with no
batching: what you get without a serving system.

Run: python benchmarks/baseline_servers.py {constant,naive} --port N [--model model.onnx]
"""

from __future__ import annotations

import argparse
import asyncio

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


async def serve(kind: str, port: int, model: str | None) -> None:
    server = grpc.aio.server()
    servicer = ConstantServicer() if kind == "constant" else NaiveServicer(str(model))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=["constant", "naive"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", help="model.onnx for the naive server")
    args = parser.parse_args()
    asyncio.run(serve(args.kind, args.port, args.model))


if __name__ == "__main__":
    main()
