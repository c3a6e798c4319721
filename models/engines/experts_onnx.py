"""ONNX Runtime engine for GuiDG water-type experts (see :mod:`experts`).

The export (``onnx_export`` with an experts checkpoint) has the usual two graphs: the encoder also outputs the
fusion weights ``expert_weights (B, E)``, and the decoder's word-embedding table holds the experts' context
rows. Decoding is :func:`experts.decode_experts`, the same loop the torch engine uses.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reefcap.models.engines.base import Caption, DecodeOptions
from reefcap.models.engines.experts import ExpertsConfig, context_ids, experts_captions
from reefcap.models.engines.onnx_engine import OnnxCaptionEngine
from reefcap.models.engines.onnx_format import WEIGHTS_OUTPUT


class OnnxExpertsEngine(OnnxCaptionEngine):
    """Captions with per-domain soft-prompt experts fused per image; each caption carries ``water_type``."""

    kind = "experts"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.experts = experts = ExpertsConfig.from_dict(self.manifest["experts"])
        self.labels = experts.labels
        self.ctx_ids = context_ids(self.manifest["decoder"]["vocab_size"], len(self.labels), experts.context)

    def generate(self, batch: np.ndarray, options: DecodeOptions) -> list[Caption]:
        runner = self.runner
        cross = runner.encode(batch)
        weights = cross.pop(WEIGHTS_OUTPUT)
        weights = np.asarray(weights.numpy() if hasattr(weights, "numpy") else weights, dtype=np.float32)
        past: dict[str, Any] | None = None

        def run(tokens: np.ndarray, beam_idx: np.ndarray) -> np.ndarray:
            nonlocal past
            logits, past = runner.decode(tokens, beam_idx, past, cross)
            return logits

        gen = self.manifest.get("generation", {})
        return experts_captions(
            self,
            run,
            weights,
            options,
            tokenizer=self.tokenizer,
            name=self.name,
            length_penalty=gen.get("length_penalty", 1.0),
            early_stopping=gen.get("early_stopping", False),
        )
