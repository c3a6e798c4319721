"""Prometheus metrics, all prefixed ``reefcap_`` with their unit in the name.

Each app gets its own registry, so several apps in one process (the in-process tests) never collide.

Under ``reefcap serve --workers N`` the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` to a directory it made
fresh before any worker started, and prometheus-client keeps every worker's values in files there. A scrape of
any worker then reads them all (:meth:`Metrics.exposition`): counters and histograms summed over every worker
that ever ran (a replaced worker's counts stay, so totals never fall back), and each gauge as its stated mode
says: ``livesum`` for the queue depth, ``livemax`` for the breaker, ``liveall`` (one series per worker, with
a ``pid`` label) for the loaded models; the supervisor marks a dead worker's live gauges gone. The quality
gauge is not taken from any worker's memory: the scraped worker builds it from its models' manifests (every
worker follows the one shared generation) and the rolling scores of the shared feedback store.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

QUALITY = "reefcap_caption_quality_score"
QUALITY_LABELS = ["model", "metric", "source", "split"]
QUALITY_HELP = "Caption quality per model: source=manifest (evaluation per split) or feedback (rolling)"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The server's instruments; components get this object and touch only what they own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # Set by the supervisor of several workers before this process started (module docstring).
        self.shared_dir: str | None = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        # (labels, value) of the quality gauge, read at each scrape when metrics are shared (the app sets it).
        self.quality_source: Callable[[], Iterable[tuple[tuple[str, ...], float]]] | None = None
        self._traffic(self.registry)
        self._models(self.registry)
        self._captions(self.registry)

    def _traffic(self, r: CollectorRegistry) -> None:
        """Requests, the queue, batches and images dropped before inference (the gateway and the batcher)."""
        self.requests = self._counter(
            "reefcap_http_requests_total", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.request_seconds = self._histogram(
            "reefcap_http_request_duration_seconds",
            "HTTP request latency by endpoint and status",
            ["endpoint", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = self._gauge(
            "reefcap_queue_depth_images", "Images waiting for a batch", multiprocess_mode="livesum", registry=r
        )
        self.queue_wait = self._histogram(
            "reefcap_queue_wait_seconds", "Time an image waited for its batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = self._histogram(
            "reefcap_batch_size_images", "Images per inference batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.dropped = self._counter(
            "reefcap_dropped_images_total",
            "Images refused or dropped before inference, by reason (queue_full, deadline, disconnected)",
            ["reason"],
            registry=r,
        )

    def _models(self, r: CollectorRegistry) -> None:
        """The models: inference time, fallbacks, breaker, loaded models and reloads (the pool and reloader)."""
        self.inference_seconds = self._histogram(
            "reefcap_inference_duration_seconds",
            "Inference time per batch by model and role",
            ["model", "role"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.fallbacks = self._counter(
            "reefcap_fallbacks_total", "Images answered by the fallback model, by reason", ["reason"], registry=r
        )
        self.breaker_open = self._gauge(
            "reefcap_circuit_open",
            "1 while the primary's circuit breaker is open (in any worker)",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.model_info = self._gauge(
            "reefcap_model_info",
            "Loaded models (value 1; one series per worker, labelled pid, with several workers)",
            ["role", "name", "version", "backend"],
            multiprocess_mode="liveall",
            registry=r,
        )
        self.reloads = self._counter("reefcap_reloads_total", "Hot reload attempts by result", ["result"], registry=r)

    def _captions(self, r: CollectorRegistry) -> None:
        """What was served: images, their quality, caption length, confidence and quality scores (the service)."""
        images = "reefcap_images_captioned_total"
        self.images = self._counter(images, "Images captioned by model", ["model"], registry=r)
        self.caption_words = self._histogram(
            "reefcap_caption_length_words",
            "Words per served caption",
            buckets=(0, 1, 2, 4, 6, 8, 10, 12, 16, 24, 32),
            registry=r,
        )
        self.confidence = self._histogram(
            "reefcap_caption_confidence_logprob",
            "Mean token log-probability of served captions",
            buckets=(-8, -6, -4, -3, -2, -1.5, -1, -0.5, -0.25, -0.1, 0),
            registry=r,
        )
        self.uiqm = self._histogram(
            "reefcap_input_uiqm_score", "UIQM of input images", buckets=(0, 0.5, 1, 1.5, 2, 2.5, 3, 4, 5), registry=r
        )
        self.uciqe = self._histogram(
            "reefcap_input_uciqe_score",
            "UCIQE of input images",
            buckets=(0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1),
            registry=r,
        )
        mode = "livemostrecent"  # unused by scrapes of shared metrics, which read the store (exposition)
        self.quality = self._gauge(QUALITY, QUALITY_HELP, QUALITY_LABELS, multiprocess_mode=mode, registry=r)
        self.feedback = self._counter("reefcap_feedback_references_total", "Reference captions received", registry=r)
        self.routes = self._counter(
            "reefcap_route_images_total",
            "Images by the router's domain (underwater, in_air) and the model that answered them",
            ["domain", "model"],
            registry=r,
        )
        self.water_types = self._counter(
            "reefcap_water_type_images_total",
            "Images served by a water-type experts model, by its estimated water type",
            ["model", "water_type"],
            registry=r,
        )

    # Every instrument is made here, so an exporter beside Prometheus can mirror them all (``_mirror``).
    def _counter(self, name: str, documentation: str, labelnames=(), registry=None):
        metric = Counter(name, documentation, labelnames, registry=registry)
        return self._mirror("counter", metric, name, documentation, tuple(labelnames))

    def _histogram(self, name: str, documentation: str, labelnames=(), buckets=LATENCY_BUCKETS, registry=None):
        metric = Histogram(name, documentation, labelnames, buckets=buckets, registry=registry)
        return self._mirror("histogram", metric, name, documentation, tuple(labelnames), tuple(buckets))

    def _gauge(self, name: str, documentation: str, labelnames=(), multiprocess_mode="all", registry=None):
        metric = Gauge(name, documentation, labelnames, multiprocess_mode=multiprocess_mode, registry=registry)
        return self._mirror("gauge", metric, name, documentation, tuple(labelnames))

    def _mirror(self, kind: str, metric, name: str, documentation: str, labelnames: tuple, buckets: tuple = ()):
        """The instrument components get: here the Prometheus one; the Ray Serve deployment's subclass returns one
        that also reports to Ray's metrics (:mod:`.ray_serve`)."""
        return metric

    def retire(self, gauge: Gauge, labels: tuple[str, ...]) -> None:
        """Take a gauge's series away: removed in one process; with shared metrics, where files cannot lose a
        series, set to 0 (and left out of scrapes, :meth:`exposition`)."""
        if self.shared_dir:
            gauge.labels(*labels).set(0)
        else:
            gauge.remove(*labels)

    def exposition(self) -> bytes:
        """The text a scrape of ``/metrics`` gets: this registry, or with shared metrics every worker's."""
        if not self.shared_dir:
            return generate_latest(self.registry)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(SharedCollector(self.shared_dir, self.quality_source, self.registry))
        return generate_latest(registry)


class SharedCollector:
    """Every worker's metrics from the multiprocess directory, with the quality gauge built at the scrape; the
    families nobody has written yet are declared empty, as one process's registry declares them."""

    def __init__(
        self,
        path: str,
        quality: Callable[[], Iterable[tuple[tuple[str, ...], float]]] | None,
        declared: CollectorRegistry,
    ) -> None:
        self.path, self.quality, self.declared = path, quality, declared

    def collect(self):
        from prometheus_client.multiprocess import MultiProcessCollector

        seen = {QUALITY}
        for family in MultiProcessCollector(None, self.path).collect():
            if family.name == QUALITY:
                continue  # the workers' own copies: replaced by the one read below
            if family.name == "reefcap_model_info":  # a model a worker replaced is 0 there (retire)
                family.samples = [s for s in family.samples if s.value != 0]
            seen.add(family.name)
            yield family
        for family in self.declared.collect():
            if family.name not in seen:
                yield Metric(family.name, family.documentation, family.type)
        gauge = GaugeMetricFamily(QUALITY, QUALITY_HELP, labels=QUALITY_LABELS)
        for labels, value in self.quality() if self.quality else ():
            gauge.add_metric(list(labels), value)
        yield gauge
