"""Docker HEALTHCHECK: exit 0 when the gRPC health service "" answers SERVING.

It asks the plaintext health-only port $TLSERVE_HEALTH_PORT when one is set (needed once the main
port speaks TLS), else $TLSERVE_PORT. Kubernetes uses its native gRPC probes instead; this serves
plain `docker run` and compose.
"""

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def target() -> str:
    health_port = os.environ.get("TLSERVE_HEALTH_PORT", "")
    if health_port.isdigit() and int(health_port) > 0:
        return f"127.0.0.1:{health_port}"
    return f"127.0.0.1:{os.environ.get('TLSERVE_PORT', '50051')}"


def main() -> int:
    with grpc.insecure_channel(target()) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
        except grpc.RpcError:
            return 1
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
