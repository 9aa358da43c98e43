"""Whether a loaded model version is healthy, judged from its batches: N consecutive failed batches,
or one ``session.run`` stuck past the inference timeout, make it unhealthy (NOT_SERVING); while it
is unhealthy a probe runs the warm-up input every ``probe_interval`` seconds, and the first batch
that succeeds makes it healthy again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tlserve.server.metrics import Metrics

if TYPE_CHECKING:
    from tlserve.server.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class HealthOptions:
    """When a model turns unhealthy and how it is probed; the defaults are Settings' (``from_settings``)."""

    unhealthy_after_failures: int = 5  # consecutive failed batches; 0 = never
    inference_timeout: float = 30.0  # seconds one session.run may take; 0 = no watchdog
    probe_interval: float = 5.0  # seconds between probes while unhealthy

    @classmethod
    def from_settings(cls, settings: Settings) -> HealthOptions:
        return cls(
            unhealthy_after_failures=settings.unhealthy_after_failures,
            inference_timeout=settings.inference_timeout_seconds,
            probe_interval=settings.health_probe_seconds,
        )


class ModelHealth:
    """The batcher reports each batch here (``succeeded``, ``failed``, ``stuck``); ``on_change`` hears
    every change of ``healthy``. ``probe`` runs the warm-up input through the batcher."""

    def __init__(
        self,
        name: str,
        version: str,
        options: HealthOptions,
        probe: Callable[[], Awaitable[object]],
        metrics: Metrics,
    ) -> None:
        self.name = name
        self.version = version
        self.options = options
        self.healthy = True
        self.on_change: Callable[[], None] | None = None
        self._probe = probe
        self._metrics = metrics
        self._failures = 0
        self._prober: asyncio.Task | None = None
        self._closed = False

    @property
    def inference_timeout(self) -> float:
        return self.options.inference_timeout

    def succeeded(self) -> None:
        self._failures = 0
        if not self.healthy:
            log.warning("model %s/%s: a batch succeeded again; the model is SERVING again", self.name, self.version)
            self._set(True)

    def failed(self) -> None:
        self._failures += 1
        limit = self.options.unhealthy_after_failures
        if self.healthy and limit > 0 and self._failures >= limit:
            self._turn_unhealthy(f"{self._failures} batches in a row failed")

    def stuck(self, seconds: float) -> None:
        """A session.run has been running for ``seconds`` (past the timeout) and has not returned."""
        self._metrics.inference_stuck.labels(self.name).inc()
        log.error(
            "!!! model %s/%s: session.run stuck for more than %.1fs (inference timeout); its requests are "
            "answered UNAVAILABLE and the model is NOT_SERVING until a probe succeeds !!!",
            self.name,
            self.version,
            seconds,
        )
        if self.healthy:
            self._turn_unhealthy("an inference run is stuck")

    def close(self) -> None:
        self._closed = True
        if self._prober is not None:
            self._prober.cancel()

    # --- internals -------------------------------------------------------------------------
    def _turn_unhealthy(self, why: str) -> None:
        log.error(
            "model %s/%s is NOT_SERVING: %s; probing it every %gs",
            self.name,
            self.version,
            why,
            self.options.probe_interval,
        )
        self._set(False)
        if self._prober is None or self._prober.done():
            self._prober = asyncio.get_running_loop().create_task(
                self._probe_until_healthy(), name=f"probe-{self.name}-{self.version}"
            )

    def _set(self, healthy: bool) -> None:
        self.healthy = healthy
        if self.on_change is not None:
            self.on_change()

    async def _probe_until_healthy(self) -> None:
        while not self.healthy and not self._closed:
            await asyncio.sleep(self.options.probe_interval)
            with contextlib.suppress(Exception):  # the batcher counts and logs the outcome
                await self._probe()
