"""`tlserve.v1.Inference`: protobuf in, the data plane, protobuf out (nothing else here)."""

from __future__ import annotations

import grpc

from tlserve.server.convert import (
    classifications,
    embeddings,
    model_info,
    reload_response,
    request_images,
    stream_error,
)
from tlserve.server.dataplane import DataPlane
from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as pb
from tlserve.server.pb.tlserve.v1 import tlserve_pb2_grpc
from tlserve.server.rpc import RpcCall, RpcObserver, deadline_of


class InferenceServicer(tlserve_pb2_grpc.InferenceServicer):
    def __init__(self, plane: DataPlane, observer: RpcObserver) -> None:
        self._plane = plane
        self._rpc = observer
        self._spans = observer.spans

    async def _classify(self, request: pb.ClassifyRequest, context, call: RpcCall) -> pb.ClassifyResponse:
        model = call.serves(self._plane.model(request.model.name, request.model.version))
        self._plane.check_image_count(len(request.images))
        top = await self._plane.classify(model, request_images(request.images), request.top_k, deadline_of(context))
        with self._spans.span("encode"):
            return pb.ClassifyResponse(model=model.name, version=model.version, results=classifications(top))

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        async with self._rpc.observe(context, "Classify") as call:
            return await self._classify(request, context, call)

    async def ClassifyStream(self, request_iterator, context: grpc.aio.ServicerContext):
        async for request in request_iterator:
            async with self._rpc.message(context, "ClassifyStream") as call:
                response = await self._classify(request, context, call)
            yield response if call.error is None else pb.ClassifyResponse(error=stream_error(call.code, call.error))

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        async with self._rpc.observe(context, "Embed") as call:
            model = call.serves(self._plane.model(request.model.name, request.model.version))
            self._plane.check_image_count(len(request.images))
            vectors = await self._plane.embed(model, request_images(request.images), deadline_of(context))
            with self._spans.span("encode"):
                return pb.EmbedResponse(model=model.name, version=model.version, embeddings=embeddings(vectors))

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        async with self._rpc.observe(context, "GetModelInfo") as call:
            return model_info(call.serves(self._plane.model(request.model.name, request.model.version)))

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        async with self._rpc.observe(context, "ListModels"):
            return pb.ListModelsResponse(models=[model_info(m) for m in self._plane.models()])

    async def ReloadRepository(
        self, request: pb.ReloadRepositoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReloadRepositoryResponse:
        async with self._rpc.observe(context, "ReloadRepository"):
            return reload_response(await self._plane.reload())
