"""Server settings: every field can come from a ``reefcap serve`` flag or a ``REEFCAP_<NAME>`` variable.

Flags win over environment variables, which win over the defaults below (pydantic-settings order).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from reefcap.models.data.images import DEFAULT_FORMATS, ImageLimits
from reefcap.models.engines.base import check_device
from reefcap.models.policy import (
    DEFAULT_BREAKER_FAILURES,
    DEFAULT_BREAKER_RESET_S,
    DEFAULT_FALLBACK,
    DEFAULT_PRIMARY,
)


class ServerSettings(BaseSettings):
    """How ``reefcap serve`` runs. The README's "Server" section documents each field."""

    model_config = SettingsConfigDict(env_prefix="REEFCAP_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model: str = DEFAULT_PRIMARY  # `reefcap caption` and `reefcap model list` read the same constant
    fallback: str | None = DEFAULT_FALLBACK  # `reefcap caption` uses the same one
    backend: str = "auto"  # auto = the fastest registered backend that imports (onnx, else torch)
    device: str = "auto"
    # auto: int8 for a checkpoint whose manifest records >= 95% identical greedy captions int8 vs fp32 on this
    # kind of CPU (models/precision.py; the bundled primary does), served by ONNX on the CPU; fp32 otherwise.
    dtype: str = "auto"
    # Intra-op threads for PyTorch and ONNX Runtime. 0 = one per core minus one, kept for decoding and HTTP:
    # on a small shared CPU, inference threads fighting the decoding threads made batches up to 20x slower.
    inference_threads: int = Field(0, ge=0)
    # Batches run at once, each on its own thread. 0 = two for a model the warm-up measures under 0.1 s an image
    # on two cores or more (its batch runs on one thread, so one batch at a time left a core idle), else one.
    inference_workers: int = Field(0, ge=0, le=8)

    # The dynamic batcher's two knobs, its queue bound and the per-request deadline.
    max_batch_size: int = Field(16, ge=1, le=256)
    max_wait_ms: float = Field(10.0, ge=0)
    max_queue: int = Field(256, ge=1)
    request_timeout_s: float = Field(30.0, gt=0)
    retry_after_s: int = Field(1, ge=1)
    # Threads decoding uploads and measuring UIQM/UCIQE. 0 = half the cores (at least one): on 2 cores a
    # second decoding thread only fought the inference and event-loop threads (10-15% fewer images/s).
    decode_workers: int = Field(0, ge=0)
    drain_timeout_s: float = Field(30.0, ge=0)

    # Fallback policy: a primary batch slower than this is answered by the fallback; after
    # breaker_failures consecutive primary failures the primary is skipped for breaker_reset_s.
    primary_timeout_s: float = Field(20.0, gt=0)
    breaker_failures: int = Field(DEFAULT_BREAKER_FAILURES, ge=1)
    breaker_reset_s: float = Field(DEFAULT_BREAKER_RESET_S, gt=0)

    # Default decoding: greedy is the fastest and gives the same caption whatever the batch it lands in.
    num_beams: int = Field(1, ge=1, le=16)
    max_length: int = Field(20, ge=2, le=512)

    # Input limits (decompression bombs are stopped from the image header by max_pixels).
    max_image_bytes: int = Field(16 * 1024 * 1024, ge=1)
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1)
    max_images_per_request: int = Field(16, ge=1)
    max_pixels: int = Field(40_000_000, ge=1)
    formats: Annotated[list[str], NoDecode] = Field(default_factory=lambda: list(DEFAULT_FORMATS))

    api_key: str | None = None  # bearer key required on everything except /, /healthz, /readyz, /metrics
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)  # empty: CORS off

    feedback_db: Path = Path("reefcap-feedback.sqlite3")
    feedback_window: int = Field(500, ge=1)  # rolling BLEU-4/CIDEr over the latest N references per model
    feedback_retain: int = Field(20_000, ge=1)  # served images kept for feedback, newest first

    reload_poll_s: float = Field(0.0, ge=0)  # >0: watch the primary's folder and reload when it changes
    # The quality gate every reload passes (models/gate.py): the images both models caption (a COCO file; unset:
    # held-out feedback once there are gate_min_feedback images, else the ReefScenes probe set) and the largest
    # drop of a higher-is-better metric (rise of a lower-is-better one) it accepts, in the metric's units.
    gate_set: Path | None = None
    gate_tolerance: float = Field(0.02, ge=0)
    gate_min_feedback: int = Field(30, ge=1)
    log_level: str = "info"

    # Admin surface (README "Admin"). Without admin_key every /v1/admin/* route answers 404, as if absent: an
    # open admin route let anyone probe the filesystem and load models. Reload names resolve only to entries of
    # models_dir, the bundled zoo and the configured primary; a path or hub id from a request never loads.
    admin_key: str | None = None
    models_dir: Path | None = None

    @field_validator("formats", mode="before")
    @classmethod
    def _split_formats(cls, value: object) -> object:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        return [str(v).upper() for v in value] if isinstance(value, list) else value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        # The engines' own rule, so `serve --device gpu` stops as a bad setting, not as "no model could be loaded".
        return check_device(value)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [v for v in value.replace(",", " ").split() if v]
        return value

    @field_validator("admin_key")
    @classmethod
    def _blank_admin_key_is_none(cls, value: str | None) -> str | None:
        return value if value and value.strip() else None  # REEFCAP_ADMIN_KEY= (empty) leaves admin off

    @field_validator("models_dir")
    @classmethod
    def _models_dir_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.expanduser().is_dir():
            raise ValueError(f"models_dir {str(value)!r} is not a directory")
        return value

    @model_validator(mode="after")
    def _distinct_keys(self) -> ServerSettings:
        # One key for both would make every caption client an admin: the separation is the point.
        if self.admin_key is not None and self.admin_key == self.api_key:
            raise ValueError("admin_key must differ from api_key")
        return self

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_pixels, formats=tuple(self.formats))

    # ---- Bounds on what one client can cost (issue 13 part B; one block, kept last) ----
    # A request's decoding work: images x num_beams x max_length. 2048 takes 16 images at 3 beams and 40
    # tokens; 16 images x 16 beams x 64 tokens (30x the default work) is refused with a 422 naming the limit.
    max_request_cost: int = Field(2048, ge=1)
    feedback_max_references: int = Field(20, ge=1)  # references kept per served image (posts beyond: 409)
    # Open connections beyond which new ones get a 503 (uvicorn's limit_concurrency): file descriptors and the
    # memory of bodies in flight stay bounded (at most this many x MAX_REQUEST_BYTES).
    max_connections: int = Field(128, ge=1)
    # A client must send its request head and body within this many seconds, and an idle keep-alive connection
    # is closed after keep_alive_s: trickling clients cannot hold connections open.
    read_timeout_s: float = Field(15.0, gt=0)
    max_large_bodies: int = Field(4, ge=1)  # requests with bodies over 1 MiB in flight at once (beyond: 503)
    keep_alive_s: float = Field(5.0, gt=0)
    # With a measured model cost (a warm-up batch at start, then the running mean of primary batches), batch
    # deadlines follow it: a primary batch gets max(PRIMARY_TIMEOUT_S, COST_SLACK x its expected time), a request
    # max(REQUEST_TIMEOUT_S, COST_SLACK x the expected time of the work queued ahead of it and its own).
    cost_slack: float = Field(4.0, ge=1)
    warm_up: bool = True

    # ---- Performance (issue 16) ----
    # UIQM/UCIQE cost about 0.9 ms an image, a third of the server's CPU per image on the tiny model: they are
    # measured for every image whose request asks (options.quality; the web page always does), and for this
    # fraction of the others, so the Prometheus histograms still follow the inputs (1/16: one image in 16).
    quality_sample_rate: float = Field(0.0625, ge=0, le=1)
