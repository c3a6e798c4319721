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


def split_heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """``(B, T, H*D)`` -> ``(B, H, T, D)``."""
    b, t, _ = x.shape
    return x.view(b, t, n, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(R, H, T, D)`` -> ``(R, T, H*D)``."""
    r, h, t, d = x.shape
    return x.transpose(1, 2).reshape(r, t, h * d)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)) / (q.shape[-1] ** 0.5)
    if mask is not None:
        scores = scores + mask
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def cross_keys_values(layers: Any, image: torch.Tensor, n_heads: int) -> list[torch.Tensor]:
    """Every decoder layer's cross-attention key and value projections of the image tokens, in layer order."""
    out = []
    for layer in layers:
        att = layer.crossattention.self
        out += [split_heads(att.key(image), n_heads), split_heads(att.value(image), n_heads)]
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
        image's keys/values: (R, H, T, D) -> (B, H, R/B * T, D), no mask (every patch is visible)."""
        rows, images = h.shape[0], ck.shape[0]
        q = split_heads(layer.crossattention.self.query(h), self.n_heads)
        _, nh, t, d = q.shape
        q = q.reshape(images, -1, nh, t, d).transpose(1, 2).reshape(images, nh, -1, d)
        ctx = attend(q, ck, cv)
        ctx = ctx.reshape(images, nh, -1, t, d).transpose(1, 2).reshape(rows, nh, t, d)
        return layer.crossattention.output(merge_heads(ctx), h)

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
            k = torch.cat([past[2 * i].index_select(0, beam_idx), split_heads(sa.key(h), self.n_heads)], dim=2)
            v = torch.cat([past[2 * i + 1].index_select(0, beam_idx), split_heads(sa.value(h), self.n_heads)], dim=2)
            presents += [k, v]
            ctx = attend(split_heads(sa.query(h), self.n_heads), k, v, mask)
            h = layer.attention.output(merge_heads(ctx), h)
            h = self.cross(layer, h, cross[2 * i], cross[2 * i + 1])
            h = layer.output(layer.intermediate(h), h)
        logits = torch.matmul(self.head.transform(h[:, -1]), self.lm_weight) + self.head.decoder.bias
        return (logits, *presents)
