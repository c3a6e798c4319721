"""Caption pre-processing and BLIP decoder targets, as the original BLIP builds them.

``forward()`` of the HF model shifts the labels itself; what it does not do is put the decoder BOS
(``[DEC]``) at position 0 and mask the prompt and padding positions to -100: that is done here.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import torch

from reefcap.models.engines.base import BLIP_PROMPT

IGNORE = -100
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def preprocess_caption(text: str, max_words: int = 30) -> str:
    """Lower case, punctuation replaced by spaces, whitespace collapsed, at most ``max_words`` words."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(words[:max_words])


def prompt_length(tokenizer, prompt: str = BLIP_PROMPT) -> int:
    """Tokens the prompt occupies at the start of every sequence, BOS included (4 for BLIP-base)."""
    return 1 + len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def build_targets(
    tokenizer, captions: Sequence[str], prompt: str = BLIP_PROMPT, max_words: int = 30, max_len: int = 40
) -> dict[str, torch.Tensor]:
    """Decoder ``input_ids``, ``attention_mask`` and ``labels`` for a batch of raw captions."""
    texts = [f"{prompt} {preprocess_caption(c, max_words)}".strip() for c in captions]
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    input_ids = enc["input_ids"].clone()
    input_ids[:, 0] = tokenizer.bos_token_id
    labels = input_ids.masked_fill(enc["attention_mask"] == 0, IGNORE)
    labels[:, : prompt_length(tokenizer, prompt)] = IGNORE
    return {"input_ids": input_ids, "attention_mask": enc["attention_mask"], "labels": labels}
