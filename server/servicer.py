"""`tlserve.v1.Inference`: thin handlers that convert protobuf and delegate to the data plane."""

from __future__ import annotations

import grpc
import numpy as np

from tlserve.server.convert import classifications, model_info, request_images
from tlserve.server.errors import FailedPrecondition
from tlserve.server.images import ImageDecoder
from tlserve.server.metrics import Metrics
from tlserve.server.model import ServedModel
from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as pb
from tlserve.server.pb.tlserve.v1 import tlserve_pb2_grpc
from tlserve.server.preprocess import to_model_input
from tlserve.server.repository import ModelRepository
from tlserve.server.rpc import RpcCall, deadline_of, observe_rpc


class InferenceServicer(tlserve_pb2_grpc.InferenceServicer):
    def __init__(self, repository: ModelRepository, decoder: ImageDecoder, metrics: Metrics) -> None:
        self._repository = repository
        self._decoder = decoder
        self._metrics = metrics

    def _resolve(self, ref: pb.ModelRef, call: RpcCall) -> ServedModel:
        model = self._repository.get(ref.name or None, ref.version or None)
        call.model = model.name
        return model

    async def _outputs(self, model: ServedModel, images, context) -> dict[str, np.ndarray]:
        with model.lease():
            batch = await self._decoder.batch(request_images(images), model.manifest.preprocessing)
            return await model.infer(to_model_input(batch, model.manifest.preprocessing), deadline_of(context))

    async def _classify(self, request: pb.ClassifyRequest, context, call: RpcCall) -> pb.ClassifyResponse:
        model = self._resolve(request.model, call)
        outputs = await self._outputs(model, request.images, context)
        probabilities = outputs[model.manifest.outputs.probabilities]
        return pb.ClassifyResponse(
            model=model.name, version=model.version, results=classifications(model, probabilities, request.top_k)
        )

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        async with observe_rpc(self._metrics, context, "Classify") as call:
            return await self._classify(request, context, call)

    async def ClassifyStream(self, request_iterator, context: grpc.aio.ServicerContext):
        async for request in request_iterator:
            async with observe_rpc(self._metrics, context, "ClassifyStream") as call:
                response = await self._classify(request, context, call)
            yield response

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        async with observe_rpc(self._metrics, context, "Embed") as call:
            model = self._resolve(request.model, call)
            name = model.manifest.outputs.embedding
            if not name:
                raise FailedPrecondition(f"model {model.name!r} has no embedding output")
            outputs = await self._outputs(model, request.images, context)
            return pb.EmbedResponse(
                model=model.name,
                version=model.version,
                embeddings=[pb.Embedding(values=row.tolist()) for row in outputs[name]],
            )

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        async with observe_rpc(self._metrics, context, "GetModelInfo") as call:
            return model_info(self._resolve(request.model, call))

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        async with observe_rpc(self._metrics, context, "ListModels"):
            return pb.ListModelsResponse(models=[model_info(m) for m in self._repository.list()])

    async def ReloadRepository(
        self, request: pb.ReloadRepositoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReloadRepositoryResponse:
        async with observe_rpc(self._metrics, context, "ReloadRepository"):
            report = await self._repository.reload()
            return pb.ReloadRepositoryResponse(
                loaded=report.loaded,
                unloaded=report.unloaded,
                failed={key: f"{type(exc).__name__}: {exc}" for key, exc in report.failed.items()},
            )
