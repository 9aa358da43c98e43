"""Our inference.* protos against the public specification as tritonclient ships it: same field
numbers, types and labels for every message we define, same methods on the same service path."""

from pathlib import Path

import pytest

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")

from google.protobuf import descriptor_pb2, descriptor_pool  # noqa: E402
from grpc_tools import protoc  # noqa: E402

from tlserve.server.pb.inference import messages_pb2, model_config_pb2  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

OURS = "inference.v2."
THEIRS = "inference."


def _theirs(full_name: str):
    pool = tritonclient_grpc.service_pb2.DESCRIPTOR.pool
    return pool.FindMessageTypeByName(THEIRS + full_name[len(OURS) :])


def _all_messages():
    for module in (messages_pb2, model_config_pb2):
        stack = list(module.DESCRIPTOR.message_types_by_name.values())
        while stack:
            message = stack.pop()
            stack.extend(message.nested_types)
            yield message


@pytest.mark.parametrize("ours", list(_all_messages()), ids=lambda d: d.full_name)
def test_every_field_matches_the_specification(ours):
    theirs = _theirs(ours.full_name)
    for field in ours.fields:
        spec = theirs.fields_by_name.get(field.name)
        assert spec is not None, f"{ours.full_name}.{field.name} is not in the specification"
        assert (field.number, field.type, field.is_repeated) == (spec.number, spec.type, spec.is_repeated), (
            f"{ours.full_name}.{field.name} differs from the specification"
        )
        if field.message_type is not None:
            assert field.message_type.full_name[len(OURS) :] == spec.message_type.full_name[len(THEIRS) :]
        if field.enum_type is not None:
            spec_values = {v.name: v.number for v in spec.enum_type.values}
            assert all(spec_values.get(v.name) == v.number for v in field.enum_type.values)


def compiled_service(tmp_path):
    """The service as protoc compiles it, in a private pool: the generated grpc_service_pb2 cannot
    share the default pool with tritonclient's (same service name), and the server never imports it."""
    out = tmp_path / "set.pb"
    proto = ROOT / "proto"
    assert (
        protoc.main(
            [
                "protoc",
                f"-Itlserve/server/pb={proto}",
                f"--descriptor_set_out={out}",
                "--include_imports",
                "tlserve/server/pb/inference/grpc_service.proto",
            ]
        )
        == 0
    )
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file:
        pool.Add(file)
    return pool.FindServiceByName("inference.GRPCInferenceService")


def test_service_keeps_its_public_name_and_methods(tmp_path):
    ours = compiled_service(tmp_path)
    theirs = tritonclient_grpc.service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    for method in ours.methods:
        spec = theirs.methods_by_name[method.name]
        assert method.input_type.name == spec.input_type.name
        assert method.output_type.name == spec.output_type.name
        assert (method.client_streaming, method.server_streaming) == (spec.client_streaming, spec.server_streaming)
    names = {m.name for m in ours.methods}
    assert {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelConfig",
        "ModelStatistics",
    } <= names
