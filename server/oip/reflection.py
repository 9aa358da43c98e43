"""A descriptor pool for server reflection that also describes ``inference.GRPCInferenceService``.

The service's generated module is never imported (its descriptor would clash with tritonclient's
in one process), so the default pool cannot describe the service and grpcurl cannot call it. This
pool holds the given files with their dependencies, plus the service's file, read from the
generated module's source without executing it. Pass it to
``grpc_reflection.v1alpha.reflection.enable_server_reflection(names, server, pool=...)``.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor

from tlserve.server.pb.inference import messages_pb2

SERVICE_MODULE = "tlserve.server.pb.inference.grpc_service_pb2"


def service_file() -> bytes:
    """The serialized FileDescriptorProto that the generated service module would register."""
    spec = importlib.util.find_spec(SERVICE_MODULE)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"{SERVICE_MODULE} is missing: regenerate server/pb")
    source = Path(spec.origin).read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile":
            return ast.literal_eval(node.args[0])
    raise RuntimeError(f"{SERVICE_MODULE} registers no serialized file: regenerate server/pb")


def reflection_pool(*files: FileDescriptor) -> descriptor_pool.DescriptorPool:
    """A private pool with ``files`` (e.g. ``tlserve_pb2.DESCRIPTOR``), their imports, and the OIP service."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        pool.AddSerializedFile(file.serialized_pb)
        added.add(file.name)

    for file in (*files, messages_pb2.DESCRIPTOR):
        add(file)
    pool.AddSerializedFile(service_file())
    return pool
