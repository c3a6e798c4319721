"""BLIP's captioner as two graphs with the decoder cache as plain tensors: run eagerly by the torch experts
engine, traced to ONNX by :mod:`reefcap.models.export`.

Hugging Face optimum refuses BLIP (its issue 1818), and transformers 5.x keeps the decoder cache in ``Cache``
objects that no exporter can trace, so both graphs are small modules that reuse the checkpoint's own
submodules:

- :class:`EncoderGraph`: ``pixel_values (B, 3, S, S)`` -> ``cross_key_i``/``cross_value_i (B, heads, N,
  head_dim)`` for every decoder layer: the image's cross-attention keys and values, once per image.
- :class:`DecoderGraph`: one step for the prompt and every later token. ``input_ids (R, T)``, ``beam_idx (R,)``
  (which cached row each new row continues: beam reordering happens in-graph, so the cache never leaves the
  device), ``past_key_i``/``past_value_i (R, heads, P, head_dim)`` (P = 0 on the first step) and the cross
  keys/values -> ``logits (R, vocab)`` of the last position and ``present_key_i``/``present_value_i``. R may be
  a multiple of B (beam search): the beams of one image share its cross keys/values without copies.

This module imports torch; import it only where torch is needed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _KeepReshape(torch.autograd.Function):
    """``x.reshape(shape)`` where a 0 keeps ``x``'s size in that dimension (ONNX Reshape's own rule; torch's ONNX
    shape inference also wants one -1), exported as one Reshape with a constant shape.

    Traced sizes (``x.view(b, t, n, -1)``) export as a chain of Shape, Gather, Unsqueeze and Concat nodes per
    reshape: they were half the decoder's nodes, and ORT pays about a microsecond per node per decoding step
    whatever the batch."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return x.reshape([x.shape[i] if s == 0 else s for i, s in enumerate(shape)])

    @staticmethod
    def symbolic(g: Any, x: Any, shape: tuple[int, ...]) -> Any:
        return g.op("Reshape", x, g.op("Constant", value_t=torch.tensor(shape, dtype=torch.int64)))


class _FoldRows(torch.autograd.Function):
    """``x.reshape(ref.shape[0], -1, *tail)``: rows folded onto the first dimension of ``ref`` (three nodes)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, ref: torch.Tensor, tail: tuple[int, ...]) -> torch.Tensor:
        return x.reshape(ref.shape[0], -1, *tail)

    @staticmethod
    def symbolic(g: Any, x: Any, ref: Any, tail: tuple[int, ...]) -> Any:
        first = g.op("Shape", ref, start_i=0, end_i=1)
        rest = g.op("Constant", value_t=torch.tensor((-1, *tail), dtype=torch.int64))
        return g.op("Reshape", x, g.op("Concat", first, rest, axis_i=0))


# Sizes read off a tensor while tracing are traced values, which an autograd.Function cannot take as constants:
# the head count and width come from the config as plain ints.
def split_heads(x: torch.Tensor, n: int, d: int) -> torch.Tensor:
    """``(B, T, n*d)`` -> ``(B, n, T, d)``."""
    return _KeepReshape.apply(x, (0, -1, n, d)).transpose(1, 2)


def merge_heads(x: torch.Tensor, width: int) -> torch.Tensor:
    """``(R, H, T, D)`` -> ``(R, T, width)`` (width = H*D)."""
    return _KeepReshape.apply(x.transpose(1, 2), (0, -1, width))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention over heads of width ``d`` (a constant: read off ``q`` it would be traced)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / (d**0.5)
    if mask is not None:
        scores = scores + mask
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def cross_keys_values(layers: Any, image: torch.Tensor, n_heads: int) -> list[torch.Tensor]:
    """Every decoder layer's cross-attention key and value projections of the image tokens, in layer order."""
    out = []
    for layer in layers:
        att = layer.crossattention.self
        d = att.attention_head_size
        out += [split_heads(att.key(image), n_heads, d), split_heads(att.value(image), n_heads, d)]
    return out


