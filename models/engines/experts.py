"""GuiDG water-type experts for BLIP: per-domain soft prompts fused per image (Li et al. 2025, TL-UESTC/GuiDG).

An experts checkpoint is an ordinary BLIP folder plus two reefcap files:

- ``reefcap_experts.json``: the domains (labels, the Jerlov types each groups), the prompt length ``context``
  and the fusion's head count;
- ``reefcap_experts.safetensors``: ``prompts`` ``(E, K, H)``, one expert's K learned context vectors per domain
  (CoOp's analogue for a captioning decoder: inserted after ``[DEC]``, before the text prompt, base frozen),
  and the fusion module ``fusion.*`` (GuiDG's cross-modal attention).

Experts differ only in K embedding rows, so at inference every expert runs as an extra batch row of ONE
decoder: the rows of image ``b`` are ``b*E + e`` (times beams), and per token the experts' log-probabilities
are combined with the image's own fusion weights (never averaged over a batch, unlike the paper's
transductive test code), so a caption is the same whatever its batch mates. The fused weights are also the
estimated water type. Decoding reuses :mod:`onnx_decode` for both engines: torch and ONNX differ only in who
runs the two graphs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reefcap.models.engines.base import Caption, strip_prompt
from reefcap.models.engines.decoding import Decoded, beam_search, greedy, log_softmax

EXPERTS_CONFIG = "reefcap_experts.json"
EXPERTS_WEIGHTS = "reefcap_experts.safetensors"
IN_AIR = "in_air"


@dataclass(frozen=True)
class ExpertsConfig:
    """Which experts a checkpoint holds. ``domains`` maps each label to the Jerlov types it groups (in air: [])."""

    domains: Mapping[str, Sequence[str]] = field(default_factory=dict)
    context: int = 4
    heads: int = 4

    @property
    def labels(self) -> list[str]:
        return list(self.domains)

    def domain_of(self, metadata: Mapping[str, Any] | None) -> str | None:
        """The domain of an image from its ReefScenes metadata (``water_type``); no water type means in air."""
        water = (metadata or {}).get("water_type")
        if water is None:
            return IN_AIR if IN_AIR in self.domains else None
        for label, types in self.domains.items():
            if water in types:
                return label
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"domains": {k: list(v) for k, v in self.domains.items()}, "context": self.context, "heads": self.heads}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExpertsConfig:
        domains = {k: list(v) for k, v in data["domains"].items()}
        return cls(domains=domains, context=data["context"], heads=data["heads"])


def context_ids(vocab: int, experts: int, context: int) -> np.ndarray:
    """``(E, K)`` ids of each expert's context rows in the decoder's extended embedding table."""
    return vocab + np.arange(experts * context, dtype=np.int64).reshape(experts, context)


def context_positions(length: int, context: int) -> list[int]:
    """Position ids of ``[DEC]``, K context rows, then the text: the context shares position 0, so every text token
    keeps the position the frozen decoder learnt it at (shifting the caption by K cost the DAMF model 0.15 nats
    of validation loss that the experts never won back)."""
    return [max(0, i - context) for i in range(length)]


def is_experts(folder: str | Path) -> bool:
    """Whether a checkpoint folder holds water-type experts."""
    return (Path(folder) / EXPERTS_CONFIG).is_file()


def read_experts_config(folder: str | Path) -> ExpertsConfig:
    return ExpertsConfig.from_dict(json.loads((Path(folder) / EXPERTS_CONFIG).read_text()))


def water_type(weights: np.ndarray, labels: Sequence[str]) -> list[dict[str, Any]]:
    """Per image: the most probable domain and its fusion weight (``{"label", "probability"}``)."""
    best = weights.argmax(axis=1)
    return [{"label": labels[i], "probability": round(float(w[i]), 4)} for i, w in zip(best, weights, strict=True)]


def decode_experts(
    run: Callable[[np.ndarray, np.ndarray], np.ndarray],
    weights: np.ndarray,
    ctx_ids: np.ndarray,
    prompt: Sequence[int],
    options: Any,
    *,
    eos: int,
    pad: int,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
) -> Decoded:
    """Greedy or beam search where every row runs once per expert and the experts' next-token log-probabilities
    are combined with the row's image's weights.

    ``run(tokens, beam_idx)`` is the decoder step over ``R * E`` rows (``ctx_ids (E, K)``: the ids of each
    expert's context rows in the extended embedding table); ``weights (B, E)``. The decode loop only ever sees
    the text prompt, so ``max_length``/``min_length`` mean what they mean for a single model.
    """
    n, n_exp = weights.shape
    first = True

    def step(tokens: np.ndarray, beam_idx: np.ndarray) -> np.ndarray:
        nonlocal first
        rows = tokens.shape[0]
        if first:  # the prompt step: [DEC], the expert's context, then the text prompt
            per = [np.concatenate([t[:1], ctx_ids[e], t[1:]]) for t in tokens for e in range(n_exp)]
            tokens, first = np.stack(per), False
        else:
            tokens = np.repeat(tokens, n_exp, axis=0)
        idx = (beam_idx[:, None] * n_exp + np.arange(n_exp)[None, :]).reshape(-1)
        logits = run(tokens, idx).reshape(rows, n_exp, -1)
        w = np.repeat(weights, rows // n, axis=0)  # rows of one image (its beams) are contiguous
        return np.einsum("re,rev->rv", w, log_softmax(logits)).astype(np.float32)

    common = dict(
        max_length=options.max_length, min_length=options.min_length, repetition_penalty=options.repetition_penalty
    )
    if options.num_beams == 1:
        return greedy(step, prompt, n, eos=eos, pad=pad, **common)
    return beam_search(
        step,
        prompt,
        n,
        num_beams=options.num_beams,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        eos=eos,
        **common,
    )


def experts_captions(
    engine: Any,
    run: Callable[[np.ndarray, np.ndarray], np.ndarray],
    weights: np.ndarray,
    options: Any,
    *,
    tokenizer: Any,
    name: str,
    length_penalty: float,
    early_stopping: bool | str,
) -> list[Caption]:
    """:func:`decode_experts` for an experts engine (torch or ONNX: ``ctx_ids``, ``prompt_ids``, ``eos``, ``pad``,
    ``labels``), then its captions, each with the image's ``water_type``."""
    out = decode_experts(
        run,
        weights,
        engine.ctx_ids,
        engine.prompt_ids(options.prompt),
        options,
        eos=engine.eos,
        pad=engine.pad,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
    )
    texts = tokenizer.batch_decode(out.sequences, skip_special_tokens=True)
    waters = water_type(weights, engine.labels)
    return [
        Caption(strip_prompt(t, options.prompt), name, c, k, water_type=w)
        for t, c, k, w in zip(texts, out.confidences, out.lengths, waters, strict=True)
    ]


# ---- torch modules (torch imported inside, so engines that only read configs stay light) -----------------------


def modules():
    """``(CrossModalAttn, ExpertsHead)``: the fusion module and the experts' trainable parameters."""
    import torch
    from torch import nn

    class CrossModalAttn(nn.Module):
        """GuiDG's fusion: query = Linear(image feature); key of expert i = a learned attention pool over that
        expert's text features (its context vectors) then Linear; per head cosine similarity, softmax over
        experts, heads averaged. Inputs are detached: the fusion never moves the features it routes on."""

        def __init__(self, image_dim: int, text_dim: int, heads: int = 4, dim: int = 128) -> None:
            super().__init__()
            self.heads = heads
            self.query = nn.Linear(image_dim, dim)
            self.key = nn.Linear(text_dim, dim)
            self.pool = nn.Parameter(torch.zeros(text_dim))  # zeros: the pool starts as the mean
            self.logit_scale = nn.Parameter(torch.tensor(float(np.log(10.0))))

        def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
            """``image (B, D)``, ``text (E, K, H)`` -> weights ``(B, E)``, each row summing to 1."""
            image, text = image.detach(), text.detach()
            attn = torch.softmax(text @ self.pool, dim=1)  # (E, K)
            pooled = (attn[..., None] * text).sum(dim=1)  # (E, H)
            q = self.query(image).view(image.shape[0], self.heads, -1)
            k = self.key(pooled).view(pooled.shape[0], self.heads, -1)
            q = q / q.norm(dim=-1, keepdim=True).clamp(min=1e-6)
            k = k / k.norm(dim=-1, keepdim=True).clamp(min=1e-6)
            sim = torch.einsum("bhd,ehd->bhe", q, k) * self.logit_scale.exp()
            return torch.softmax(sim, dim=-1).mean(dim=1)

    class ExpertsHead(nn.Module):
        """The experts' context vectors and the fusion module (what ``reefcap_experts.safetensors`` holds)."""

        def __init__(self, config: ExpertsConfig, image_dim: int, text_dim: int, init: torch.Tensor | None = None):
            super().__init__()
            self.config = config
            n = len(config.domains)
            shape = (n, config.context, text_dim)
            self.prompts = nn.Parameter(init.clone() if init is not None else torch.randn(shape) * 0.02)
            self.fusion = CrossModalAttn(image_dim, text_dim, config.heads)

        def weights(self, image_tokens: torch.Tensor) -> torch.Tensor:
            """Fusion weights from the vision encoder's output ``(B, N, D)``: its mean token is the image feature
            (BLIP's captioner has no projected global embedding; the mean keeps the global colour cast)."""
            return self.fusion(image_tokens.mean(dim=1), self.prompts)

    return CrossModalAttn, ExpertsHead


def init_prompts(word_embeddings: Any, tokenizer: Any, config: ExpertsConfig, text: str = "in the water") -> Any:
    """Context vectors initialised from the embeddings of real words (CoOp's "a photo of" init), repeated."""
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"] or [tokenizer.unk_token_id]
    rows = [ids[i % len(ids)] for i in range(config.context)]
    base = word_embeddings.weight.detach()[torch.tensor(rows)]
    return base[None].repeat(len(config.domains), 1, 1)


def save_experts(folder: str | Path, head: Any) -> None:
    """Write the experts' config and weights (safetensors) into a checkpoint folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(state, str(folder / EXPERTS_WEIGHTS))
    (folder / EXPERTS_CONFIG).write_text(json.dumps(head.config.to_dict(), indent=2) + "\n")


def load_experts(folder: str | Path, blip: Any) -> Any:
    """The :class:`ExpertsHead` saved in ``folder`` for the loaded ``blip`` (safetensors only)."""
    from safetensors.torch import load_file

    from reefcap.models.errors import ModelLoadError

    config = read_experts_config(folder)
    _, ExpertsHead = modules()
    head = ExpertsHead(config, blip.config.vision_config.hidden_size, blip.config.text_config.hidden_size)
    try:
        head.load_state_dict(load_file(str(Path(folder) / EXPERTS_WEIGHTS)))
    except Exception as exc:  # safetensors and torch raise their own types for a broken or mismatched file
        raise ModelLoadError(f"{folder}: cannot load {EXPERTS_WEIGHTS}: {exc}") from None
    return head.eval()
