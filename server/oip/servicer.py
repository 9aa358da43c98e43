"""`inference.GRPCInferenceService`: protobuf in, the data plane, protobuf out (nothing else here).

Errors propagate as :mod:`tlserve.server.errors` exceptions and leave through
:meth:`~tlserve.server.rpc.RpcObserver.observe`, which counts, times and maps them to a status; on the
stream they are answered in-band, as the protocol asks.
"""

from __future__ import annotations

import grpc

from tlserve import __version__
from tlserve.server.dataplane import DataPlane
from tlserve.server.errors import NotFound, Unavailable
from tlserve.server.health import HealthReporter
from tlserve.server.oip import codec
from tlserve.server.oip.describe import model_config, model_metadata
from tlserve.server.oip.statistics import InferenceStatistics
from tlserve.server.pb.inference import grpc_service_pb2_grpc
from tlserve.server.pb.inference import messages_pb2 as pb
from tlserve.server.rpc import RpcCall, RpcObserver, deadline_of

# The service's full name, for health and reflection lists. Its generated descriptor module is
# deliberately never imported: it would clash with tritonclient's in one process (see the proto).
SERVICE_NAME = "inference.GRPCInferenceService"
SERVER_NAME = "tlserve"
EXTENSIONS = (codec.CLASSIFICATION, "model_configuration", "statistics")


class OipServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane, observer: RpcObserver, statistics: InferenceStatistics) -> None:
        self._plane = plane
        self._rpc = observer
        self._statistics = statistics

    # --- health and metadata ---------------------------------------------------------------
    async def ServerLive(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._plane.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        async with self._rpc.observe(context, "ModelReady") as call:
            try:
                return pb.ModelReadyResponse(ready=call.serves(self._plane.model(request.name, request.version)).ready)
            except (NotFound, Unavailable):  # the protocol's answer to "no such ready model"
                return pb.ModelReadyResponse(ready=False)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        async with self._rpc.observe(context, "ModelMetadata") as call:
            model = call.serves(self._plane.model(request.name, request.version))
            return model_metadata(model, self._plane.ready_versions(model.name))

    async def ModelConfig(self, request: pb.ModelConfigRequest, context) -> pb.ModelConfigResponse:
        async with self._rpc.observe(context, "ModelConfig") as call:
            model = call.serves(self._plane.model(request.name, request.version))
            return pb.ModelConfigResponse(config=model_config(model, self._plane.max_images))

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context) -> pb.ModelStatisticsResponse:
        async with self._rpc.observe(context, "ModelStatistics") as call:
            if request.name:
                call.serves(self._plane.model(request.name, request.version))
            models = self._plane.models(request.name, request.version)
            return pb.ModelStatisticsResponse(model_stats=[self._statistics.message(m.name, m.version) for m in models])

    # --- inference ---------------------------------------------------------------------------
    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        async with self._rpc.observe(context, "ModelInfer") as call:
            return await self._infer(request, context, call)

    async def ModelStreamInfer(self, request_iterator, context):
        async for request in request_iterator:
            async with self._rpc.message(context, "ModelStreamInfer") as call:
                response = pb.ModelStreamInferResponse(infer_response=await self._infer(request, context, call))
            yield response if call.error is None else pb.ModelStreamInferResponse(error_message=call.error)

    async def _infer(self, request: pb.ModelInferRequest, context, call: RpcCall) -> pb.ModelInferResponse:
        model = call.serves(self._plane.model(request.model_name, request.model_version))
        with self._statistics.measure(model.name, model.version):
            headers = codec.input_headers(request)  # names, types, shapes checked before anything is converted
            self._plane.check_inputs(model, {h.name: (h.datatype, h.shape) for h in headers.values()})
            requested = codec.requested_outputs(request)
            inline = codec.converts_inline(request, headers)
            inputs = await self._plane.convert(codec.decode_inputs, request, headers, inline=inline)
            outputs = await self._plane.infer(model, inputs, requested, deadline_of(context))
            with self._rpc.spans.span("encode"):
                return codec.infer_response(model.name, model.version, request.id, outputs)


def add_oip_service(server: grpc.aio.Server, plane: DataPlane, observer: RpcObserver, health: HealthReporter) -> str:
    """Serve the protocol on ``server`` and report it in ``health``; returns the service name."""
    servicer = OipServicer(plane, observer, InferenceStatistics(observer.metrics.registry))
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    health.also_report(SERVICE_NAME)
    return SERVICE_NAME
