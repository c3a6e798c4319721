"""``reefcap serve --ray``: the caption service as a Ray Serve deployment, for serving from many machines.

Each replica is the whole reefcap app, built by :func:`.processes.prepare_app` from the same settings as a plain
server: the same routes, gateway, API and admin keys, bounds and result records, and its own dynamic batcher,
so batches form inside each replica. Ray Serve's HTTP proxy spreads requests over the replicas, and its
autoscaler adds replicas (``REPLICAS`` to ``MAX_REPLICAS``) to keep ``TARGET_ONGOING_REQUESTS`` requests in flight
in each; ``max_ongoing_requests`` is twice that and at least ``MAX_BATCH_SIZE``, since a replica whose cap is
below a batch never fills one. Models load in each replica from ``MODEL``, so it must be a bundled model or a
path every node reads (a shared filesystem): no weights travel through the object store. Feedback and the
served model's generation live in the store the settings name: with several nodes, PostgreSQL
(``REEFCAP_FEEDBACK_DSN``), the same one plain servers may use, so one reload reaches both.

Metrics are exported the way Ray Serve exports an application's own: every instrument is mirrored into
``ray.serve.metrics`` (tagged with deployment, replica and application), which each node's metrics agent serves
to Prometheus as ``ray_reefcap_*`` (counters without ``_total`` in their Ray name; histograms with their positive
buckets only, so the confidence histogram, all of whose buckets are log-probabilities at or below 0, is not
mirrored). ``/metrics`` on the deployment answers for the one replica that took the request.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from .metrics import Metrics
from .settings import ServerSettings

log = logging.getLogger("reefcap.server")
APP_NAME = "reefcap"


class _Mirrored:
    """A Prometheus instrument that also records into a Ray metric; ``labels`` become Ray tags."""

    def __init__(self, metric: Any, ray_metric: Any, labelnames: tuple, tags: dict | None = None) -> None:
        self._metric, self._ray, self._labelnames, self._tags = metric, ray_metric, labelnames, tags or {}

    def labels(self, *values: Any, **named: Any) -> _Mirrored:
        positional = dict(zip(self._labelnames, map(str, values), strict=False))  # the rest come by name
        tags = {**positional, **{k: str(v) for k, v in named.items()}}
        return _Mirrored(self._metric.labels(*values, **named), self._ray, self._labelnames, tags)

    def inc(self, amount: float = 1) -> None:
        self._metric.inc(amount)
        if self._ray is not None:
            self._ray.inc(amount, tags=self._tags)

    def observe(self, value: float) -> None:
        self._metric.observe(value)
        if self._ray is not None:
            self._ray.observe(value, tags=self._tags)

    def set(self, value: float) -> None:
        self._metric.set(value)
        if self._ray is not None:
            self._ray.set(value, tags=self._tags)

    def remove(self, *values: Any) -> None:
        self._metric.remove(*values)
        if self._ray is not None:  # Ray keeps a series once recorded: it reads 0 from now on
            self._ray.set(0, tags=dict(zip(self._labelnames, map(str, values), strict=True)))

    def clear(self) -> None:
        self._metric.clear()


class RayMetrics(Metrics):
    """The server's metrics, each also recorded into ``ray.serve.metrics`` (see the module docstring)."""

    def _mirror(self, kind: str, metric: Any, name: str, documentation: str, labelnames: tuple, buckets: tuple = ()):
        from ray.serve import metrics as serve_metrics

        ray_metric: Any = None
        if kind == "counter":
            ray_metric = serve_metrics.Counter(name.removesuffix("_total"), documentation, tag_keys=labelnames)
        elif kind == "gauge":
            ray_metric = serve_metrics.Gauge(name, documentation, tag_keys=labelnames)
        elif [b for b in buckets if b > 0]:  # Ray's histograms take positive boundaries only
            ray_metric = serve_metrics.Histogram(
                name, documentation, boundaries=[float(b) for b in buckets if b > 0], tag_keys=labelnames
            )
        return _Mirrored(metric, ray_metric, labelnames)


def replica_settings(settings: ServerSettings) -> ServerSettings:
    """A replica's settings: one inference thread unless set (a replica is given that many CPUs by Ray)."""
    return settings.model_copy(update={"inference_threads": max(1, settings.inference_threads)})


def deployment_options(settings: ServerSettings) -> dict[str, Any]:
    """Ray Serve's options for the deployment: replicas, autoscaling on ongoing requests, CPUs per replica."""
    target = settings.target_ongoing_requests or settings.max_batch_size
    return {
        "name": APP_NAME,
        "max_ongoing_requests": max(int(2 * target), settings.max_batch_size),
        "autoscaling_config": {
            "min_replicas": settings.replicas,
            "initial_replicas": settings.replicas,
            "max_replicas": max(settings.max_replicas, settings.replicas),
            "target_ongoing_requests": target,
        },
        "ray_actor_options": {"num_cpus": replica_settings(settings).inference_threads},
    }


def build_application(settings: ServerSettings) -> Any:
    """The bound Ray Serve application (``serve.run`` takes it)."""
    from ray import serve

    @serve.ingress()  # late-bound: each replica builds its app in __serve_build_asgi_app__
    class Reefcap:
        def __init__(self, settings: ServerSettings) -> None:
            from .limits import quiet_gc
            from .processes import prepare_app

            # Not `self.app`: Ray's wrapper class has an `app` property of its own.
            self.reefcap_app = prepare_app(replica_settings(settings), shared=True, metrics=RayMetrics())
            quiet_gc()  # the replica's process is reefcap's alone, as a worker's is

        def __serve_build_asgi_app__(self) -> Any:
            return self.reefcap_app

    return serve.deployment(Reefcap).options(**deployment_options(settings)).bind(settings)


def serve_on_ray(settings: ServerSettings) -> int:
    """Start (or join) Ray, run the deployment with its HTTP proxy on ``HOST``:``PORT``, and keep it until
    SIGTERM or SIGINT; then shut Serve down (a Ray started here stops with it)."""
    try:
        import ray
        from ray import serve
    except ImportError:
        from reefcap.models.errors import ReefcapError

        raise ReefcapError("--ray needs Ray Serve: pip install 'reefcap[ray]'") from None
    ray.init(address=settings.ray_address, logging_level=settings.log_level.upper())
    # Right after ray.init, which installs a handler that aborts on SIGTERM: a signal while the replicas start
    # (serve.run waits for them) then stops the server cleanly once they are up, instead of a core dump.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_application(settings), name=APP_NAME, route_prefix="/", blocking=False)
    log.warning("reefcap on Ray Serve at http://%s:%d (%s)", settings.host, settings.port, deployment_options(settings))
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0
