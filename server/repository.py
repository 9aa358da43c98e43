"""The model repository: every ``ROOT/<name>/<version>/model.onnx``, loaded per the version policy.

``reload()`` rescans the folder (off the event loop): versions the policy wants are loaded,
validated and warmed up off the event loop before they take traffic; a version that fails is
logged, counted, and never displaces a working one (the policy is applied to the loadable versions
only); versions no longer wanted are unloaded after draining. A failed file is retried once it
changes; a loaded version whose file changes is reloaded aside and swapped in, or, if the new file
fails, refused loudly while the old copy serves on. Version folders are plain integers ("0", "12";
not "01", "1a" or "²"). A rescan runs as the repository's own task, so a cancelled caller never
leaves a version half unloaded. In single-model mode (``--model-dir``) the scan is
:func:`tlserve.server.model_dir.scan_model_dir`: one model, whatever layout the storage left.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tlserve.server.batcher import BatchingOptions
from tlserve.server.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable, quote
from tlserve.server.loader import LoadOptions, load_version, public_reason
from tlserve.server.metrics import Metrics
from tlserve.server.model import ServedModel
from tlserve.server.model_dir import SingleModel, scan_model_dir
from tlserve.server.model_health import HealthOptions
from tlserve.server.runtime import RuntimeOptions
from tlserve.server.scan import Scan, Signature, VersionDir, scan
from tlserve.server.settings import Settings, VersionPolicy, version_key

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class RepositoryOptions:
    """Where the models are, how to load them, which versions to serve, how long to drain one."""

    root: Path
    load: LoadOptions
    policy: VersionPolicy
    drain_seconds: float
    single: SingleModel | None = None  # single-model mode (--model-dir): root is that folder

    @classmethod
    def from_settings(cls, settings: Settings) -> RepositoryOptions:
        single = SingleModel(Path(settings.model_dir), settings.model_name) if settings.model_dir else None
        return cls(
            root=single.root if single else Path(settings.repository),
            single=single,
            load=LoadOptions(
                runtime=RuntimeOptions.from_settings(settings),
                batching=BatchingOptions.from_settings(settings),
                health=HealthOptions.from_settings(settings),
                max_label_metrics=settings.max_label_metrics,
                separate_sessions=settings.instance_sessions == "separate",
            ),
            policy=settings.version_policy,
            drain_seconds=settings.drain_seconds,
        )

    def scan(self) -> Scan:
        """What is on disk now (blocking); in single-model mode raises ModelDirError on a layout it cannot serve."""
        return scan(self.root) if self.single is None else scan_model_dir(self.single)


@dataclass
class ReloadReport:
    loaded: list[str] = field(default_factory=list)  # "name/version", a changed file reloaded included
    unloaded: list[str] = field(default_factory=list)
    failed: dict[str, Exception] = field(default_factory=dict)


class ModelRepository:
    """Loaded model versions by name; the data plane's front door (no transport in here)."""

    def __init__(
        self,
        options: RepositoryOptions,
        *,
        executor: Executor,
        metrics: Metrics,
        on_change: Callable[[ModelRepository], Awaitable[None]] | None = None,
    ) -> None:
        self.options = options
        self._executor = executor
        self._metrics = metrics
        self._on_change = on_change
        self._models: dict[str, dict[str, ServedModel]] = {}
        self._signatures: dict[tuple[str, str], Signature] = {}  # of the files each loaded version came from
        self._failed: dict[tuple[str, str], tuple[Signature, str]] = {}  # never loaded: signature, public reason
        self._refused: dict[tuple[str, str], Signature] = {}  # changed files that failed; the old copy serves
        self._warned: set[Path] = set()  # skipped folders already warned about
        self._lock = asyncio.Lock()
        self._queued: asyncio.Task | None = None  # the rescan that waits for the lock (callers share it)
        self._background: set[asyncio.Task] = set()
        self._closed = False  # once closed, a late reload (SIGHUP, poll) loads nothing again
        self.abandoned_runs = 0  # stuck session.run calls left running by unloads

    # --- lookup ----------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(set(self._models) | {name for name, _ in self._failed})

    def list(self) -> list[ServedModel]:
        """Every loaded version, by name then newest first."""
        return [
            m
            for name in sorted(self._models)
            for _, m in sorted(self._models[name].items(), key=lambda kv: version_key(kv[0]), reverse=True)
        ]

    def get(self, name: str | None = None, version: str | None = None) -> ServedModel:
        """The version asked for, or the newest ready one; a single model needs no name."""
        name = name or self._default_name()
        versions = self._models.get(name)
        if not versions:
            failures = [msg for (n, _), (_, msg) in self._failed.items() if n == name]
            if failures:  # permanent until the files change: FAILED_PRECONDITION, not a retry invitation
                raise FailedPrecondition(f"model {quote(name)} is not loaded: {failures[0]}")
            raise NotFound(f"model {quote(name)} not found (serving: {', '.join(sorted(self._models)) or 'nothing'})")
        if version:
            model = versions.get(version)
            if model is None:
                raise NotFound(
                    f"model {quote(name)} has no version {quote(version)} loaded "
                    f"(loaded: {', '.join(sorted(versions, key=version_key))})"
                )
            if not model.ready:
                raise Unavailable(f"model {quote(name)} version {version} is not ready")
            return model
        for v in sorted(versions, key=version_key, reverse=True):
            if versions[v].ready:
                return versions[v]
        raise Unavailable(f"model {quote(name)} has no ready version")

    def _default_name(self) -> str:
        names = self.names()
        if len(names) == 1:
            return names[0]
        if not names:
            raise Unavailable("no model is loaded")
        raise InvalidArgument(f"several models are served ({', '.join(names)}): name one")

    def is_ready(self, name: str) -> bool:
        return any(m.ready for m in self._models.get(name, {}).values())

    # --- lifecycle -------------------------------------------------------------------------
    async def reload(self) -> ReloadReport:
        """Rescan the folder and converge on what the version policy wants.

        The rescan is a task the repository owns: a caller that goes away (a cancelled RPC) does not
        stop it halfway, so a version being unloaded is always unloaded to the end. Callers that ask
        while a rescan waits for its turn share that rescan (a SIGHUP storm costs one or two scans).
        """
        if self._queued is None:
            self._queued = self._spawn(self._reload_when_free())
        return await asyncio.shield(self._queued)

    def stop_loading(self) -> None:
        """Load nothing more from now on (shutdown: a rescan in progress stops after its current version)."""
        self._closed = True

    async def _reload_when_free(self) -> ReloadReport:
        async with self._lock:
            self._queued = None  # a request from now on needs a scan of its own
            return await self._reload()

    async def _reload(self) -> ReloadReport:
        report = ReloadReport()
        if self._closed:
            return report
        found = await asyncio.get_running_loop().run_in_executor(None, self.options.scan)
        if not found.exists:
            log.warning("model repository %s does not exist (yet): serving nothing", self.options.root)
        self._warn_skipped(found.skipped)
        for name in sorted(set(found.models) | set(self._models) | {n for n, _ in self._failed}):
            if self._closed:
                break
            await self._reconcile(name, found.models.get(name, {}), report)
        await self._notify()
        if report.loaded or report.unloaded or report.failed:
            log.info(
                "repository %s: loaded %s, unloaded %s, failed %s",
                self.options.root,
                report.loaded or "-",
                report.unloaded or "-",
                list(report.failed) or "-",
            )
        return report

    def _warn_skipped(self, skipped: Iterable[Path]) -> None:
        for folder in skipped:
            if folder not in self._warned:
                self._warned.add(folder)
                log.warning(
                    "skipping %s: a version folder must be named by a plain integer (0, 1, 2, ... no leading zeros)",
                    folder,
                )

    async def _reconcile(self, name: str, on_disk: dict[str, VersionDir], report: ReloadReport) -> None:
        loaded = self._models.setdefault(name, {})
        for known in (self._failed, self._refused):
            for key in [k for k in known if k[0] == name and k[1] not in on_disk]:
                del known[key]
        for version in list(loaded):
            if version in on_disk and self._changed(name, version, on_disk[version].signature):
                await self._replace(name, version, on_disk[version], report)
        wanted: list[str] = []
        while not self._closed:
            candidates = [v for v, d in on_disk.items() if not self._known_bad(name, v, d)]
            wanted = self.options.policy.select(candidates)
            missing = [v for v in wanted if v not in loaded]
            if not missing:
                break
            await self._load(name, missing[0], on_disk[missing[0]], report)
        if self._closed:
            return
        for version in [v for v in loaded if v not in wanted]:
            await self._unload(name, version)
            report.unloaded.append(f"{name}/{version}")
        if not loaded:
            del self._models[name]

    def _changed(self, name: str, version: str, signature: Signature) -> bool:
        """Whether a loaded version's files differ from those it was loaded from (and were not refused already)."""
        key = (name, version)
        if signature == self._signatures.get(key):
            self._refused.pop(key, None)  # back to the file that is serving
            return False
        return self._refused.get(key) != signature

    def _known_bad(self, name: str, version: str, version_dir: VersionDir) -> bool:
        failure = self._failed.get((name, version))
        return failure is not None and failure[0] == version_dir.signature

    async def _open(self, name: str, version: str, version_dir: VersionDir) -> ServedModel:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            None, load_version, name, version, version_dir.path, self.options.load, self._executor, self._metrics
        )

    async def _load(self, name: str, version: str, version_dir: VersionDir, report: ReloadReport) -> None:
        try:
            model = await self._open(name, version, version_dir)
        except Exception as exc:
            log.error(
                "model %s/%s (%s) failed to load and will not serve: %s: %s",
                name,
                version,
                version_dir.path,
                type(exc).__name__,
                exc,
            )
            self._metrics.model_load_failures.labels(name).inc()
            self._metrics.model_ready.labels(name, version).set(0)
            self._failed[(name, version)] = (version_dir.signature, public_reason(exc))
            report.failed[f"{name}/{version}"] = exc
            return
        self._failed.pop((name, version), None)
        self._serve(model, version_dir.signature)
        report.loaded.append(f"{name}/{version}")
        log.info("model %s/%s ready on %s (%s)", name, version, model.provider, model.path)

    async def _replace(self, name: str, version: str, version_dir: VersionDir, report: ReloadReport) -> None:
        """A loaded version's file changed on disk: load the new one aside, swap it in, drain the old one;
        if the new file does not load, keep serving the old copy and say so loudly."""
        try:
            model = await self._open(name, version, version_dir)
        except Exception as exc:
            log.error(
                "!!! model %s/%s: %s changed on disk and the new file failed to load (%s: %s); "
                "still serving the copy loaded before !!!",
                name,
                version,
                version_dir.path,
                type(exc).__name__,
                exc,
            )
            self._metrics.model_file_changed.labels(name, version, "refused").inc()
            self._refused[(name, version)] = version_dir.signature
            report.failed[f"{name}/{version}"] = exc
            return
        old = self._models[name][version]
        self._metrics.model_info.remove(name, version, old.provider, old.manifest.precision)
        old.predictions.detach()  # the new file's manifest may carry another baseline, other labels
        self._serve(model, version_dir.signature)
        self._refused.pop((name, version), None)
        self._metrics.model_file_changed.labels(name, version, "reloaded").inc()
        report.loaded.append(f"{name}/{version}")
        log.warning("model %s/%s: %s changed on disk; the new file is serving", name, version, version_dir.path)
        await self._drain(old)

    def _serve(self, model: ServedModel, signature: Signature) -> None:
        name, version = model.name, model.version
        model.start(self._health_changed)
        self._models.setdefault(name, {})[version] = model
        self._signatures[(name, version)] = signature
        self._metrics.model_ready.labels(name, version).set(1)
        self._metrics.model_info.labels(name, version, model.provider, model.manifest.precision).set(1)
        self._metrics.cuda_fallback.labels(name).set(1 if model.runtime.fallback else 0)
        model.predictions.attach()

    def _serving(self, model: ServedModel) -> bool:
        """Whether ``model`` is the copy of its version that takes requests (not an old one draining)."""
        return self._models.get(model.name, {}).get(model.version) is model

    def _health_changed(self, model: ServedModel) -> None:
        if not self._serving(model):
            return
        self._metrics.model_ready.labels(model.name, model.version).set(1 if model.ready else 0)
        self._spawn(self._notify())

    async def _unload(self, name: str, version: str) -> None:
        model = self._models[name].pop(version)
        self._signatures.pop((name, version), None)
        self._refused.pop((name, version), None)
        self._metrics.model_ready.labels(name, version).set(0)
        self._metrics.model_info.remove(name, version, model.provider, model.manifest.precision)
        model.predictions.detach()
        await self._notify()
        await self._drain(model)
        log.info("model %s/%s unloaded", name, version)

    async def _drain(self, model: ServedModel) -> None:
        await model.unload(self.options.drain_seconds)
        if model.abandoned_run:
            self.abandoned_runs += 1

    async def _notify(self) -> None:
        if self._on_change is not None:
            await self._on_change(self)

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        failure = None if task.cancelled() else task.exception()
        if failure is not None:
            log.error("repository task failed", exc_info=failure)

    async def poll(self, interval: float) -> None:
        """Rescan every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reload()
            except Exception:
                log.exception("repository scan failed")

    async def close(self) -> None:
        """Unload everything, draining in-flight requests (a rescan in progress finishes its version first)."""
        self._closed = True
        async with self._lock:
            for model in self.list():
                model.stop_accepting()
            for model in self.list():
                await self._unload(model.name, model.version)
            self._models.clear()
