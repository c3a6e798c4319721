"""BLIP parameter groups (names per blip-facts.md), per-stage freezing and the per-stage lr schedule.

| group    | parameters                                                    |
|----------|---------------------------------------------------------------|
| vision   | ``vision_model.*``                                            |
| coupling | ``text_decoder.bert.encoder.layer.N.crossattention.*``        |
| decoder  | the rest of ``text_decoder.bert.*`` (embeddings, self-attn, MLP) |
| lm_head  | ``text_decoder.cls.*``                                        |

The LM head's output matrix is tied to the word embeddings: it is one tensor, listed once by
``named_parameters`` (under the embeddings), so it belongs to both ``decoder`` and ``lm_head`` and is trained
when either group is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from reefcap.models.errors import ReefcapError

from .config import GROUPS, StageConfig


def group_of(name: str) -> str:
    """The parameter group a (non-tied) parameter name belongs to."""
    if name.startswith("vision_model."):
        return "vision"
    if name.startswith("text_decoder.bert."):
        return "coupling" if ".crossattention." in name else "decoder"
    if name.startswith("text_decoder.cls."):
        return "lm_head"
    raise ReefcapError(f"parameter {name!r} belongs to no known BLIP parameter group")


def _tied_ids(model: torch.nn.Module) -> set[int]:
    """ids of tensors shared between the LM head and the word embeddings."""
    out_emb = model.text_decoder.get_output_embeddings() if hasattr(model, "text_decoder") else None
    in_emb = model.text_decoder.get_input_embeddings() if hasattr(model, "text_decoder") else None
    if out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight:
        return {id(in_emb.weight)}
    return set()


def parameter_groups(model: torch.nn.Module) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """Every parameter by its primary group (each tensor exactly once)."""
    groups: dict[str, list[tuple[str, torch.nn.Parameter]]] = {g: [] for g in GROUPS}
    for name, param in model.named_parameters():
        groups[group_of(name)].append((name, param))
    return groups


def apply_stage(model: torch.nn.Module, trainable: Iterable[str]) -> dict[str, int]:
    """Set ``requires_grad`` so that exactly the given groups train; returns trainable counts per group."""
    trainable = set(trainable)
    tied = _tied_ids(model)
    counts = dict.fromkeys(GROUPS, 0)
    for group, params in parameter_groups(model).items():
        for _, p in params:
            on = group in trainable or (id(p) in tied and bool(trainable & {"decoder", "lm_head"}))
            p.requires_grad_(on)
            if on:
                counts[group] += p.numel()
    return counts


def optimizer_groups(model: torch.nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """AdamW parameter groups over trainable tensors: no decay on biases, norms and embeddings (as BLIP)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "embeddings" in name else decay).append(p)
    return [
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
    ]


def schedule(stage: StageConfig, total: int):
    """lr multiplier per step: linear warmup, then cosine / linear decay to 0, or constant.

    Not ``transformers.get_scheduler``: its warmup starts at lr 0 and its linear decay rounds differently.
    """
    warm = int(round(stage.warmup * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        if stage.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if stage.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return factor
