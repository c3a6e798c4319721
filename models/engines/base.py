"""The CaptionEngine contract that every backend (PyTorch, ONNX Runtime) implements.

The hooks follow the shape of a serving API: ``load`` once, ``preprocess`` images into a model batch
(cheap to run on a decoding thread), ``generate`` captions for a batch, ``describe`` the model. The
public ``caption`` method ties them together and checks that it got one caption per image, so the
server, the batch CLI and the evaluator share one path.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from reefcap.models.data.images import ImageLimits, ImageSource, load_image
from reefcap.models.errors import InvalidOptionsError

BLIP_PROMPT = "a picture of"
# What every backend understands; anything else ("gpu", "cuda:x") would fail deep inside torch or ORT.
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def check_device(device: object) -> str:
    """``device`` if it is auto, cpu, cuda or cuda:N; else :class:`InvalidOptionsError` naming those forms."""
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise InvalidOptionsError(f"device must be auto, cpu, cuda or cuda:N (N a GPU index), got {device!r}")
    return device


def require_positive(name: str, value: object) -> int:
    """``value`` if it is a whole number of at least 1 (batch sizes, worker counts); ``name`` is for the message."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidOptionsError(f"{name} must be at least 1, got {value!r}")
    return value


@dataclass(frozen=True)
class DecodeOptions:
    """How captions are decoded. Defaults are BLIP's official captioning evaluation settings.

    ``max_length`` and ``min_length`` count the decoder prompt tokens too ([DEC] + "a picture of"), as the
    original BLIP code does, so a default caption has at most 16 words' worth of tokens.
    """

    num_beams: int = 3
    max_length: int = 20
    min_length: int = 5
    repetition_penalty: float = 1.0
    prompt: str = BLIP_PROMPT

    @classmethod
    def greedy(cls, **overrides: Any) -> DecodeOptions:
        """Greedy decoding (one beam): fastest, and deterministic across batch sizes."""
        return cls(num_beams=1, **overrides)

    def merged(self, **overrides: Any) -> DecodeOptions:
        """A copy with the given fields replaced; ``None`` values are ignored."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def validate(self) -> DecodeOptions:
        """``self`` if every field is in range, else :class:`InvalidOptionsError` (also a ValueError)."""
        if not 1 <= self.num_beams <= 16:
            raise InvalidOptionsError(f"num_beams must be between 1 and 16, got {self.num_beams}")
        if not 1 <= self.min_length <= self.max_length <= 512:
            raise InvalidOptionsError(
                "need 1 <= min_length <= max_length <= 512, "
                f"got min_length {self.min_length} and max_length {self.max_length}"
            )
        if not 0.5 <= self.repetition_penalty <= 5.0:
            raise InvalidOptionsError(f"repetition_penalty must be in [0.5, 5], got {self.repetition_penalty}")
        return self


BACKEND_CHOICES = ("auto", "torch", "onnx")
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16", "int8")


@dataclass(frozen=True)
class EngineConfig:
    """Where and how an engine runs. Saved by nothing: it describes a deployment, not a checkpoint.

    ``auto`` values are settled by :func:`reefcap.models.engines.loader.load_engine` (the one loader every
    entrypoint uses): ``backend`` auto is ONNX Runtime where it imports (PyTorch if it cannot load the model),
    ``dtype`` auto is int8 where the checkpoint's stored int8 agreement holds on this CPU
    (:mod:`.precision`), else fp32, and ``threads`` 0 is the thread policy (:func:`.loader.thread_count`).
    """

    backend: str = "auto"  # auto | torch | onnx
    device: str = "auto"  # "auto" picks cuda when available, else cpu
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16 | int8
    threads: int = 0  # intra-op threads of the model's runtime; 0 = the loader's thread policy
    limits: ImageLimits = field(default_factory=ImageLimits)

    def __post_init__(self) -> None:
        # Checked here, the one place every entrypoint passes through, before any model is resolved.
        check_device(self.device)
        if self.backend not in BACKEND_CHOICES:
            raise InvalidOptionsError(f"backend must be one of {', '.join(BACKEND_CHOICES)}, got {self.backend!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise InvalidOptionsError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise InvalidOptionsError(f"threads must be 0 (automatic) or more, got {self.threads!r}")


@dataclass(frozen=True)
class Caption:
    """One image's caption. ``confidence`` is the mean log-probability of the generated tokens (<= 0).

    ``water_type`` is ``{"label", "probability"}`` from a water-type experts model (its fusion weights), else None.
    """

    caption: str
    model: str
    confidence: float
    tokens: int
    water_type: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EngineInfo:
    """What ``describe`` returns: enough to tell which model answered and how it runs."""

    name: str
    version: str
    backend: str
    device: str
    dtype: str
    source: str
    parameters: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CaptionEngine(abc.ABC):
    """Interface every captioning backend implements.

    A concrete subclass that leaves an abstract method unimplemented is rejected when its class statement
    runs (at import), not at the first request. Pass ``abstract=True`` in the class statement for an
    intermediate base that is meant to stay abstract.
    """

    # The checkpoint folder the engine was loaded from, set by the one loader: what is saved beside its weights
    # (its router) is read from here. An ONNX export is shared by every folder with the same weights, so its own
    # folder cannot tell. None: ``describe().source`` is the checkpoint.
    checkpoint: Path | None = None

    def __init_subclass__(cls, abstract: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if abstract:
            return
        missing = sorted(name for name in dir(cls) if getattr(getattr(cls, name, None), "__isabstractmethod__", False))
        if missing:
            raise TypeError(f"{cls.__name__} must implement CaptionEngine methods: {', '.join(missing)}")

    @classmethod
    @abc.abstractmethod
    def load(cls, model: str, config: EngineConfig | None = None) -> CaptionEngine:
        """Resolve ``model`` (registry name, local directory or hub id) and load it."""

    @abc.abstractmethod
    def preprocess(self, images: Sequence[Image.Image]) -> Any:
        """Turn decoded RGB images into the backend's batch input. Thread-safe; no model state touched."""

    @abc.abstractmethod
    def generate(self, batch: Any, options: DecodeOptions) -> list[Caption]:
        """Caption a preprocessed batch, one :class:`Caption` per image, in order."""

    @abc.abstractmethod
    def describe(self) -> EngineInfo:
        """Name, version, backend, device and dtype of the loaded model."""

    def text_positions(self) -> int | None:
        """The text decoder's position embeddings (its ``max_position_embeddings``), or None when unknown.

        Backends override this; a decoding length past it would fail inside the model, so
        :meth:`check_options` refuses it first, as the request's fault rather than the model's."""
        return None

    def prompt_tokens(self, prompt: str) -> int:
        """Decoder input length of ``prompt``: [DEC] plus its tokens (backends with a tokenizer override this)."""
        return 1 + len(prompt.split())

    # ---- shared behaviour, not to be overridden ---------------------------------------------------

    def check_options(self, options: DecodeOptions) -> DecodeOptions:
        """``options`` validated, and checked against this model's text positions: :class:`InvalidOptionsError`
        naming the limit when ``max_length`` (``min_length`` is at most that) or the prompt does not fit."""
        options.validate()
        limit = self.text_positions()
        if limit is not None and options.max_length > limit:
            raise InvalidOptionsError(
                f"max_length {options.max_length} exceeds the model's {limit} text positions (max_length <= {limit})"
            )
        cache = self.__dict__.setdefault("_prompt_lengths", {})
        n = cache.get(options.prompt)
        if n is None:
            n = self.prompt_tokens(options.prompt)
            if len(cache) < 256:  # requests choose prompts: keep the memo bounded
                cache[options.prompt] = n
        if n >= options.max_length:
            raise InvalidOptionsError(
                f"the prompt takes {n} of max_length {options.max_length} tokens (prompt tokens < max_length"
                + (f" <= {limit}, the model's text positions)" if limit is not None else ")")
            )
        return options

    @property
    def limits(self) -> ImageLimits:
        return getattr(self, "config", EngineConfig()).limits

    def decode(self, source: ImageSource, name: str | None = None) -> Image.Image:
        """Decode one input with this engine's limits (raises a typed :class:`ImageError`)."""
        return load_image(source, self.limits, name=name)

    def caption(self, images: Sequence[ImageSource], options: DecodeOptions | None = None) -> list[Caption]:
        """Caption already-valid inputs as one batch. Raises on the first undecodable image."""
        options = self.check_options(options or DecodeOptions())
        if not images:
            return []
        decoded = [im if isinstance(im, Image.Image) and im.mode == "RGB" else self.decode(im) for im in images]
        captions = self.generate(self.preprocess(decoded), options)
        if len(captions) != len(decoded):
            raise RuntimeError(
                f"{type(self).__name__}.generate returned {len(captions)} captions for {len(decoded)} images"
            )
        return captions

    def close(self) -> None:  # noqa: B027 - optional hook, most engines hold nothing to release
        """Release resources held by the engine (sessions, GPU memory)."""


def strip_prompt(text: str, prompt: str) -> str:
    """Remove the decoder prompt from a decoded caption, as BLIP's own captioner does."""
    text = " ".join(text.split())
    if prompt:
        p = " ".join(prompt.lower().split())
        if text.lower().startswith(p):
            text = text[len(p) :]
    return text.strip()
