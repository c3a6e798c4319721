"""Prometheus metrics, all prefixed ``reefcap_`` with their unit in the name.

Each app gets its own registry, so several apps in one process (the in-process tests) never collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The server's instruments; components get this object and touch only what they own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._traffic(self.registry)
        self._models(self.registry)
        self._captions(self.registry)

    def _traffic(self, r: CollectorRegistry) -> None:
        """Requests, the queue, batches and images dropped before inference (the gateway and the batcher)."""
        self.requests = Counter(
            "reefcap_http_requests_total", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "reefcap_http_request_duration_seconds",
            "HTTP request latency by endpoint and status",
            ["endpoint", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("reefcap_queue_depth_images", "Images waiting for a batch", registry=r)
        self.queue_wait = Histogram(
            "reefcap_queue_wait_seconds", "Time an image waited for its batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "reefcap_batch_size_images", "Images per inference batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.dropped = Counter(
            "reefcap_dropped_images_total",
            "Images refused or dropped before inference, by reason (queue_full, deadline, disconnected)",
            ["reason"],
            registry=r,
        )

    def _models(self, r: CollectorRegistry) -> None:
        """The models: inference time, fallbacks, breaker, loaded models and reloads (the pool and reloader)."""
        self.inference_seconds = Histogram(
            "reefcap_inference_duration_seconds",
            "Inference time per batch by model and role",
            ["model", "role"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.fallbacks = Counter(
            "reefcap_fallbacks_total", "Images answered by the fallback model, by reason", ["reason"], registry=r
        )
        self.breaker_open = Gauge("reefcap_circuit_open", "1 while the primary's circuit breaker is open", registry=r)
        self.model_info = Gauge(
            "reefcap_model_info", "Loaded models (value 1)", ["role", "name", "version", "backend"], registry=r
        )
        self.reloads = Counter("reefcap_reloads_total", "Hot reload attempts by result", ["result"], registry=r)

    def _captions(self, r: CollectorRegistry) -> None:
        """What was served: images, their quality, caption length, confidence and quality scores (the service)."""
        self.images = Counter("reefcap_images_captioned_total", "Images captioned by model", ["model"], registry=r)
        self.caption_words = Histogram(
            "reefcap_caption_length_words",
            "Words per served caption",
            buckets=(0, 1, 2, 4, 6, 8, 10, 12, 16, 24, 32),
            registry=r,
        )
        self.confidence = Histogram(
            "reefcap_caption_confidence_logprob",
            "Mean token log-probability of served captions",
            buckets=(-8, -6, -4, -3, -2, -1.5, -1, -0.5, -0.25, -0.1, 0),
            registry=r,
        )
        self.uiqm = Histogram(
            "reefcap_input_uiqm_score", "UIQM of input images", buckets=(0, 0.5, 1, 1.5, 2, 2.5, 3, 4, 5), registry=r
        )
        self.uciqe = Histogram(
            "reefcap_input_uciqe_score",
            "UCIQE of input images",
            buckets=(0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1),
            registry=r,
        )
        self.quality = Gauge(
            "reefcap_caption_quality_score",
            "Caption quality per model: source=manifest (evaluation per split) or feedback (rolling)",
            ["model", "metric", "source", "split"],
            registry=r,
        )
        self.feedback = Counter("reefcap_feedback_references_total", "Reference captions received", registry=r)
        self.routes = Counter(
            "reefcap_route_images_total",
            "Images by the router's domain (underwater, in_air) and the model that answered them",
            ["domain", "model"],
            registry=r,
        )
        self.water_types = Counter(
            "reefcap_water_type_images_total",
            "Images served by a water-type experts model, by its estimated water type",
            ["model", "water_type"],
            registry=r,
        )
