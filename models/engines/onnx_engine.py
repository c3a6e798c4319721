"""ONNX Runtime backend of the CaptionEngine: the exported encoder + KV-cached decoder (see :mod:`.graphs`).

``dtype`` picks the export: ``fp32`` (CPU or CUDA), ``int8`` (dynamic quantisation, for CPUs) or ``fp16`` (for
the CUDA execution provider). A checkpoint is exported on first use and cached
(:func:`reefcap.models.export.onnx.cached_export`);
an export folder can also be passed directly as the model. Inference needs numpy, onnxruntime and the
tokenizer/image processor from transformers, but no torch.

On CUDA the engine uses I/O binding: the image's cross-attention keys/values and the growing self-attention
cache stay on the GPU between steps (beam reordering happens inside the decoder graph), and only the last
position's logits come back to the host for token selection.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from reefcap.models.engines.base import Caption, CaptionEngine, DecodeOptions, EngineConfig, EngineInfo, strip_prompt
from reefcap.models.engines.decoding import beam_search, greedy
from reefcap.models.engines.devices import ort_device
from reefcap.models.engines.onnx_format import DECODER, ENCODER, INT8_SCHEME, PRECISIONS, is_export, read_manifest
from reefcap.models.engines.pixels import FastPixels
from reefcap.models.engines.precision import serving_dtype
from reefcap.models.errors import ModelLoadError
from reefcap.models.registry import resolve_model

log = logging.getLogger("reefcap.models")


class _Runner:
    """Runs the two graphs on the CPU execution provider. Stateless: callers hold the caches, so one runner
    serves concurrent ``generate`` calls (ONNX Runtime sessions may be run from several threads)."""

    def __init__(self, folder: Path, manifest: dict[str, Any], threads: int, providers: list[Any]) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # 0 lets ORT use one thread per physical core; a server running several engines should set fewer.
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:
            self.encoder = ort.InferenceSession(str(folder / ENCODER), opts, providers=providers)
            self.decoder = ort.InferenceSession(str(folder / DECODER), opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
            raise ModelLoadError(f"{folder}: onnxruntime cannot load the export: {exc}") from None
        dec = manifest["decoder"]
        self.kv_shape = (dec["heads"], dec["head_dim"])
        inputs = {i.name: i.type for i in self.decoder.get_inputs()}
        self.past_names = [name for name in inputs if name.startswith("past_")]
        self.cross_names = [o.name for o in self.encoder.get_outputs()]
        self.output_names = [o.name for o in self.decoder.get_outputs()]
        self.kv_dtype = np.float16 if inputs[self.past_names[0]] == "tensor(float16)" else np.float32

    def empty_past(self, rows: int) -> dict[str, np.ndarray]:
        heads, head_dim = self.kv_shape
        return {name: np.zeros((rows, heads, 0, head_dim), self.kv_dtype) for name in self.past_names}

    def encode(self, pixels: np.ndarray) -> dict[str, Any]:
        """A batch of images' cross-attention keys/values, computed once for all decoding steps."""
        return dict(zip(self.cross_names, self.encoder.run(None, {"pixel_values": pixels}), strict=True))

    def decode(
        self, tokens: np.ndarray, beam_idx: np.ndarray, past: dict[str, Any] | None, cross: dict[str, Any]
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """One decoder step: last-position logits (float32, on the host) and the grown cache."""
        past = past if past is not None else self.empty_past(tokens.shape[0])
        feed = {"input_ids": tokens.astype(np.int64), "beam_idx": beam_idx.astype(np.int64), **past, **cross}
        logits, *present = self.decoder.run(self.output_names, feed)
        return np.asarray(logits, dtype=np.float32), dict(zip(self.past_names, present, strict=True))


class _BoundRunner(_Runner):
    """I/O binding: the caches stay on the device as OrtValues between steps (used with the CUDA provider;
    ``device_type="cpu"`` runs the same code on the CPU provider, which is how the tests cover it without a GPU)."""

    def __init__(self, folder: Path, manifest: dict[str, Any], threads: int, device_type: str, device_id: int) -> None:
        providers: list[Any] = ["CPUExecutionProvider"]
        if device_type == "cuda":
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        super().__init__(folder, manifest, threads, providers)
        self.device_type, self.device_id = device_type, device_id

    def encode(self, pixels: np.ndarray) -> dict[str, Any]:
        binding = self.encoder.io_binding()
        binding.bind_cpu_input("pixel_values", np.ascontiguousarray(pixels, dtype=np.float32))
        for name in self.cross_names:
            binding.bind_output(name, self.device_type, self.device_id)
        self.encoder.run_with_iobinding(binding)
        return dict(zip(self.cross_names, binding.get_outputs(), strict=True))

    def decode(
        self, tokens: np.ndarray, beam_idx: np.ndarray, past: dict[str, Any] | None, cross: dict[str, Any]
    ) -> tuple[np.ndarray, dict[str, Any]]:
        binding = self.decoder.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(tokens, dtype=np.int64))
        binding.bind_cpu_input("beam_idx", np.ascontiguousarray(beam_idx, dtype=np.int64))
        if past is None:
            for name, value in self.empty_past(tokens.shape[0]).items():
                binding.bind_cpu_input(name, value)
        else:
            for name, value in past.items():
                binding.bind_ortvalue_input(name, value)
        for name, value in cross.items():
            binding.bind_ortvalue_input(name, value)
        # Logits go to the host for token selection; the new cache stays on the GPU.
        for name in self.output_names:
            if name == "logits":
                binding.bind_output(name, "cpu")
            else:
                binding.bind_output(name, self.device_type, self.device_id)
        self.decoder.run_with_iobinding(binding)
        logits, *present = binding.get_outputs()
        return np.asarray(logits.numpy(), dtype=np.float32), dict(zip(self.past_names, present, strict=True))


