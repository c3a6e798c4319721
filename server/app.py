"""The FastAPI app: settings, one :class:`Metrics`, the routes (``routes.py``) and the runtime they use.

``create_app(settings, pool)`` wires; the pool (models + captioning policy) is built in ``pool.py``, the
request path lives in ``service.py``, and route handlers in ``routes.py`` only parse and format.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from .admin import ReloadBody, admin_router
from .docs import docs_router
from .feedback import FeedbackStore
from .gateway import PUBLIC_PATHS, ApiError, Gateway, install_error_handlers
from .generation import SharedGeneration
from .limits import BodyLimits
from .metrics import Metrics
from .openapi import install_openapi
from .pool import ModelPool, build_pool, engine_config
from .reload import Reloader, gate_setup
from .routes import SCHEMA_MODELS, router
from .service import CaptionService
from .settings import ServerSettings

# build_pool is the pool module's, kept importable here
__all__ = ["Placement", "Runtime", "build_pool", "create_app", "exposure_warnings", "open_store"]
log = logging.getLogger("reefcap.server")


@dataclass
class Placement:
    """Where this app runs beside others. ``worker``: its index among the workers of ``reefcap serve --workers``
    (None: the only process); ``generation`` and ``target``: the shared generation and primary it started on
    (``target`` None: the configured one); ``shared``: other processes share its feedback store, so a caption
    is answered only once its record is committed (any of them may be asked for its feedback next)."""

    worker: int | None = None
    generation: int = 0
    target: str | None = None
    shared: bool = False


def open_store(settings: ServerSettings) -> FeedbackStore:
    """The feedback store the settings name: PostgreSQL with ``FEEDBACK_DSN``, else the SQLite ``FEEDBACK_DB``."""
    return FeedbackStore(settings.feedback_dsn or settings.feedback_db, settings.feedback_retain)


class Runtime:
    """What the routes reach through ``app.state.runtime``: the service and reloader once models are up."""

    def __init__(
        self,
        settings: ServerSettings,
        metrics: Metrics,
        placement: Placement | None = None,
        store: FeedbackStore | None = None,
    ) -> None:
        self.settings, self.metrics = settings, metrics
        self.placement = placement or Placement(shared=bool(settings.feedback_dsn))
        self.service: CaptionService | None = None
        self.reloader: Reloader | None = None
        self.closing = False
        self._store: FeedbackStore | None = store
        self._tasks: list[asyncio.Task] = []

    def ready_service(self) -> CaptionService:
        """The service, or a 503 ``not_ready`` while no model can answer."""
        if self.service is None or not self.service.pool.ready:
            retry = {"Retry-After": str(self.settings.retry_after_s)}
            raise ApiError(503, "not_ready", "no model is loaded yet", retry)
        return self.service

    async def start(self, pool: ModelPool | None) -> None:
        """Bring the service up on ``pool``; without one, load the models in the background (``/readyz``)."""
        if self._store is None:
            self._store = open_store(self.settings)
        if pool is not None:
            self._bring_up(pool)
        else:
            self._tasks.append(asyncio.create_task(self._load_then_bring_up()))

    async def _load_then_bring_up(self) -> None:
        self._bring_up(await asyncio.to_thread(build_pool, self.settings, self.metrics))

    def _bring_up(self, pool: ModelPool) -> None:
        s, where = self.settings, self.placement
        service = CaptionService(s, pool, self.metrics, self._store, wait_for_records=where.shared)
        service.start()
        shared = SharedGeneration(self._store, s.model)
        gate = gate_setup(s, self._store)
        primary = where.target or s.model
        self.reloader = Reloader(pool, primary, engine_config(s), self.metrics, gate, shared, where.generation)
        self.service = service
        if s.reload_poll_s > 0 and not where.worker:  # one folder watcher per server; the other workers follow it
            self._tasks.append(asyncio.create_task(self.reloader.watch(s.reload_poll_s)))
        self._tasks.append(asyncio.create_task(self.reloader.follow(s.generation_poll_s)))
        if self.metrics.shared_dir:
            self.metrics.quality_source = self.quality_scores

    def quality_scores(self) -> list[tuple[tuple[str, ...], float]]:
        """The quality gauge's series: the loaded models' manifest scores and the shared store's rolling ones
        (what every worker's scrape shows, whichever served the images)."""
        out: list[tuple[tuple[str, ...], float]] = []
        if self.service is not None:
            out += self.service.pool.manifest_scores()
        try:
            for model in self._store.models_with_feedback():
                scores = self._store.rolling_scores(model, self.settings.feedback_window)
                kept = [m for m in ("Bleu_4", "CIDEr") if m in scores]
                out += [((model, m, "feedback", "rolling"), float(scores[m])) for m in kept]
        except Exception as exc:  # the scrape still answers, without the rolling scores
            log.error("could not read the rolling scores for /metrics: %s", exc)
        return out

    async def stop(self) -> None:
        self.closing = True
        for t in self._tasks:
            t.cancel()
        if self.service is not None:
            await self.service.close()  # drains queued work before the process exits
        if self._store is not None:
            self._store.close()


def create_app(
    settings: ServerSettings | None = None,
    pool: ModelPool | None = None,
    placement: Placement | None = None,
    store: FeedbackStore | None = None,
) -> FastAPI:
    """The caption server. Without ``pool``, models load in the background after startup (``/readyz``).

    The app reports to the pool's :class:`Metrics` when it has them (``build_pool(settings, metrics)``),
    else to new ones it gives the pool. ``placement``: where it runs beside other processes; ``store``: its
    feedback store, already open (else it opens the one the settings name at startup).
    """
    settings = settings or ServerSettings()
    metrics = pool.metrics if pool is not None and pool.metrics is not None else Metrics()
    if pool is not None and pool.metrics is None:
        pool.attach_metrics(metrics)
    runtime = Runtime(settings, metrics, placement, store)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        for warning in exposure_warnings(settings):
            log.warning("%s", warning)
        await runtime.start(pool)
        try:
            yield
        finally:
            await runtime.stop()

    # /docs is docs.py's: Swagger UI from the installed package under a CSP, not FastAPI's page loading a CDN.
    app = FastAPI(title="reefcap", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.metrics, app.state.settings, app.state.runtime = metrics, settings, runtime
    install_error_handlers(app, settings.retry_after_s)
    app.include_router(router)
    app.include_router(docs_router)
    if settings.admin_key:  # otherwise not mounted: answered as a missing route, and left out of the schema
        app.include_router(admin_router)
    install_openapi(app, [*SCHEMA_MODELS, ReloadBody], bool(settings.api_key), PUBLIC_PATHS)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"])
    app.add_middleware(BodyLimits, read_timeout_s=settings.read_timeout_s, max_large_bodies=settings.max_large_bodies)
    app.add_middleware(Gateway, settings=settings, metrics=metrics, worker=runtime.placement.worker)
    return app


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def exposure_warnings(settings: ServerSettings) -> list[str]:
    """What start-up logs when the settings leave the server open to whoever reaches its port."""
    if is_loopback(settings.host) or settings.api_key:
        return []
    return [
        f"listening on {settings.host}:{settings.port}, which is not loopback, with no API key: anyone who "
        "reaches this port can caption images and post feedback. Set REEFCAP_API_KEY (or --api-key)."
    ]
