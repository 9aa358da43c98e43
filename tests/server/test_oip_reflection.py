"""Server reflection describes the Open Inference Protocol service from a private pool, while
tritonclient's stubs stay importable in the same process."""

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tlserve.server.oip.reflection import reflection_pool
from tlserve.server.oip.servicer import SERVICE_NAME
from tlserve.server.pb.tlserve.v1 import tlserve_pb2

NAMES = [SERVICE_NAME, "tlserve.v1.Inference", "grpc.health.v1.Health", reflection.SERVICE_NAME]


@pytest.fixture(scope="module")
def reflecting_server(live):
    """The real server (tests/server/conftest.py): reflection must describe every API it serves."""
    return f"127.0.0.1:{live.handle.port}"


def test_reflection_lists_and_describes_the_oip_service(reflecting_server):
    with grpc.insecure_channel(reflecting_server) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert sorted(database.get_services()) == sorted(NAMES), "reflection lists every service"
        client_pool = DescriptorPool(database)
        service = client_pool.FindServiceByName(SERVICE_NAME)
        infer = service.methods_by_name["ModelInfer"]
        assert infer.input_type.full_name == "inference.v2.ModelInferRequest"
        assert infer.input_type.fields_by_name["raw_input_contents"].number == 7
        assert client_pool.FindServiceByName("tlserve.v1.Inference").methods_by_name["Classify"]


def test_tritonclient_still_imports_beside_the_pool():
    pytest.importorskip("tritonclient.grpc")
    reflection_pool(tlserve_pb2.DESCRIPTOR)
    from tritonclient.grpc import service_pb2

    assert service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name == SERVICE_NAME