def _export_folder(model: str, precision: str) -> Path:
    """``model`` itself when it is an export folder, else its export at ``precision``, made on first use."""
    if is_export(Path(model).expanduser()):
        return Path(model).expanduser()
    from reefcap.models.export.onnx import cached_export  # the exporter (and torch) only when an export is due

    return cached_export(model, precision)


class OnnxCaptionEngine(CaptionEngine):
    """Captions with ONNX Runtime: batched greedy and beam search over the exported KV-cached decoder."""

    backend = "onnx"
    kind = "blip"  # the checkpoint kind this class runs (see engines.backends)

    def __init__(
        self,
        folder: Path,
        manifest: dict[str, Any],
        config: EngineConfig,
        device: str,
        threads: int,
        name: str | None = None,
    ) -> None:
        """``name``: the model's own name (what it was loaded as); default the export's source checkpoint name."""
        from transformers import AutoTokenizer
        from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.folder, self.manifest, self.config = folder, manifest, config
        # An export cache entry is shared by every folder with the same weights: the name is the loaded model's.
        self.name = name or manifest["source"]["name"]
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.image_processor = BlipImageProcessorPil.from_pretrained(folder)
        self.fast_pixels = FastPixels.for_processor(self.image_processor)
        kind, _, index = device.partition(":")
        self.device = device
        self.runner = (
            _BoundRunner(folder, manifest, threads, "cuda", int(index or 0))
            if kind == "cuda"
            else _Runner(folder, manifest, threads, ["CPUExecutionProvider"])
        )
        dec = manifest["decoder"]
        self.eos, self.pad, self.bos = dec["eos_token_id"], dec["pad_token_id"], dec["bos_token_id"]

    @classmethod
    def load(cls, model: str, config: EngineConfig | None = None) -> OnnxCaptionEngine:
        """Load an export folder, or export ``model`` (zoo name, checkpoint dir, hub id) on first use.

        ``dtype`` auto follows the stored int8 agreement (:func:`~.precision.serving_dtype`); ``threads`` are ORT's
        intra-op threads (0: ORT's own choice, one per core). :func:`~.loader.load_engine` settles both.
        """
        config = config or EngineConfig()
        if config.dtype == "auto":
            config = dataclasses.replace(config, dtype=serving_dtype(model, cls.backend, config.device)[0])
        if config.dtype not in PRECISIONS:
            raise ModelLoadError(f"the onnx backend runs {', '.join(PRECISIONS)}; got dtype {config.dtype!r}")
        kind, index = ort_device(config.device)
        folder = _export_folder(model, config.dtype)
        manifest = read_manifest(folder)
        if manifest["precision"] != config.dtype and config.dtype != "fp32":
            raise ModelLoadError(f"{folder} holds a {manifest['precision']} export, but dtype {config.dtype} was asked")
        if manifest["precision"] == "int8" and manifest.get("int8_scheme") != INT8_SCHEME:
            log.warning(
                "%s: int8 export with 8-bit weights (made by an older reefcap): its captions may differ from fp32 on "
                "CPUs without AVX-512 VNNI; export it again (reefcap export --precision int8)",
                folder,
            )
        found = "experts" if manifest.get("experts") else "blip"
        if found != cls.kind:
            raise ModelLoadError(
                f"{folder} is a {found} export; {cls.__name__} loads {cls.kind} exports "
                "(reefcap.models.load_engine picks the engine for each kind)"
            )
        device = f"{kind}:{index}" if kind == "cuda" else "cpu"
        config = dataclasses.replace(config, backend=cls.backend, dtype=manifest["precision"])
        name = None if is_export(Path(model).expanduser()) else resolve_model(model).name
        return cls(folder, manifest, config, device, config.threads, name)

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        if self.fast_pixels is not None and self.fast_pixels.accepts(images):
            return self.fast_pixels(images)  # bit-identical to the processor, a batch at a time
        return self.image_processor(images=list(images), return_tensors="np")["pixel_values"].astype(np.float32)

    def prompt_ids(self, prompt: str) -> list[int]:
        """[DEC] followed by the prompt's tokens, as BLIP's ``generate`` builds the decoder input."""
        if not prompt:
            return [self.bos]
        ids = self.tokenizer(prompt)["input_ids"]
        return [self.bos, *ids[1:-1]]  # [CLS] -> [DEC], trailing [SEP] dropped

    def text_positions(self) -> int | None:
        return self.manifest["decoder"].get("max_positions")

    def prompt_tokens(self, prompt: str) -> int:
        return len(self.prompt_ids(prompt))

    def generate(self, batch: np.ndarray, options: DecodeOptions) -> list[Caption]:
        n = batch.shape[0]
        prompt = self.prompt_ids(options.prompt)
        common = dict(
            max_length=options.max_length,
            min_length=options.min_length,
            repetition_penalty=options.repetition_penalty,
            eos=self.eos,
        )
        runner = self.runner
        cross = runner.encode(batch)
        past: dict[str, Any] | None = None
        rows = n

        def step(tokens: np.ndarray, beam_idx: np.ndarray) -> np.ndarray:
            nonlocal past, cross, rows
            if len(beam_idx) < rows:  # greedy dropped finished rows: their images' keys/values go too
                cross = {name: np.take(value, beam_idx, axis=0) for name, value in cross.items()}
                rows = len(beam_idx)
            logits, past = runner.decode(tokens, beam_idx, past, cross)
            return logits

        if options.num_beams == 1:
            # Finished rows leave the batch on the CPU (host arrays); the GPU runner's caches stay on the device.
            compact = not isinstance(runner, _BoundRunner)
            out = greedy(step, prompt, n, pad=self.pad, compact=compact, **common)
        else:
            gen = self.manifest.get("generation", {})
            out = beam_search(
                step,
                prompt,
                n,
                num_beams=options.num_beams,
                length_penalty=gen.get("length_penalty", 1.0),
                early_stopping=gen.get("early_stopping", False),
                **common,
            )
        texts = self.tokenizer.batch_decode(out.sequences, skip_special_tokens=True)
        name = self.name
        return [
            Caption(caption=strip_prompt(t, options.prompt), model=name, confidence=c, tokens=k)
            for t, c, k in zip(texts, out.confidences, out.lengths, strict=True)
        ]

    def describe(self) -> EngineInfo:
        return EngineInfo(
            name=self.name,
            version=self.manifest["weights_version"],
            backend=self.backend,
            device=self.device,
            dtype=self.manifest["precision"],
            source=str(self.folder),
            parameters=self.manifest.get("parameters"),
        )

    def close(self) -> None:
        self.runner = None
