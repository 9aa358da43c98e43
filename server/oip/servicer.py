"""`inference.GRPCInferenceService`: thin handlers that convert protobuf and delegate to the data plane.

Errors propagate as :mod:`tlserve.server.errors` exceptions and leave through
:func:`~tlserve.server.rpc.observe_rpc`, which counts, times and maps them to a status; on the
stream they are answered in-band, as the protocol asks.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import grpc
import numpy as np

from tlserve import __version__
from tlserve.server.convert import top_k
from tlserve.server.errors import InvalidArgument, NotFound, Unavailable, to_status
from tlserve.server.metrics import Metrics
from tlserve.server.model import ServedModel
from tlserve.server.oip import codec
from tlserve.server.oip.describe import input_signature, model_config, model_metadata
from tlserve.server.oip.statistics import InferenceStatistics
from tlserve.server.pb.inference import grpc_service_pb2_grpc
from tlserve.server.pb.inference import messages_pb2 as pb
from tlserve.server.repository import ModelRepository
from tlserve.server.rpc import RpcCall, deadline_of, observe_rpc

if TYPE_CHECKING:
    from tlserve.server.app import ServerHandle

# The service's full name, for health and reflection lists. Its generated descriptor module is
# deliberately never imported: it would clash with tritonclient's in one process (see the proto).
SERVICE_NAME = "inference.GRPCInferenceService"
SERVER_NAME = "tlserve"
EXTENSIONS = ("classification", "model_configuration", "statistics")
CLASSIFICATION = "classification"


class OipServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: ModelRepository, metrics: Metrics, max_images: int) -> None:
        self._repository = repository
        self._metrics = metrics
        self._max_images = max_images
        self._statistics = InferenceStatistics(metrics.registry)

    # --- health and metadata ---------------------------------------------------------------
    async def ServerLive(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=any(m.ready for m in self._repository.list()))

    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        async with observe_rpc(self._metrics, context, "ModelReady") as call:
            try:
                return pb.ModelReadyResponse(ready=self._resolve(request.name, request.version, call).ready)
            except (NotFound, Unavailable):
                return pb.ModelReadyResponse(ready=False)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        async with observe_rpc(self._metrics, context, "ModelMetadata") as call:
            model = self._resolve(request.name, request.version, call)
            versions = [m.version for m in self._repository.list() if m.name == model.name and m.ready]
            return model_metadata(model, versions)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context) -> pb.ModelConfigResponse:
        async with observe_rpc(self._metrics, context, "ModelConfig") as call:
            model = self._resolve(request.name, request.version, call)
            return pb.ModelConfigResponse(config=model_config(model, self._max_images))

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context) -> pb.ModelStatisticsResponse:
        async with observe_rpc(self._metrics, context, "ModelStatistics") as call:
            if request.name:
                self._resolve(request.name, request.version, call)
            models = [
                m
                for m in self._repository.list()
                if request.name in ("", m.name) and request.version in ("", m.version)
            ]
            return pb.ModelStatisticsResponse(model_stats=[self._statistics.message(m.name, m.version) for m in models])

    # --- inference ---------------------------------------------------------------------------
    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        async with observe_rpc(self._metrics, context, "ModelInfer") as call:
            return await self._infer(request, deadline_of(context), call)

    async def ModelStreamInfer(self, request_iterator, context):
        async for request in request_iterator:
            call, started = RpcCall(), time.monotonic()
            try:
                response = pb.ModelStreamInferResponse(
                    infer_response=await self._infer(request, deadline_of(context), call)
                )
                code = grpc.StatusCode.OK
            except Exception as exc:  # answered in-band; unknown errors are logged by to_status
                code, message = to_status(exc)
                response = pb.ModelStreamInferResponse(error_message=message)
            self._metrics.requests.labels("ModelStreamInfer", call.model, code.name).inc()
            self._metrics.request_duration.labels("ModelStreamInfer", call.model).observe(time.monotonic() - started)
            yield response

    async def _infer(
        self, request: pb.ModelInferRequest, deadline: float | None, call: RpcCall
    ) -> pb.ModelInferResponse:
        model = self._resolve(request.model_name, request.model_version, call)
        started, ok = time.perf_counter_ns(), False
        try:
            batch = self._batch(model, codec.decode_inputs(request))
            wanted = self._requested_outputs(model, request)
            outputs = await model.infer(batch, deadline)
            response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
            codec.encode_outputs(response, {name: outputs[name] for name, k in wanted if not k})
            for name, k in wanted:
                if k:
                    codec.encode_bytes(response, name, classification(model, outputs[name], k))
            ok = True
            return response
        finally:
            self._statistics.record(model.name, model.version, time.perf_counter_ns() - started, ok)

    # --- conversions -------------------------------------------------------------------------
    def _resolve(self, name: str, version: str, call: RpcCall) -> ServedModel:
        model = self._repository.get(name or None, version or None)
        call.model = model.name
        return model

    def _batch(self, model: ServedModel, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """The model's one input, checked against its datatype, shape and the per-request limit."""
        name, datatype, shape = input_signature(model)
        if list(arrays) != [name]:
            raise InvalidArgument(f"model {model.name!r} takes one input {name!r}, got {sorted(arrays)}")
        batch = arrays[name]
        got = codec.datatype_of(batch.dtype)
        if got != datatype:
            raise InvalidArgument(f"input {name!r} of model {model.name!r} must be {datatype}, got {got}")
        if batch.ndim != len(shape) or list(batch.shape[1:]) != shape[1:] or batch.shape[0] < 1:
            raise InvalidArgument(
                f"input {name!r} of model {model.name!r} must have shape "
                f"[N, {', '.join(map(str, shape[1:]))}], got {list(batch.shape)}"
            )
        if batch.shape[0] > self._max_images:
            raise InvalidArgument(f"{batch.shape[0]} images in one request exceeds the limit of {self._max_images}")
        return batch

    def _requested_outputs(self, model: ServedModel, request: pb.ModelInferRequest) -> list[tuple[str, int]]:
        """(output name, top-k or 0) for each requested output; all outputs when none is named."""
        if not request.outputs:
            return [(name, 0) for name in model.output_names]
        wanted = []
        for output in request.outputs:
            if output.name not in model.output_names:
                raise InvalidArgument(
                    f"model {model.name!r} has no output {output.name!r} (outputs: {', '.join(model.output_names)})"
                )
            k = output.parameters[CLASSIFICATION].int64_param if CLASSIFICATION in output.parameters else 0
            if k < 0:
                raise InvalidArgument(f"output {output.name!r}: classification count must be positive, got {k}")
            wanted.append((output.name, k))
        return wanted


def classification(model: ServedModel, scores: np.ndarray, k: int) -> np.ndarray:
    """Triton's classification extension: [N, k] strings "score:index:label", best first."""
    if scores.ndim != 2 or scores.shape[1] != model.manifest.num_classes:
        raise InvalidArgument("classification is only available on an output with one score per label")
    indices, values = top_k(scores, k)
    labels = model.manifest.labels
    return np.array(
        [
            [f"{s:f}:{i}:{labels[i]}".encode() for i, s in zip(row_i, row_s)]
            for row_i, row_s in zip(indices.tolist(), values.tolist())
        ],
        dtype=object,
    )


def add_oip_service(handle: ServerHandle) -> str:
    """Serve the protocol on the handle's gRPC server, report it in health; returns the service name."""
    servicer = OipServicer(handle.repository, handle.metrics, handle.settings.max_images)
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, handle.server)
    handle.health.also_report(SERVICE_NAME)
    return SERVICE_NAME
