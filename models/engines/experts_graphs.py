"""The two graphs of a water-type experts model, as torch modules that run eagerly (torch engine) or export (ONNX).

- :class:`ExpertsEncoder`: the vision transformer once per image, the fusion weights ``(B, E)`` from it, and
  every decoder layer's cross-attention keys/values (as :class:`~.graphs.EncoderGraph`).
- :func:`experts_decoder`: :class:`~.graphs.DecoderGraph` with the word-embedding table extended by the
  experts' context vectors (ids ``vocab + e*K + j``, :func:`~.experts.context_ids`); the LM head keeps the real
  vocabulary, so a context row can never be generated. The context rows share ``[DEC]``'s position 0 and the
  text keeps its own positions (see :func:`reefcap.models.engines.experts.context_positions`).

This module imports torch; import it only where torch is needed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from reefcap.models.engines.graphs import DecoderGraph, cross_keys_values


class ExpertsEncoder(nn.Module):
    """Image -> (fusion weights, every layer's cross keys/values)."""

    def __init__(self, blip: Any, head: Any) -> None:
        super().__init__()
        self.vision = blip.vision_model
        self.layers = blip.text_decoder.bert.encoder.layer
        self.n_heads = blip.config.text_config.num_attention_heads
        self.head = head

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        image = self.vision(pixel_values=pixel_values).last_hidden_state
        return (self.head.weights(image), *cross_keys_values(self.layers, image, self.n_heads))


class ExpertsEmbeddings(nn.Module):
    """The decoder's embeddings with the experts' context vectors appended as extra word rows."""

    def __init__(self, base: Any, head: Any) -> None:
        super().__init__()
        table = torch.cat([base.word_embeddings.weight.detach(), head.prompts.detach().flatten(0, 1)])
        self.word_embeddings = nn.Embedding.from_pretrained(table, freeze=True)
        self.position_embeddings = base.position_embeddings
        self.LayerNorm = base.LayerNorm


def experts_encoder(blip: Any, head: Any) -> ExpertsEncoder:
    return ExpertsEncoder(blip, head).eval()


def experts_decoder(blip: Any, head: Any) -> DecoderGraph:
    decoder = DecoderGraph(blip)
    decoder.embeddings = ExpertsEmbeddings(blip.text_decoder.bert.embeddings, head)
    decoder.context = head.config.context
    return decoder.eval()
