"""PyTorch backend of the CaptionEngine: ``BlipForConditionalGeneration`` and its processor."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from reefcap.models.engines.base import Caption, CaptionEngine, DecodeOptions, EngineConfig, EngineInfo, strip_prompt
from reefcap.models.engines.manifests import checkpoint_kind, weights_version
from reefcap.models.engines.pixels import FastPixels
from reefcap.models.errors import ModelLoadError
from reefcap.models.registry import ResolvedModel, resolve_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` means CUDA when a GPU is visible, else CPU; anything else is passed to torch as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
    return dev


def load_blip(resolved: ResolvedModel, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load model and processor from a resolved checkpoint folder (safetensors only)."""
    from transformers import BlipForConditionalGeneration, BlipProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        # The PIL image backend is BLIP's reference preprocessing and needs no torchvision.
        processor = BlipProcessor.from_pretrained(resolved.path, backend="pil")
        model = BlipForConditionalGeneration.from_pretrained(resolved.path, use_safetensors=True, dtype=dtype)
    except Exception as exc:  # transformers raises many types for a broken folder
        raise ModelLoadError(f"{resolved.name}: cannot load BLIP checkpoint from {resolved.path}: {exc}") from None
    return model.eval(), processor


class TorchCaptionEngine(CaptionEngine):
    """Captions with the PyTorch BLIP model, batched, on CPU or CUDA, in fp32/bf16/fp16."""

    backend = "torch"
    kind = "blip"  # the checkpoint kind this class runs (see engines.backends)

    def __init__(self, model: Any, processor: Any, resolved: ResolvedModel, config: EngineConfig) -> None:
        self.model = model
        self.processor = processor
        self.resolved = resolved
        self.config = config
        self.device = next(model.parameters()).device
        self._version = weights_version(resolved.path)
        self.fast_pixels = FastPixels.for_processor(processor.image_processor)

    @classmethod
    def load(cls, model: str, config: EngineConfig | None = None) -> TorchCaptionEngine:
        """Load a checkpoint of this class's kind; ``dtype`` auto is fp32, ``threads`` (when set) become
        PyTorch's intra-op threads, which are per process. :func:`~.loader.load_engine` settles both."""
        config = config or EngineConfig()
        dtype = "fp32" if config.dtype == "auto" else config.dtype
        if dtype not in DTYPES:
            raise ModelLoadError(f"the torch backend runs {', '.join(DTYPES)}; got dtype {config.dtype!r}")
        resolved = resolve_model(model)
        found = checkpoint_kind(resolved.path)
        if found != cls.kind:
            raise ModelLoadError(
                f"{resolved.name} is a {found} checkpoint; {cls.__name__} loads {cls.kind} checkpoints "
                "(reefcap.models.load_engine picks the engine for each kind)"
            )
        if config.threads:
            torch.set_num_threads(config.threads)
        blip, processor = load_blip(resolved, DTYPES[dtype])
        config = dataclasses.replace(config, backend=cls.backend, dtype=dtype)
        return cls(blip.to(pick_device(config.device)), processor, resolved, config)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if self.fast_pixels is not None and self.fast_pixels.accepts(images):
            return torch.from_numpy(self.fast_pixels(images))  # bit-identical to the processor's output
        return self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    @torch.inference_mode()
    def generate(self, batch: torch.Tensor, options: DecodeOptions) -> list[Caption]:
        n = batch.shape[0]
        pixel_values = batch.to(self.device, dtype=self.model.dtype)
        prompt = self.processor.tokenizer([options.prompt] * n, return_tensors="pt") if options.prompt else None
        out = self.model.generate(
            pixel_values=pixel_values,
            input_ids=prompt["input_ids"].to(self.device) if prompt else None,
            attention_mask=prompt["attention_mask"].to(self.device) if prompt else None,
            num_beams=options.num_beams,
            max_length=options.max_length,
            min_length=options.min_length,
            repetition_penalty=options.repetition_penalty,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        # The decoder input is [DEC] + prompt words: the tokenizer's [CLS] becomes [DEC] and its [SEP] is dropped.
        prompt_len = prompt["input_ids"].shape[1] - 1 if prompt else 1
        confidences, lengths = self._confidence(out, prompt_len)
        texts = self.processor.tokenizer.batch_decode(out.sequences, skip_special_tokens=True)
        name = self.resolved.name
        return [
            Caption(caption=strip_prompt(t, options.prompt), model=name, confidence=c, tokens=k)
            for t, c, k in zip(texts, confidences, lengths, strict=True)
        ]

    def _confidence(self, out: Any, prompt_len: int) -> tuple[list[float], list[int]]:
        """Mean log-probability of each generated token up to and including EOS, from the raw logits."""
        scores = self.model.text_decoder.compute_transition_scores(
            out.sequences, out.logits, getattr(out, "beam_indices", None), normalize_logits=True
        ).float()
        # Beam search may run more steps than the kept beams' length: align scores and tokens.
        width = min(scores.shape[1], out.sequences.shape[1] - prompt_len)
        scores, generated = scores[:, :width], out.sequences[:, prompt_len : prompt_len + width]
        eos = self.model.config.text_config.sep_token_id
        # Positions after the first EOS are padding; the EOS itself counts (its probability is part of the caption).
        is_eos = (generated == eos).int()
        keep = ((is_eos.cumsum(dim=1) - is_eos) == 0) & torch.isfinite(scores)
        counts = keep.sum(dim=1).clamp(min=1)
        means = (scores.masked_fill(~keep, 0.0).sum(dim=1) / counts).tolist()
        return [round(m, 6) for m in means], keep.sum(dim=1).tolist()

    def text_positions(self) -> int | None:
        return getattr(self.model.config.text_config, "max_position_embeddings", None)

    def prompt_tokens(self, prompt: str) -> int:
        # [CLS] becomes [DEC] and the trailing [SEP] is dropped (see generate): the tokenizer's count minus one.
        return len(self.processor.tokenizer(prompt)["input_ids"]) - 1 if prompt else 1

    def describe(self) -> EngineInfo:
        return EngineInfo(
            name=self.resolved.name,
            version=self._version,
            backend=self.backend,
            device=str(self.device),
            dtype=self.config.dtype,
            source=str(self.resolved.path),
            parameters=sum(p.numel() for p in self.model.parameters()),
        )

    def close(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
