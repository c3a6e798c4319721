"""Server settings: every field can come from a ``reefcap serve`` flag or a ``REEFCAP_<NAME>`` variable.

Flags win over environment variables, which win over the defaults below (pydantic-settings order). Each field's
``description`` is what ``serve --help`` and the README's settings table say about it (``server/flags.py`` makes
both from this model); ``secret`` fields never appear in an error message or a repr, ``variable_only`` ones have
no flag (flags show in ``ps``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any

from PIL import Image
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from reefcap.models.data.images import DEFAULT_FORMATS, ImageLimits
from reefcap.models.engines.base import check_device
from reefcap.models.errors import ReefcapError
from reefcap.models.policy import (
    DEFAULT_BREAKER_FAILURES,
    DEFAULT_BREAKER_RESET_S,
    DEFAULT_FALLBACK,
    DEFAULT_MAX_LENGTH,
    DEFAULT_NUM_BEAMS,
    DEFAULT_PRIMARY,
)

ENV_PREFIX = "REEFCAP_"
# PIL refuses an image past twice its MAX_IMAGE_PIXELS with its own error whatever the caller's limit: the
# server's pixel limit is capped there so that its own limit and message are the ones every client meets.
PIL_PIXEL_CEILING = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)
# A key travels in an Authorization header: visible ASCII, no spaces (anything else could never match).
_KEY_CHARS = re.compile(r"[\x21-\x7e]+")
SECRET: dict[str, Any] = {"secret": True}
VARIABLE_ONLY: dict[str, Any] = {"secret": True, "variable_only": True}


class ServerSettings(BaseSettings):
    """How ``reefcap serve`` runs. The README's "Server" section documents each field (generated from here)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    host: str = Field("127.0.0.1", description="address to bind (`make serve` and the Dockerfile use `0.0.0.0`)")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    # `reefcap caption` and `reefcap model list` read the same two constants.
    model: str = Field(DEFAULT_PRIMARY, description="primary model: zoo name, local directory or hub id")
    fallback: str | None = Field(DEFAULT_FALLBACK, description="fallback model, the same forms; `none` for none")
    backend: str = Field("auto", description="`torch`, `onnx`, or `auto`: onnx when importable, else torch")
    device: str = Field("auto", description="`auto`, `cpu`, `cuda` or `cuda:N`, as for `reefcap caption`")
    # auto: int8 for a checkpoint whose manifest records >= 95% identical greedy captions int8 vs fp32 on this
    # kind of CPU (models/precision.py; the bundled primary does), served by ONNX on the CPU; fp32 otherwise.
    dtype: str = Field(
        "auto",
        description="`auto`, `fp32`, `int8`, `bf16` or `fp16`; `auto` is int8 for a checkpoint whose "
        "`manifest.json` records at least 95% identical greedy captions int8 vs fp32 (`int8_agreement`) on a kind "
        "of CPU this one is, when ONNX Runtime serves it on the CPU (the bundled primary on AVX2 or AVX-512 VNNI "
        "CPUs), else fp32",
    )
    # On a small shared CPU, inference threads fighting the decoding threads made batches up to 20x slower.
    inference_threads: int = Field(
        0,
        ge=0,
        description="PyTorch and ONNX Runtime threads; 0 = the loader's policy: cores minus one (left for decoding "
        "and HTTP), every core for a model of 50 M parameters or more",
    )
    # A fast model's batch runs on one thread, so one batch at a time left a core idle.
    inference_workers: int = Field(
        0,
        ge=0,
        le=8,
        description="batches run at once, each on its own thread; 0 = two for a primary the warm-up measures "
        "under 0.1 s an image on two cores or more (bundled model: 271 -> 338 images/s at 32 connections on "
        "2 vCPUs), else one",
    )

    max_batch_size: int = Field(16, ge=1, le=256, description="largest inference batch, in images")
    max_wait_ms: float = Field(10.0, ge=0, description="longest wait of a batch's oldest image before it runs")
    max_queue: int = Field(256, ge=1, description="queued images beyond which requests get 503 + `Retry-After`")
    request_timeout_s: float = Field(30.0, gt=0, description="per-request deadline (504 after it)")
    retry_after_s: int = Field(1, ge=1, description="seconds a 503's `Retry-After` asks clients to wait")
    # On 2 cores a second decoding thread only fought the inference and event-loop threads (10-15% fewer images/s).
    decode_workers: int = Field(
        0,
        ge=0,
        description="threads decoding images and measuring UIQM/UCIQE (on a copy reduced by a whole factor to at "
        "most 128 px a side); 0 = half the cores, at least one",
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="on SIGTERM, seconds to finish queued work (fractions honoured; then 503)"
    )

    primary_timeout_s: float = Field(
        20.0, gt=0, description="a primary batch slower than this is answered by the fallback"
    )
    breaker_failures: int = Field(
        DEFAULT_BREAKER_FAILURES, ge=1, description="consecutive primary failures that open the circuit breaker"
    )
    breaker_reset_s: float = Field(
        DEFAULT_BREAKER_RESET_S, gt=0, description="seconds the open breaker skips the primary"
    )

    # Greedy is the fastest and gives the same caption whatever the batch it lands in.
    num_beams: int = Field(DEFAULT_NUM_BEAMS, ge=1, le=16, description="default beam width (requests may override)")
    max_length: int = Field(
        DEFAULT_MAX_LENGTH, ge=2, le=512, description="default maximum tokens (requests may override)"
    )

    # Decompression bombs are stopped from the image header by max_pixels.
    max_image_bytes: int = Field(16 * 1024 * 1024, ge=1, description="largest image file, in bytes (16 MiB)")
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1, description="largest request body, in bytes (64 MiB)")
    max_images_per_request: int = Field(16, ge=1, description="images one request may carry (more: 413)")
    max_pixels: int = Field(
        40_000_000,
        ge=1,
        le=PIL_PIXEL_CEILING,
        description="largest image, in pixels, read from its header before any pixel is decoded (more: 413)",
    )
    formats: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_FORMATS), description="allowed image formats, comma-separated"
    )

    api_key: str | None = Field(
        None,
        repr=False,
        json_schema_extra=SECRET,
        description="when set, `Authorization: Bearer KEY` on everything but `/`, `/healthz`, `/readyz`, "
        "`/metrics`; prefer the variable (flags show in `ps`)",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated allowed CORS origins; empty: CORS off"
    )

    feedback_db: Path = Field(
        Path("reefcap-feedback.sqlite3"), description="SQLite file of served captions and feedback"
    )
    feedback_window: int = Field(500, ge=1, description="latest images with references in the rolling BLEU-4/CIDEr")
    feedback_retain: int = Field(
        20_000, ge=1, description="served images kept for feedback, newest first (those with feedback: never pruned)"
    )

    reload_poll_s: float = Field(
        0.0, ge=0, description="watch the primary's folder every N s and hot-reload through the gate; 0: off"
    )
    gate_set: Path | None = Field(
        None,
        description="COCO file the quality gate scores candidate and serving model on (unset: held-out "
        "feedback, else the ReefScenes probe set)",
    )
    gate_tolerance: float = Field(
        0.02, ge=0, description="largest drop of a metric the gate accepts, in the metric's units"
    )
    gate_min_feedback: int = Field(30, ge=1, description="held-out feedback images needed before they are the gate set")
    log_level: str = Field("info", description="uvicorn and reefcap log level")

    # Without admin_key every /v1/admin/* route answers 404, as if absent: an open admin route let anyone probe
    # the filesystem and load models. Reload names resolve only to entries of models_dir, the bundled zoo and the
    # configured primary; a path or hub id from a request never loads.
    admin_key: str | None = Field(
        None,
        repr=False,
        json_schema_extra=VARIABLE_ONLY,
        description="bearer key of `/v1/admin/*` (unset: admin routes off, 404); must differ from the API key",
    )
    models_dir: Path | None = Field(
        None,
        description="folder whose entries `POST /v1/admin/reload` may load by name (links must stay inside it)",
    )

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

    @field_validator("api_key", "admin_key")
    @classmethod
    def _check_key(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None  # REEFCAP_ADMIN_KEY= (empty) leaves admin off, REEFCAP_API_KEY= leaves the API open
        if not _KEY_CHARS.fullmatch(value):
            # Never the value in the message: errors are printed.
            raise ValueError("must be visible ASCII characters without spaces (it is sent in an Authorization header)")
        return value

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
    # 2048 takes 16 images at 3 beams and 40 tokens; 16 images x 16 beams x 64 tokens (30x the default work) is
    # refused with a 422 naming the limit.
    max_request_cost: int = Field(
        2048, ge=1, description="a request's decoding work, images x `num_beams` x `max_length`; more is a 422"
    )
    feedback_max_references: int = Field(
        20, ge=1, description="references kept per served image (a post past it: 409 `too_many_references`)"
    )
    # File descriptors and the memory of bodies in flight stay bounded (at most this many x MAX_REQUEST_BYTES).
    max_connections: int = Field(
        128,
        ge=1,
        description="open connections served at once; a request on one past it is answered 503 + `Retry-After` "
        "(past four times as many more, at once on connect) and its connection closed",
    )
    # Trickling clients cannot hold connections open.
    read_timeout_s: float = Field(
        15.0, gt=0, description="seconds a client has to send a request head, and its body (body: 408)"
    )
    max_large_bodies: int = Field(
        4, ge=1, description="requests with bodies over 1 MiB in flight at once (past it: 503 `overloaded`)"
    )
    keep_alive_s: float = Field(5.0, gt=0, description="seconds an idle keep-alive connection stays open")
    # A primary batch gets max(PRIMARY_TIMEOUT_S, COST_SLACK x its expected time), a request max(REQUEST_TIMEOUT_S,
    # COST_SLACK x the expected time of the work queued ahead of it and its own).
    cost_slack: float = Field(
        4.0, ge=1, description="deadlines follow the primary's measured cost times this (README, Bounds)"
    )
    warm_up: bool = Field(True, description="caption a warm-up batch at start to measure the primary's cost")

    # ---- Performance (issue 16) ----
    # UIQM/UCIQE cost 0.9-2.7 ms an image (Zen 4 and Zen 2 vCPUs), half to a third of the server's CPU per image
    # on the tiny model: a sample feeds the histograms, and under load a cap per second bounds what it costs (4 a
    # second: at most about 1% of a core), since a few hundred measurements a minute already fill them.
    quality_sample_rate: float = Field(
        0.0625,
        ge=0,
        le=1,
        description="fraction of images measured for the `/metrics` UIQM/UCIQE histograms when their request "
        "does not ask (`options.quality`); evenly spread, the first image included",
    )
    quality_samples_per_s: float = Field(
        4.0,
        ge=0,
        description="most images a second each server process measures for those histograms unasked, whatever "
        "the rate gives (0: no cap)",
    )

    # ---- Scale-out (issue 24; README "Workers, Ray Serve and PostgreSQL") ----
    # One by default: each worker holds its own copy of the models (and a CUDA context on a GPU), and a model
    # whose arithmetic already fills the cores gains nothing from a second process; the bundled model on two
    # vCPUs does (the interpreter lock, not arithmetic, bounds one process there).
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="server processes on the one port (Linux), each with its own models, queue and connection "
        "limit, replaced if one dies; metrics, feedback and reloads are shared. 1: one process",
    )
    feedback_dsn: str | None = Field(
        None,
        repr=False,
        json_schema_extra=VARIABLE_ONLY,
        description="`postgresql://user:password@host/db`: feedback and the served model's generation in "
        "PostgreSQL, shared by servers on several machines (the `postgres` extra); unset: the SQLite `FEEDBACK_DB`",
    )
    generation_poll_s: float = Field(
        1.0,
        gt=0,
        description="seconds between reads of the shared generation record: a reload accepted by any worker or "
        "server on the same feedback store reaches this one within that and a model load",
    )
    ray: bool = Field(False, description="serve as a Ray Serve deployment (the `ray` extra) instead of uvicorn")
    ray_address: str | None = Field(
        None,
        description="Ray cluster to join with `--ray` (`auto`, `ray://HOST:10001`); unset: `RAY_ADDRESS`, a cluster "
        "`ray start` runs here, else a new local one",
    )
    replicas: int = Field(1, ge=1, description="Ray Serve replicas at start, and the fewest autoscaling keeps")
    max_replicas: int = Field(0, ge=0, description="Ray Serve autoscaling ceiling; 0: `REPLICAS` (no autoscaling)")
    target_ongoing_requests: float = Field(
        0,
        ge=0,
        description="requests in flight per replica that Ray Serve's autoscaler aims at; 0: `MAX_BATCH_SIZE` "
        "(a replica is busy when it holds a full batch)",
    )

    @field_validator("feedback_dsn")
    @classmethod
    def _check_dsn(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not re.match(r"postgres(ql)?://", value, re.IGNORECASE):
            raise ValueError("must be a PostgreSQL URL, postgresql://user:password@host:port/database")
        return value


def secret_fields() -> list[str]:
    """The settings whose values never appear in an error message or a repr."""
    return [n for n, f in ServerSettings.model_fields.items() if (f.json_schema_extra or {}).get("secret")]


def env_name(field: str) -> str:
    """The variable that sets ``field``: ``REEFCAP_MAX_PIXELS``."""
    return ENV_PREFIX + field.upper()


def flag_name(field: str) -> str | None:
    """``--name-with-dashes``, or None for a variable-only setting."""
    extra = ServerSettings.model_fields[field].json_schema_extra or {}
    return None if extra.get("variable_only") else "--" + field.replace("_", "-")


def where_set(field: str) -> str:
    """How a user sets ``field``: ``--port / REEFCAP_PORT``, or the variable alone."""
    flag = flag_name(field)
    return f"{flag} / {env_name(field)}" if flag else env_name(field)


def describe_error(exc: ValidationError) -> str:
    """One line naming each broken setting and its rule. Never the input: it may hold a secret."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False, include_context=False)[:3]:
        message = error["msg"].removeprefix("Value error, ")
        field = str(error["loc"][0]) if error["loc"] else None
        parts.append(f"{field} ({where_set(field)}): {message}" if field in ServerSettings.model_fields else message)
    return "; ".join(parts) or "invalid settings"


def load_settings(**overrides: Any) -> ServerSettings:
    """:class:`ServerSettings` from ``overrides`` (flags), the environment and the defaults; a settings error is a
    :class:`ReefcapError` of one line (exit 2) in which no secret's value appears."""
    try:
        return ServerSettings(**overrides)
    except ValidationError as exc:
        message = describe_error(exc)
    except SettingsError as exc:  # a REEFCAP_* variable that is not even parsable; names the field, not the value
        message = str(exc)
    secrets = [str(overrides.get(f) or "") for f in secret_fields()]
    secrets += [os.environ.get(env_name(f), "") for f in secret_fields()]
    for secret in sorted((s for s in secrets if s.strip()), key=len, reverse=True):
        message = message.replace(secret, "***")  # a validator's own message must not be the leak either
    raise ReefcapError(f"invalid settings: {message}") from None
