"""Assemble the server: repository, servicers, health, reflection and metrics on one gRPC port.

``create_server(settings, registry)`` builds everything without starting it (tests bind port 0
and read the bound ports from the handle); ``serve(settings)`` runs it until SIGTERM/SIGINT,
rescans the repository on SIGHUP, and shuts down gracefully.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from PIL import Image, PngImagePlugin
from prometheus_client import CollectorRegistry, start_http_server

from tlserve.server.admission import Budget
from tlserve.server.allocator import keep_large_blocks_returnable
from tlserve.server.cpus import available_cpus, lower_priority
from tlserve.server.dataplane import DataPlane
from tlserve.server.gpu import register_gpu_metrics
from tlserve.server.grpc_options import grpc_options
from tlserve.server.health import HealthReporter
from tlserve.server.images import ImageDecoder
from tlserve.server.metrics import Metrics
from tlserve.server.oip.reflection import reflection_pool
from tlserve.server.oip.servicer import add_oip_service
from tlserve.server.pb.tlserve.v1 import tlserve_pb2, tlserve_pb2_grpc
from tlserve.server.preprocess import PNG_TEXT_BYTES, ImageLimits
from tlserve.server.repository import ModelRepository, ReloadReport, RepositoryOptions
from tlserve.server.runtime import GPUUnavailable
from tlserve.server.servicer import InferenceServicer
from tlserve.server.settings import Settings

log = logging.getLogger(__name__)


class ServerHandle:
    """A built server: ``await start()``, then ``port`` / ``metrics_port``; ``await stop()``."""

    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = Metrics(registry)
        self.health = HealthReporter()
        threads = settings.decode_threads or available_cpus()  # the cgroup quota, not the node's cores
        self._decode_pool = ThreadPoolExecutor(threads, thread_name_prefix="decode", initializer=lower_priority)
        self._header_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="headers")
        self._infer_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="infer")
        self.repository = ModelRepository(
            RepositoryOptions.from_settings(settings),
            executor=self._infer_pool,
            metrics=self.metrics,
            on_change=self.health.update,
        )
        self.decoder = ImageDecoder(
            limits=ImageLimits.from_settings(settings),
            max_images=settings.max_images,
            executor=self._decode_pool,
            threads=threads,
            budget=Budget(
                "decoding", settings.max_decode_bytes, self.metrics.decode_bytes, self.metrics.decode_rejections
            ),
            headers=self._header_pool,
        )
        self.server = grpc.aio.server(
            options=grpc_options(settings), maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None
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
        reflection.enable_server_reflection([*self.service_names, reflection.SERVICE_NAME], self.server, pool=pool)
        self.port = self.server.add_insecure_port(f"{settings.host}:{settings.port}")
        self.metrics_port = 0
        self._metrics_http: WSGIServer | None = None
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
            httpd, _ = start_http_server(self.settings.metrics_port, addr=self.settings.host, registry=self.registry)
            self._metrics_http = httpd
            self.metrics_port = httpd.server_port
            await self.server.start()
        except BaseException:  # a refused GPU, a metrics port in use...: release what is loaded
            await self.repository.close()
            raise
        if self.settings.poll_interval > 0:
            self._poller = asyncio.get_running_loop().create_task(self.repository.poll(self.settings.poll_interval))
        log.info(
            "serving gRPC on %s:%d, metrics on :%d, models %s",
            self.settings.host,
            self.port,
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
        if self._poller is not None:
            self._poller.cancel()
        await self.server.stop(grace)
        await self.repository.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self._decode_pool.shutdown(wait=False)
        self._header_pool.shutdown(wait=False)
        self._infer_pool.shutdown(wait=False)


def create_server(settings: Settings, registry: CollectorRegistry) -> ServerHandle:
    """Build (not start) the server; call inside a running event loop."""
    Image.MAX_IMAGE_PIXELS = settings.max_pixels  # Pillow's own bomb guard, behind our header check
    PngImagePlugin.MAX_TEXT_MEMORY = PNG_TEXT_BYTES  # text chunks are parsed with the header: 64 MB by default
    keep_large_blocks_returnable()  # a decoded image's memory goes back to the OS after its request
    return ServerHandle(settings, registry)


async def run(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP rescans the repository."""
    handle = create_server(settings, CollectorRegistry())
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
