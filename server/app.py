"""Assemble the server: repository, servicers, health, reflection and metrics on one gRPC port,
behind the transport and call security of :mod:`tlserve.server.security`.

``create_server(settings, registry)`` builds everything without starting it (tests bind port 0
and read the bound ports from the handle); ``serve(settings)`` runs it through the lifecycle of
server/lifecycle.py: SIGHUP rescans the repository while serving, SIGTERM/SIGINT drain (new calls
refused with UNAVAILABLE, in-flight ones finished, streams ended) and stop, a second one forces exit.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from PIL import Image, PngImagePlugin
from prometheus_client import CollectorRegistry

from tlserve.server.admission import Budget
from tlserve.server.allocator import keep_large_blocks_returnable
from tlserve.server.cpus import available_cpus, lower_priority
from tlserve.server.dataplane import DataPlane
from tlserve.server.drain import DrainGate
from tlserve.server.errors import ServingError
from tlserve.server.gpu import register_gpu_metrics
from tlserve.server.grpc_options import grpc_options
from tlserve.server.health import HealthReporter
from tlserve.server.images import ImageDecoder
from tlserve.server.lifecycle import Action, Lifecycle, State, force_exit, install_signal_handlers
from tlserve.server.message_memory import MessageMemory
from tlserve.server.metrics import Metrics
from tlserve.server.metrics_http import MetricsServer
from tlserve.server.model_dir import ModelDirError
from tlserve.server.oip.reflection import reflection_pool
from tlserve.server.oip.servicer import add_oip_service
from tlserve.server.pb.tlserve.v1 import tlserve_pb2, tlserve_pb2_grpc
from tlserve.server.ports import GRPC_OPTIONS, bind_port
from tlserve.server.preprocess import PNG_TEXT_BYTES, ImageLimits
from tlserve.server.repository import ModelRepository, ReloadReport, RepositoryOptions
from tlserve.server.request_log import RequestLog
from tlserve.server.rpc import RpcObserver
from tlserve.server.runtime import GPUUnavailable
from tlserve.server.security import CONFIG_ERRORS, Security
from tlserve.server.servicer import InferenceServicer
from tlserve.server.settings import Settings
from tlserve.server.tracing import TracingUnavailable, start_tracing
from tlserve.server.wire import WireGuard

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)
# the drain's last step (server/drain.py): hold new calls until none came for QUIET_SECONDS (at most
# HOLD_LIMIT_SECONDS), begin stop(), refuse the held calls RELEASE_DELAY_SECONDS later; stop() gives
# them at least REFUSAL_GRACE seconds to go out
QUIET_SECONDS, HOLD_LIMIT_SECONDS, RELEASE_DELAY_SECONDS, REFUSAL_GRACE = 0.05, 1.0, 0.2, 1.0
# the infer pool runs every model's batches: --model-instances threads for each of this many versions
# computing at once (more versions than that share the threads, their batches waiting their turn)
INFER_POOL_VERSIONS = 4


def infer_threads(settings: Settings) -> int:
    """Threads of the pool that runs session.run: ``--model-instances`` per version, for INFER_POOL_VERSIONS."""
    return INFER_POOL_VERSIONS * settings.model_instances


class ServerHandle:
    """A built server: ``await start()``, then ``port`` / ``metrics_port``; ``await stop()``.
    With ``--tracing``, spans go to ``tracer_provider`` when given, else to one built from ``OTEL_*``."""

    def __init__(
        self, settings: Settings, registry: CollectorRegistry, tracer_provider: TracerProvider | None = None
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = Metrics(registry)
        self.security = Security(settings)  # raises one of CONFIG_ERRORS on unusable TLS or token files
        self.tracing = start_tracing(settings.tracing, tracer_provider)  # TracingUnavailable without the packages
        spans = self.tracing.spans if self.tracing is not None else None
        traced = [self.tracing.interceptor] if self.tracing is not None else []  # outermost: refusals get spans too
        observer = RpcObserver(self.metrics, spans, RequestLog(settings.log_requests))
        self.health = HealthReporter()
        self.lifecycle = Lifecycle()
        self.gate = DrainGate(self.lifecycle, observer)
        threads = settings.decode_threads or available_cpus()  # the cgroup quota, not the node's cores
        self._decode_pool = ThreadPoolExecutor(threads, thread_name_prefix="decode", initializer=lower_priority)
        self._header_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="headers")
        self._infer_pool = ThreadPoolExecutor(max_workers=infer_threads(settings), thread_name_prefix="infer")
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
            draft=settings.fast_decode,
        )
        self.message_memory = MessageMemory(
            Budget(
                "message memory",
                settings.max_message_memory,
                self.metrics.message_bytes,
                self.metrics.message_rejections,
            )
        )
        self.server = grpc.aio.server(
            interceptors=[
                *traced,
                *self.security.interceptors(self.metrics),
                self.gate,
                WireGuard(settings.max_request_fields, observer, self.message_memory),
            ],
            options=grpc_options(settings) + GRPC_OPTIONS,
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None,
        )
        self.dataplane = DataPlane(self.repository, self.decoder, spans)
        tlserve_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(self.dataplane, observer), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self.server)
        self.service_names = [
            tlserve_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        ]
        # further APIs register here (one import + one call each)
        self.service_names.append(add_oip_service(self.server, self.dataplane, observer, self.health))
        # a private pool, so reflection describes the OIP service too (see tlserve.server.oip.reflection)
        pool = reflection_pool(tlserve_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR)
        if settings.reflection:
            reflection.enable_server_reflection([*self.service_names, reflection.SERVICE_NAME], self.server, pool=pool)
        self.port = bind_port(functools.partial(self.security.add_port, self.server), settings.host, settings.port)
        self._health_server: grpc.aio.Server | None = None
        self.health_port = -1
        if settings.health_port >= 0:  # plaintext, health only: kubelet gRPC probes speak no TLS
            self._health_server = grpc.aio.server(options=GRPC_OPTIONS)
            health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self._health_server)
            self.health_port = bind_port(self._health_server.add_insecure_port, settings.host, settings.health_port)
        self._metrics_http = MetricsServer(
            registry, settings.host, settings.metrics_port, ssl_context=self.security.metrics_ssl()
        )
        self.metrics_port = 0
        self._token_watch: asyncio.Task | None = None
        self._poller: asyncio.Task | None = None
        self._starting = asyncio.Lock()
        self._stopping: asyncio.Task | None = None

    async def start(self) -> ReloadReport:
        """Load the repository, then open the gRPC and metrics ports; returns the first load's report.
        When the drain begins during the first load, the ports are never opened.

        Raises :class:`GPUUnavailable` when ``require_gpu`` is set and a model fell back to the CPU.
        """
        async with self._starting:
            report = await self.repository.reload()
            if self.lifecycle.accepting:
                await self._open(report)
            return report

    async def _open(self, report: ReloadReport) -> None:
        try:
            refused = [str(e) for e in report.failed.values() if isinstance(e, GPUUnavailable)]
            if refused:
                raise GPUUnavailable(refused[0])
            if self.settings.model_dir and not self.repository.list():  # single-model mode: nothing else to serve
                raise ModelDirError(nothing_loaded(self.settings.model_dir, report))
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
        self.lifecycle.to(State.SERVING)
        if self.settings.poll_interval > 0:
            self._poller = asyncio.get_running_loop().create_task(self.repository.poll(self.settings.poll_interval))
        if self.security.tokens is not None:
            self._token_watch = asyncio.get_running_loop().create_task(self.security.tokens.watch())
        log.info(
            "serving gRPC on %s:%d (%s, tracing %s), metrics on %s :%d, models %s",
            self.settings.host,
            self.port,
            self.security.summary,
            "on" if self.tracing is not None else "off",
            self._metrics_http.scheme,
            self.metrics_port,
            [f"{m.name}/{m.version}" for m in self.repository.list()] or "none",
        )

    async def stop(self, grace: float | None = None) -> None:
        """Drain, then close: health NOT_SERVING, new calls refused (UNAVAILABLE), open streams ended,
        in-flight calls finished (up to ``grace`` s); only then the gRPC server stops (it has nothing
        received-but-unhandled left to cancel, grpc/grpc#41785); models drain; ports close.
        A second call waits for the first one's end."""
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._stop(grace))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace: float | None) -> None:
        grace = self.settings.drain_seconds if grace is None else grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        await self.health.shutdown()
        self.lifecycle.begin_drain()
        self.repository.stop_loading()
        for task in (self._poller, self._token_watch):
            if task is not None:
                task.cancel()
        async with self._starting:  # a first load in progress stops after its current version
            pass
        if not await self.gate.wait_idle(deadline - loop.time()):
            log.warning("drain: %d calls still running after %.1fs; they are cancelled", self.gate.active, grace)
        held = await self.gate.hold_new_calls(QUIET_SECONDS, HOLD_LIMIT_SECONDS)
        stopping = loop.create_task(self.server.stop(max(deadline - loop.time(), REFUSAL_GRACE)))
        await asyncio.sleep(RELEASE_DELAY_SECONDS)  # stop() has begun and told the callers (GOAWAY)
        self.gate.release()
        log.info("drain: in-flight calls done; %d calls held until stop() began, now refused", held)
        await stopping
        if self._health_server is not None:
            await self._health_server.stop(0)
        await self.repository.close()
        await self._metrics_http.stop()
        self._decode_pool.shutdown(wait=False)
        self._header_pool.shutdown(wait=False)
        self._infer_pool.shutdown(wait=False)
        if self.tracing is not None:  # the last spans out to the collector
            await asyncio.to_thread(self.tracing.shutdown)
        self.lifecycle.to(State.STOPPED)


