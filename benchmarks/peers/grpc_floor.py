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
    from served import wait_ready  # the benchmark's side only: this file also runs as the server's script

    process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(port), str(response_file)])
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        try:
            wait_ready(process, lambda: infer(payload, timeout=2) is not None, timeout, pause=0.2)
        except (RuntimeError, TimeoutError) as exc:
            process.kill()
            raise SystemExit(f"the grpc.aio floor server {exc}") from None
    return process


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), Path(sys.argv[2]).read_bytes()))
