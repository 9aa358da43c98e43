"""The model repository: every ``ROOT/<name>/<version>/model.onnx``, loaded per the version policy.

``reload()`` rescans the folder: versions the policy wants are loaded, validated and warmed up
off the event loop before they take traffic; a version that fails is logged, counted, and
never displaces a working one (the policy is applied to the loadable versions only); versions
no longer wanted are unloaded after draining. A failed file is retried once it changes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

from tlserve.contract import FP16_FILE, MODEL_FILE
from tlserve.manifest import ManifestError
from tlserve.server.batcher import BatchingOptions
from tlserve.server.errors import InvalidArgument, NotFound, Unavailable, quote
from tlserve.server.loader import LoadOptions, load_version
from tlserve.server.metrics import Metrics
from tlserve.server.model import ServedModel
from tlserve.server.runtime import RuntimeOptions
from tlserve.server.settings import Settings, VersionPolicy, version_key

log = logging.getLogger(__name__)

Signature = tuple[int, int]


@dataclass(frozen=True, kw_only=True)
class RepositoryOptions:
    """Where the models are, how to load them, which versions to serve, how long to drain one."""

    root: Path
    load: LoadOptions
    policy: VersionPolicy
    drain_seconds: float

    @classmethod
    def from_settings(cls, settings: Settings) -> RepositoryOptions:
        return cls(
            root=Path(settings.repository),
            load=LoadOptions(
                runtime=RuntimeOptions.from_settings(settings), batching=BatchingOptions.from_settings(settings)
            ),
            policy=settings.version_policy,
            drain_seconds=settings.drain_seconds,
        )


@dataclass
class ReloadReport:
    loaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    failed: dict[str, Exception] = field(default_factory=dict)


def file_signature(version_dir: Path) -> Signature:
    stats = [(version_dir / f).stat() for f in (MODEL_FILE, FP16_FILE) if (version_dir / f).is_file()]
    return (max(s.st_mtime_ns for s in stats), sum(s.st_size for s in stats))


def scan(root: Path) -> dict[str, dict[str, Path]]:
    """{name: {version: version_dir}} for every version folder holding a model.onnx."""
    found: dict[str, dict[str, Path]] = {}
    if not root.is_dir():
        return found
    for model_file in root.glob(f"*/*/{MODEL_FILE}"):
        version_dir = model_file.parent
        if version_dir.name.startswith(".") or version_dir.parent.name.startswith("."):
            continue
        found.setdefault(version_dir.parent.name, {})[version_dir.name] = version_dir
    return found


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
        self._failed: dict[tuple[str, str], tuple[Signature, str]] = {}
        self._lock = asyncio.Lock()
        self._closed = False  # once closed, a late reload (SIGHUP, poll) loads nothing again

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
            if failures:
                raise Unavailable(f"model {quote(name)} is not loaded: {failures[0]}")
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
        """Rescan the folder and converge on what the version policy wants."""
        async with self._lock:
            report = ReloadReport()
            if self._closed:
                return report
            if not self.options.root.is_dir():
                log.warning("model repository %s does not exist (yet): serving nothing", self.options.root)
            found = scan(self.options.root)
            for name in sorted(set(found) | set(self._models) | {n for n, _ in self._failed}):
                await self._reconcile(name, found.get(name, {}), report)
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

    async def _reconcile(self, name: str, on_disk: dict[str, Path], report: ReloadReport) -> None:
        loaded = self._models.setdefault(name, {})
        for key in list(self._failed):
            if key[0] == name and key[1] not in on_disk:
                del self._failed[key]
        while True:
            candidates = [v for v, d in on_disk.items() if not self._known_bad(name, v, d)]
            wanted = self.options.policy.select(candidates)
            missing = [v for v in wanted if v not in loaded]
            if not missing:
                break
            await self._load(name, missing[0], on_disk[missing[0]], report)
        for version in [v for v in loaded if v not in wanted]:
            await self._unload(name, version)
            report.unloaded.append(f"{name}/{version}")
        if not loaded:
            del self._models[name]

    async def _notify(self) -> None:
        if self._on_change is not None:
            await self._on_change(self)

    def _known_bad(self, name: str, version: str, version_dir: Path) -> bool:
        failure = self._failed.get((name, version))
        try:
            return failure is not None and failure[0] == file_signature(version_dir)
        except OSError:
            return True

    async def _load(self, name: str, version: str, version_dir: Path, report: ReloadReport) -> None:
        loop = asyncio.get_running_loop()
        signature: Signature = (0, 0)
        try:
            signature = file_signature(version_dir)
            model = await loop.run_in_executor(
                None, load_version, name, version, version_dir, self.options.load, self._executor, self._metrics
            )
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            log.error("model %s/%s (%s) failed to load and will not serve: %s", name, version, version_dir, message)
            self._metrics.model_load_failures.labels(name).inc()
            self._metrics.model_ready.labels(name, version).set(0)
            # callers see our own manifest checks, never runtime internals such as file paths
            public = str(exc) if isinstance(exc, ManifestError) else f"{type(exc).__name__} (see the server log)"
            self._failed[(name, version)] = (signature, public)
            report.failed[f"{name}/{version}"] = exc
            return
        self._failed.pop((name, version), None)
        model.start()
        self._models.setdefault(name, {})[version] = model
        self._metrics.model_ready.labels(name, version).set(1)
        self._metrics.model_info.labels(name, version, model.provider, model.manifest.precision).set(1)
        self._metrics.cuda_fallback.labels(name).set(1 if model.runtime.fallback else 0)
        report.loaded.append(f"{name}/{version}")
        log.info("model %s/%s ready on %s (%s)", name, version, model.provider, model.path)

    async def _unload(self, name: str, version: str) -> None:
        model = self._models[name].pop(version)
        self._metrics.model_ready.labels(name, version).set(0)
        self._metrics.model_info.remove(name, version, model.provider, model.manifest.precision)
        await self._notify()
        await model.unload(self.options.drain_seconds)
        log.info("model %s/%s unloaded", name, version)

    async def poll(self, interval: float) -> None:
        """Rescan every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reload()
            except Exception:
                log.exception("repository scan failed")

    async def close(self) -> None:
        """Unload everything, draining in-flight requests."""
        async with self._lock:
            self._closed = True
            for model in self.list():
                model.ready = False
            for model in self.list():
                await self._unload(model.name, model.version)
            self._models.clear()
