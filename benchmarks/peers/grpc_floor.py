"""The floor of any Python gRPC server on this machine: a bare ``grpc.aio`` ModelInfer handler that parses
the request (as every server must) and answers bytes captured from tlserve's own answer, with no model,
no batching and no checks. Its requests/s and CPU per call bound what a grpc.aio front end can reach.

    python grpc_floor.py PORT RESPONSE_FILE      # serves on 127.0.0.1:PORT until SIGTERM
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

MODE = "grpc.aio floor"


async def serve(port: int, response: bytes) -> None:
    import grpc

    from tlserve.server.pb.inference import messages_pb2 as oip

    async def infer(request: oip.ModelInferRequest, context: grpc.aio.ServicerContext) -> bytes:
        return response

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(infer, request_deserializer=oip.ModelInferRequest.FromString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {"ModelInfer": handler}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(None)


def start(port: int, response_file: Path, payload: bytes, timeout: float = 60) -> subprocess.Popen:
    """The floor server as a subprocess of this interpreter, once it answers ``payload`` on ModelInfer."""
    import grpc

    process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(port), str(response_file)])
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        while True:
            try:
                infer(payload, timeout=2)
                return process
            except grpc.RpcError:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    raise SystemExit(f"the grpc.aio floor server did not answer within {timeout:g} s") from None
                time.sleep(0.2)


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), Path(sys.argv[2]).read_bytes()))
