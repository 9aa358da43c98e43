"""Assemble the server: repository, servicers, health, reflection and metrics on one gRPC port,
behind the transport and call security of :mod:`tlserve.server.security`.

``create_server(settings, registry)`` builds everything without starting it (tests bind port 0
and read the bound ports from the handle); ``serve(settings)`` runs it until SIGTERM/SIGINT,
rescans the repository on SIGHUP, and shuts down gracefully.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from PIL import Image
from prometheus_client import CollectorRegistry

from tlserve.server.dataplane import DataPlane
from tlserve.server.gpu import register_gpu_metrics
from tlserve.server.health import HealthReporter
from tlserve.server.images import ImageDecoder
from tlserve.server.metrics import Metrics
from tlserve.server.metrics_http import MetricsServer
from tlserve.server.oip.reflection import reflection_pool
from tlserve.server.oip.servicer import add_oip_service
from tlserve.server.pb.tlserve.v1 import tlserve_pb2, tlserve_pb2_grpc
from tlserve.server.preprocess import ImageLimits
from tlserve.server.repository import ModelRepository, ReloadReport, RepositoryOptions
from tlserve.server.runtime import GPUUnavailable
from tlserve.server.security import CONFIG_ERRORS, Security
from tlserve.server.servicer import InferenceServicer
from tlserve.server.settings import Settings

log = logging.getLogger(__name__)


class ServerHandle:
    """A built server: ``await start()``, then ``port`` / ``metrics_port``; ``await stop()``."""

    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = Metrics(registry)
        self.security = Security(settings)  # raises one of CONFIG_ERRORS on unusable TLS or token files
        self.health = HealthReporter()
        threads = settings.decode_threads or (os.cpu_count() or 1)
        self._decode_pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")
        self._infer_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="infer")
        self.repository = ModelRepository(
            RepositoryOptions.from_settings(settings),
            executor=self._infer_pool,
            metrics=self.metrics,
            on_change=self.health.update,
        )
        self.decoder = ImageDecoder(
            limits=ImageLimits.from_settings(settings), max_images=settings.max_images, executor=self._decode_pool
        )
        limit = settings.max_message_bytes
        self.server = grpc.aio.server(
            interceptors=self.security.interceptors(self.metrics),
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
        )
        self.dataplane = DataPlane(self.repository, self.decoder)
        tlserve_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(self.dataplane, self.metrics), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self.server)
        self.service_names = [
            tlserve_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        ]
        # further APIs register here (one import + one call each)
        self.service_names.append(add_oip_service(self.server, self.dataplane, self.metrics, self.health))
        # a private pool, so reflection describes the OIP service too (see tlserve.server.oip.reflection)
        pool = reflection_pool(tlserve_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR)
        if settings.reflection:
            reflection.enable_server_reflection([*self.service_names, reflection.SERVICE_NAME], self.server, pool=pool)
        self.port = self.security.add_port(self.server, f"{settings.host}:{settings.port}")
        self._health_server: grpc.aio.Server | None = None
        self.health_port = -1
        if settings.health_port >= 0:  # plaintext, health only: kubelet gRPC probes speak no TLS
            self._health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self._health_server)
            self.health_port = self._health_server.add_insecure_port(f"{settings.host}:{settings.health_port}")
        self._metrics_http = MetricsServer(
            registry, settings.host, settings.metrics_port, ssl_context=self.security.metrics_ssl()
        )
        self.metrics_port = 0
        self._token_watch: asyncio.Task | None = None
        self._poller: asyncio.Task | None = None
        self._stopped = False

    async def start(self) -> ReloadReport:
        """Load the repository, then open the gRPC and metrics ports; returns the first load's report.

        Raises :class:`GPUUnavailable` when ``require_gpu`` is set and a model fell back to the CPU.
        """
        report = await self.repository.reload()
        try:
            refused = [str(e) for e in report.failed.values() if isinstance(e, GPUUnavailable)]
            if refused:
                raise GPUUnavailable(refused[0])
            if self.settings.device != "cpu":
                register_gpu_metrics(self.registry)
            await self._metrics_http.start()
            self.metrics_port = self._metrics_http.port
            await self.server.start()
            if self._health_server is not None:
                await self._health_server.start()
        except BaseException:  # a refused GPU, a metrics port in use...: release what is loaded
            await self._metrics_http.stop()
            await self.repository.close()
            raise
        if self.settings.poll_interval > 0:
            self._poller = asyncio.get_running_loop().create_task(self.repository.poll(self.settings.poll_interval))
        if self.security.tokens is not None:
            self._token_watch = asyncio.get_running_loop().create_task(self.security.tokens.watch())
        log.info(
            "serving gRPC on %s:%d (%s), metrics on %s :%d, models %s",
            self.settings.host,
            self.port,
            self.security.summary,
            self._metrics_http.scheme,
            self.metrics_port,
            [f"{m.name}/{m.version}" for m in self.repository.list()] or "none",
        )
        return report

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, stop taking calls and finish in-flight ones, drain models, close."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.settings.drain_seconds if grace is None else grace
        await self.health.shutdown()
        for task in (self._poller, self._token_watch):
            if task is not None:
                task.cancel()
        await self.server.stop(grace)
        if self._health_server is not None:
            await self._health_server.stop(0)
        await self.repository.close()
        await self._metrics_http.stop()
        self._decode_pool.shutdown(wait=False)
        self._infer_pool.shutdown(wait=False)


def create_server(settings: Settings, registry: CollectorRegistry) -> ServerHandle:
    """Build (not start) the server; call inside a running event loop."""
    Image.MAX_IMAGE_PIXELS = settings.max_pixels  # Pillow's own bomb guard, behind our header check
    return ServerHandle(settings, registry)


async def run(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP rescans the repository."""
    try:
        handle = create_server(settings, CollectorRegistry())
    except CONFIG_ERRORS as exc:  # unusable TLS or token files; the message names the file, never a secret
        log.error("refusing to start: %s", exc)
        return 2
    try:
        await handle.start()
    except (GPUUnavailable, OSError) as exc:  # OSError: e.g. the metrics port is taken
        log.error("refusing to start: %s", exc)
        return 2
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(handle.repository.reload()))
    await stopping.wait()
    loop.remove_signal_handler(signal.SIGHUP)  # no rescans while draining
    log.info("shutting down: health NOT_SERVING, draining for up to %.1fs", settings.drain_seconds)
    await handle.stop()
    return 0


def serve(settings: Settings) -> int:
    return asyncio.run(run(settings))