def nothing_loaded(model_dir: str, report: ReloadReport) -> str:
    """Why single-model mode has nothing to serve after its first load, for the log (paths allowed)."""
    failures = "; ".join(f"{name}: {type(exc).__name__}: {exc}" for name, exc in report.failed.items())
    return f"--model-dir {model_dir}: the model did not load ({failures or 'the version policy selected nothing'})"


def create_server(
    settings: Settings, registry: CollectorRegistry, tracer_provider: TracerProvider | None = None
) -> ServerHandle:
    """Build (not start) the server; call inside a running event loop."""
    Image.MAX_IMAGE_PIXELS = settings.max_pixels  # Pillow's own bomb guard, behind our header check
    PngImagePlugin.MAX_TEXT_MEMORY = PNG_TEXT_BYTES  # text chunks are parsed with the header: 64 MB by default
    keep_large_blocks_returnable()  # a decoded image's memory goes back to the OS after its request
    return ServerHandle(settings, registry, tracer_provider)


async def run(settings: Settings) -> int:
    """Run through the lifecycle (server/lifecycle.py) until drained; the exit status (2: refused to start)."""
    try:
        handle = create_server(settings, CollectorRegistry())
    except (
        OSError,
        TracingUnavailable,
        *CONFIG_ERRORS,
    ) as exc:  # the gRPC port is taken; unusable TLS or token files (named, never a secret); no tracing packages
        log.error("refusing to start: %s", exc)
        return 2
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task] = set()

    def on_signal(signum: int) -> None:
        action = handle.lifecycle.on_signal(signum)
        if action is Action.RELOAD:
            task = loop.create_task(reload_logged(handle))
            reloads.add(task)
            task.add_done_callback(reloads.discard)
        elif action is Action.FORCE_EXIT:
            force_exit(signum)

    install_signal_handlers(loop, on_signal)  # before the first load: SIGHUP never kills
    log.info(
        "starting: loading the model %s",
        f"in {settings.model_dir}" if settings.model_dir else f"repository {settings.repository}",
    )
    starting = loop.create_task(handle.start())
    draining = loop.create_task(handle.lifecycle.draining.wait())
    try:
        await asyncio.wait({starting, draining}, return_when=asyncio.FIRST_COMPLETED)
        failure = starting.exception() if starting.done() else None
        if failure is not None:
            # OSError: e.g. the metrics port is taken; ModelDirError: --model-dir holds no model that loads
            if isinstance(failure, (GPUUnavailable, OSError, ModelDirError)):
                log.error("refusing to start: %s", failure)
                return 2
            raise failure
        await draining
        log.info("shutting down: health NOT_SERVING, new calls refused, draining up to %.1fs", settings.drain_seconds)
        await handle.stop()
        outcome: object = (await asyncio.gather(starting, return_exceptions=True))[0]
        if isinstance(outcome, BaseException):
            log.error("the first load failed during shutdown", exc_info=outcome)
    finally:
        draining.cancel()
    if handle.repository.abandoned_runs:
        log.error("%d stuck inference runs never returned; exiting without them", handle.repository.abandoned_runs)
        logging.shutdown()
        os._exit(0)
    log.info("stopped")
    return 0


async def reload_logged(handle: ServerHandle) -> None:
    try:
        await handle.repository.reload()
    except ServingError as exc:  # e.g. a --model-dir layout gone bad: the message says what; no traceback
        log.error("repository rescan failed: %s; what is loaded keeps serving", exc)
    except Exception:
        log.exception("repository rescan failed")


def serve(settings: Settings) -> int:
    return asyncio.run(run(settings))
