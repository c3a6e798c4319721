"""PyTorch engine for GuiDG water-type experts (see :mod:`experts`): the experts graphs run eagerly, the decode
loop is the one the ONNX engine uses, so both backends give the same captions."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from reefcap.models.engines.base import Caption, DecodeOptions, EngineConfig
from reefcap.models.engines.experts import context_ids, experts_captions, load_experts
from reefcap.models.engines.experts_graphs import experts_decoder, experts_encoder
from reefcap.models.engines.torch_engine import TorchCaptionEngine
from reefcap.models.registry import ResolvedModel


def _setting(config: Any, name: str, default: Any) -> Any:
    value = getattr(config, name, None)
    return default if value is None else value


class TorchExpertsEngine(TorchCaptionEngine):
    """Captions with per-domain soft-prompt experts fused per image; each caption carries ``water_type``."""

    kind = "experts"

    def __init__(self, model: Any, processor: Any, resolved: ResolvedModel, config: EngineConfig) -> None:
        super().__init__(model, processor, resolved, config)
        self.head = load_experts(resolved.path, model).to(self.device, dtype=model.dtype)
        self.encoder = experts_encoder(model, self.head)
        self.decoder = experts_decoder(model, self.head)
        text = model.config.text_config
        self.experts = self.head.config
        self.labels = self.experts.labels
        self.ctx_ids = context_ids(text.vocab_size, len(self.labels), self.head.config.context)
        self.eos, self.pad, self.bos = text.sep_token_id, text.pad_token_id, text.bos_token_id

    def prompt_ids(self, prompt: str) -> list[int]:
        if not prompt:
            return [self.bos]
        return [self.bos, *self.processor.tokenizer(prompt)["input_ids"][1:-1]]

    @torch.inference_mode()
    def fuse(self, batch: torch.Tensor) -> tuple[np.ndarray, list[torch.Tensor]]:
        """Fusion weights ``(B, E)`` and the cross-attention keys/values of a preprocessed batch."""
        weights, *cross = self.encoder(batch.to(self.device, dtype=self.model.dtype))
        return weights.float().cpu().numpy(), cross

    @torch.inference_mode()
    def generate(self, batch: torch.Tensor, options: DecodeOptions) -> list[Caption]:
        weights, cross = self.fuse(batch)
        past: list[torch.Tensor] | None = None
        heads, dim = self.decoder.n_heads, self.model.config.text_config.hidden_size // self.decoder.n_heads

        def run(tokens: np.ndarray, beam_idx: np.ndarray) -> np.ndarray:
            nonlocal past
            if past is None:
                empty = torch.zeros(tokens.shape[0], heads, 0, dim, device=self.device, dtype=self.model.dtype)
                past = [empty] * (2 * self.decoder.n_layers)
            ids = torch.from_numpy(tokens).to(self.device)
            idx = torch.from_numpy(beam_idx).to(self.device)
            logits, *past = self.decoder(ids, idx, *past, *cross)
            return logits.float().cpu().numpy()

        gen = self.model.generation_config
        return experts_captions(
            self,
            run,
            weights,
            options,
            tokenizer=self.processor.tokenizer,
            name=self.resolved.name,
            length_penalty=_setting(gen, "length_penalty", 1.0),
            early_stopping=_setting(gen, "early_stopping", False),
        )

    def describe(self):
        info = super().describe()
        extra = sum(p.numel() for p in self.head.parameters())
        return info.__class__(**{**info.to_dict(), "parameters": (info.parameters or 0) + extra})
