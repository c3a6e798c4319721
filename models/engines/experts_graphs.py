"""The two graphs of an experts model, as torch modules that run eagerly (torch engine) or export (ONNX).

- :func:`experts_encoder`: the vision transformer once per image, the fusion weights ``(B, E)`` from it, and
  every decoder layer's cross-attention keys/values (as ``onnx_export``'s encoder).
- :func:`experts_decoder`: ``onnx_export``'s KV-cached decoder with the word-embedding table extended by the
  experts' context vectors (ids ``vocab + e*K + j``); the LM head keeps the real vocabulary, so a context row
  can never be generated. The context rows share ``[DEC]``'s position 0 and the text keeps its own positions
  (see :func:`reefcap.models.engines.experts.context_positions`).
"""

from __future__ import annotations

from typing import Any

WEIGHTS_OUTPUT = "expert_weights"


def context_ids(vocab: int, experts: int, context: int):
    """``(E, K)`` ids of each expert's context rows in the extended embedding table."""
    import numpy as np

    return vocab + np.arange(experts * context, dtype=np.int64).reshape(experts, context)


def experts_encoder(blip: Any, head: Any):
    import torch
    from torch import nn

    class ExpertsEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vision = blip.vision_model
            self.layers = blip.text_decoder.bert.encoder.layer
            self.n_heads = blip.config.text_config.num_attention_heads
            self.head = head

        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
            image = self.vision(pixel_values=pixel_values).last_hidden_state
            b, t, _ = image.shape
            out = [self.head.weights(image)]
            for layer in self.layers:
                att = layer.crossattention.self
                for proj in (att.key, att.value):
                    out.append(proj(image).view(b, t, self.n_heads, -1).transpose(1, 2))
            return tuple(out)

    return ExpertsEncoder().eval()


def experts_decoder(blip: Any, head: Any):
    import torch
    from torch import nn

    from reefcap.models.export.onnx import _wrappers

    _, Decoder = _wrappers()
    decoder = Decoder(blip)
    base = blip.text_decoder.bert.embeddings

    class Embeddings(nn.Module):
        """The decoder's embeddings with the experts' context vectors appended as extra word rows."""

        def __init__(self) -> None:
            super().__init__()
            table = torch.cat([base.word_embeddings.weight.detach(), head.prompts.detach().flatten(0, 1)])
            self.word_embeddings = nn.Embedding.from_pretrained(table, freeze=True)
            self.position_embeddings = base.position_embeddings
            self.LayerNorm = base.LayerNorm

    decoder.embeddings = Embeddings()
    decoder.context = head.config.context
    return decoder.eval()
