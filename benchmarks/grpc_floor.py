"""The memory floor of receiving large messages in Python gRPC: a reference for the soak.

A bare ``grpc.aio`` server with one generic unary handler that parses a ModelInferRequest
(as any OIP v2 server must) and answers INVALID_ARGUMENT at once: no engine, no validation,
no metrics. The soak sends it the same large failing bodies it sends cnnserve, in the same
run, and reports its resident-memory peak above its own baseline, so the soak's memory
target can be judged against what grpcio itself costs.

    python benchmarks/grpc_floor.py serve PORT_FILE   # the server (started by measure())
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from procstat import memory_mib

from cnnserve.proto import grpc_service_pb2 as pb

_METHOD = "/inference.GRPCInferenceService/ModelInfer"


async def _serve(port_file: Path, limit: int) -> None:
    async def refuse(request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        del request  # parsed, then dropped: the least an OIP v2 server can do
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "refused")
        raise AssertionError("unreachable")

    handler = grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(
            refuse, request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=pb.ModelInferResponse.SerializeToString)})
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", limit)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await asyncio.to_thread(port_file.write_text, str(port))
    await server.wait_for_termination()


def measure(bodies: list[bytes], limit: int, workdir: Path) -> tuple[float, float, float]:
    """Send ``bodies`` (serialized requests) one by one to a fresh bare server.

    Returns its resident memory in MiB: (before, peak, after).
    """
    port_file = workdir / "floor.port"
    port_file.unlink(missing_ok=True)
    process = subprocess.Popen([sys.executable, __file__, "serve", str(port_file), str(limit)])
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            if time.monotonic() > deadline:
                raise RuntimeError("the reference gRPC server did not start")
            time.sleep(0.05)
        port = int(port_file.read_text())
        time.sleep(0.5)
        before = peak = memory_mib(process.pid)
        options = [("grpc.max_send_message_length", limit)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            call = channel.unary_unary(_METHOD, request_serializer=lambda b: b,
                                       response_deserializer=pb.ModelInferResponse.FromString)
            for body in bodies:
                with contextlib.suppress(grpc.RpcError):
                    call(body, timeout=60)
                peak = max(peak, memory_mib(process.pid, "VmHWM"))
        time.sleep(1.0)
        return before, peak, memory_mib(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    asyncio.run(_serve(Path(sys.argv[2]), int(sys.argv[3])))