class EncoderGraph(nn.Module):
    """Vision transformer, then every decoder layer's cross-attention key/value projections of its output."""

    def __init__(self, blip: Any) -> None:
        super().__init__()
        self.vision = blip.vision_model
        self.layers = blip.text_decoder.bert.encoder.layer
        self.n_heads = blip.config.text_config.num_attention_heads

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        image = self.vision(pixel_values=pixel_values).last_hidden_state
        return tuple(cross_keys_values(self.layers, image, self.n_heads))


class DecoderGraph(nn.Module):
    """BLIP's text decoder with the cache as explicit tensors; returns only the last position's logits."""

    def __init__(self, blip: Any) -> None:
        super().__init__()
        text = blip.text_decoder
        self.embeddings = text.bert.embeddings
        self.layers = text.bert.encoder.layer
        self.head = text.cls.predictions
        # The LM head shares its weight with the word embeddings. The exporter merges identical initializers,
        # so a transposed copy keeps int8 quantisation of the head's matmul from rewriting the initializer the
        # embedding lookup reads.
        self.lm_weight = nn.Parameter(self.head.decoder.weight.detach().t().contiguous(), requires_grad=False)
        self.n_heads = blip.config.text_config.num_attention_heads
        self.n_layers = len(self.layers)
        self.context = 0  # water-type experts: K context rows after [DEC] that take no position (experts_graphs)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        emb = self.embeddings
        at = (positions - self.context).clamp(min=0) if self.context else positions
        return emb.LayerNorm(emb.word_embeddings(input_ids) + emb.position_embeddings(at)[None])

    def cross(self, layer: Any, h: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor) -> torch.Tensor:
        """Cross-attention: rows of one image (its beams) are folded into the query length so they share the
        image's keys/values: (R, T, H*D) -> (B, H, R/B * T, D), no mask (every patch is visible)."""
        att = layer.crossattention.self
        d = att.attention_head_size
        # (R, T, H*D) in row-major order is (B, R/B * T, H, D): one reshape, keyed on the image count.
        q = _FoldRows.apply(att.query(h), ck, (self.n_heads, d)).transpose(1, 2)
        ctx = attend(q, ck, cv, d).transpose(1, 2)  # (B, R/B * T, H, D): the order of h's (R, T, H*D) again
        return layer.crossattention.output(ctx.reshape_as(h), h)

    def forward(self, input_ids, beam_idx, *cache):
        past, cross = cache[: 2 * self.n_layers], cache[2 * self.n_layers :]
        start = past[0].shape[2]
        positions = torch.arange(input_ids.shape[1], device=input_ids.device) + start
        h = self.embed(input_ids, positions)
        # Causal mask over [cache, new tokens]: query i (at position start+i) sees keys 0..start+i.
        keys = torch.arange(start + input_ids.shape[1], device=input_ids.device)
        mask = (keys[None, :] > positions[:, None]).to(h.dtype) * torch.finfo(h.dtype).min
        presents = []
        for i, layer in enumerate(self.layers):
            sa = layer.attention.self
            n, d = self.n_heads, sa.attention_head_size
            k = torch.cat([past[2 * i].index_select(0, beam_idx), split_heads(sa.key(h), n, d)], dim=2)
            v = torch.cat([past[2 * i + 1].index_select(0, beam_idx), split_heads(sa.value(h), n, d)], dim=2)
            presents += [k, v]
            ctx = attend(split_heads(sa.query(h), n, d), k, v, d, mask)
            h = layer.attention.output(merge_heads(ctx, n * d), h)
            h = self.cross(layer, h, cross[2 * i], cross[2 * i + 1])
            h = layer.output(layer.intermediate(h), h)
        logits = torch.matmul(self.head.transform(h[:, -1]), self.lm_weight) + self.head.decoder.bias
        return (logits, *presents)
