"""GuiDG training for BLIP (recipe ``guidg``): water-type soft-prompt experts, then their per-image fusion.

- Stage 1 (``groups: [prompts]``): one expert per domain, K context vectors inserted after ``[DEC]``, trained on
  its domain's images with the whole BLIP frozen. All experts train in one pass: each row of a batch uses its
  own domain's expert, and the experts share no parameters, so each sees only its domain's gradients.
- Stage 2 (``groups: [vision, fusion]``): the cross-modal attention and the vision encoder train on data held
  out from stage 1 (``holdout`` of each domain's scenes) with GuiDG's loss ``sum_i w_i * loss_i`` per image
  (``loss_i`` = the caption loss under expert ``i``), AdamW, cosine.

The result is a BLIP checkpoint folder with the experts beside it (:mod:`reefcap.models.engines.experts`), written
to ``OUT/best`` and ``OUT/last`` (the same model: the end of stage 2; with ``select_on_val`` each expert is its
best stage-1 state on its domain's ``--val`` loss), with
``log.jsonl`` and ``reefcap_train.json`` like every run.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reefcap.models.engines.experts import ExpertsConfig, init_prompts, modules, save_experts
from reefcap.models.engines.torch_engine import load_blip
from reefcap.models.errors import ReefcapError
from reefcap.models.registry import resolve_model

from .augment import TrainTransform
from .config import Recipe, StageConfig, TrainConfig, write_checkpoint
from .data import CaptionBatches
from .labels import IGNORE
from .params import schedule


def split_domains(records: list, config: ExpertsConfig, holdout: float, seed: int) -> tuple[list, list]:
    """``(expert_part, holdout_part)``: records with a known domain, split per scene (so no scene is in both)."""
    expert, held = [], []
    for rec in records:
        domain = config.domain_of(rec.metadata)
        if domain is None:
            continue
        scene = (rec.metadata or {}).get("scene_id", rec.image_id)
        draw = np.random.default_rng([seed, zlib.crc32(str(scene).encode())]).random()
        (held if draw < holdout else expert).append(rec)
    return expert, held


def with_context(decoder: Any, input_ids, attention_mask, labels, ctx):
    """Decoder inputs with each row's context vectors ``ctx (R, K, H)`` inserted after ``[DEC]``, and their
    position ids (:func:`~reefcap.models.engines.experts.context_positions`)."""
    words = decoder.get_input_embeddings()(input_ids)
    rows, k = ctx.shape[0], ctx.shape[1]
    embeds = torch.cat([words[:, :1], ctx.to(words.dtype), words[:, 1:]], dim=1)
    ones = attention_mask.new_ones(rows, k)
    mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
    ignore = labels.new_full((rows, k), IGNORE)
    positions = (torch.arange(embeds.shape[1]) - k).clamp(min=0)[None].expand(rows, -1)
    return embeds, mask, torch.cat([labels[:, :1], ignore, labels[:, 1:]], dim=1), positions


def expert_losses(blip, head, image, batch, experts: torch.Tensor) -> torch.Tensor:
    """Per row, the mean token caption loss of caption ``r`` on image ``r`` under expert ``experts[r]``."""
    embeds, mask, labels, positions = with_context(
        blip.text_decoder, batch["input_ids"], batch["attention_mask"], batch["labels"], head.prompts[experts]
    )
    out = blip.text_decoder(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=positions,
        encoder_hidden_states=image,
        labels=labels,
        reduction="none",
    )
    tokens = (labels[:, 1:] != IGNORE).sum(dim=1).clamp(min=1)
    return out.loss / tokens


def guidg_step(blip, head, batch, route_weight: float, domains: torch.Tensor | None = None):
    """Stage 2 loss: ``sum_i w_i * loss_i`` per image, averaged; plus optional routing cross-entropy."""
    n_exp = head.prompts.shape[0]
    image = blip.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
    weights = head.weights(image)  # (B, E)
    rows = {k: v.repeat_interleave(n_exp, dim=0) for k, v in batch.items() if k != "pixel_values"}
    experts = torch.arange(n_exp).repeat(image.shape[0])
    losses = expert_losses(blip, head, image.repeat_interleave(n_exp, dim=0), rows, experts)
    loss = (weights * losses.view(-1, n_exp)).sum(dim=1).mean()
    if route_weight > 0 and domains is not None:
        loss = loss + route_weight * torch.nn.functional.nll_loss(weights.clamp(min=1e-8).log(), domains)
    return loss, weights


class ExpertsTrainer:
    """Runs the ``guidg`` recipe (see the module docstring) from a start checkpoint."""

    def __init__(
        self,
        model: str,
        recipe: Recipe,
        config: TrainConfig,
        out: str | Path,
        train: list,
        air: list | None,
        val: list | None = None,
    ):
        if recipe.experts is None or len(recipe.stages) != 2:
            raise ReefcapError(f"recipe {recipe.name!r}: GuiDG needs an `experts:` section and two stages")
        self.recipe, self.config, self.out = recipe, config.validate(), Path(out)
        self.experts = ExpertsConfig(
            domains=dict(recipe.experts.domains), context=recipe.experts.context, heads=recipe.experts.heads
        )
        self.start = resolve_model(model)
        records = list(train) + list(air or [])
        self.expert_part, self.held = split_domains(records, self.experts, recipe.experts.holdout, config.seed)
        self.labels = self.experts.labels
        self.val = [r for r in val or [] if self.domain(r) is not None]
        missing = [d for d in self.labels if not any(self.domain(r) == d for r in self.expert_part)]
        if missing:
            raise ReefcapError(f"no training images for domain(s) {missing}: check the data (and --preserve-data)")
        self.log_file = None

    def domain(self, rec) -> str | None:
        return self.experts.domain_of(rec.metadata)

    def _log(self, entry: dict[str, Any]) -> None:
        self.log_file.write(json.dumps(entry) + "\n")
        self.log_file.flush()

    def _batches(self, records: list, processor, seed: int) -> tuple[CaptionBatches, np.ndarray]:
        size = processor.image_processor.size["height"]
        cfg = self.config
        batches = CaptionBatches(
            records, processor, TrainTransform(size, cfg.augment), cfg.batch_size, seed, 0, 1, cfg.max_words
        )
        domains = np.array([self.labels.index(self.domain(r)) for r in batches.records])
        return batches, domains

    def _loop(self, stage: StageConfig, params, batches, domains, loss_fn, index: int, on_epoch=None) -> None:
        total = max(1, round(stage.epochs * len(batches)))
        if self.config.max_steps is not None:
            total = min(total, self.config.max_steps)
        opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(stage, total))
        for step in range(total):
            epoch, k = divmod(step, len(batches))
            idx = batches.indices(index * 100_000 + epoch, k)
            rows = torch.as_tensor(domains[[batches.pairs[i][0] for i in idx]])
            batch = batches.batch(index * 100_000 + epoch, k)
            loss, extra = loss_fn(batch, rows)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], self.config.clip_norm or math.inf)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            self._log({"type": "train", "stage": index, "step": step + 1, "lr": sched.get_last_lr()[0], **extra})
            if on_epoch is not None and ((step + 1) % len(batches) == 0 or step + 1 == total):
                on_epoch(step + 1)

    def run(self) -> dict[str, Any]:
        if (self.out / "last").exists():
            raise ReefcapError(f"{self.out} already holds a finished run; choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_file = (self.out / "log.jsonl").open("a")
        torch.manual_seed(self.config.seed)
        started = time.time()
        blip, processor = load_blip(self.start)
        blip.text_decoder.label_smoothing = self.recipe.label_smoothing
        blip.requires_grad_(False)
        _, ExpertsHead = modules()
        text_dim, image_dim = blip.config.text_config.hidden_size, blip.config.vision_config.hidden_size
        init = init_prompts(blip.text_decoder.get_input_embeddings(), processor.tokenizer, self.experts)
        head = ExpertsHead(self.experts, image_dim, text_dim, init)
        self._stage_experts(blip, head, processor)
        self._stage_fusion(blip, head, processor)
        accuracy = self._routing(blip, head, processor)
        self._log({"type": "end", "seconds": round(time.time() - started, 2), "routing_accuracy_holdout": accuracy})
        self.log_file.close()
        for name in ("last", "best"):
            self._write(blip, processor, head, self.out / name)
        return {"out": str(self.out), "finished": True, "routing_accuracy_holdout": accuracy}

    def _stage_experts(self, blip, head, processor) -> None:
        stage = self.recipe.stages[0]
        batches, domains = self._batches(self.expert_part, processor, self.config.seed)
        blip.eval()  # frozen base: no dropout, the experts learn against the model that will serve
        head.prompts.requires_grad_(True)
        head.fusion.requires_grad_(False)
        self._log({"type": "stage", "stage": 0, "name": stage.name, "images": len(self.expert_part)})

        def loss_fn(batch, rows):
            with torch.no_grad():
                image = blip.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
            losses = expert_losses(blip, head, image, batch, rows)
            done = losses.detach()
            per = {f"loss/{d}": float(done[rows == i].mean()) for i, d in enumerate(self.labels) if (rows == i).any()}
            return losses.mean(), {"loss": float(done.mean()), **per}

        # GuiDG keeps each expert's best checkpoint on its domain's validation part (here: teacher-forced loss).
        best: dict[int, tuple[float, torch.Tensor]] = {}

        def select(step: int) -> None:
            losses = self._val_losses(blip, head, processor)
            self._log({"type": "eval", "stage": 0, "step": step, **{f"val_loss/{d}": v for d, v in losses.items()}})
            for e, label in enumerate(self.labels):
                if label in losses and losses[label] < best.get(e, (math.inf,))[0]:
                    best[e] = (losses[label], head.prompts.detach()[e].clone())

        params = [{"params": [head.prompts], "weight_decay": 0.0}]
        selecting = self.val and self.recipe.experts.select_on_val
        self._loop(stage, params, batches, domains, loss_fn, 0, select if selecting else None)
        with torch.no_grad():
            for e, (_, prompts) in best.items():
                head.prompts[e] = prompts

    def _stage_fusion(self, blip, head, processor) -> None:
        stage = self.recipe.stages[1]
        if not self.held:
            raise ReefcapError("stage 2 needs held-out images: raise `holdout` in the recipe or add data")
        batches, domains = self._batches(self.held, processor, self.config.seed + 1)
        head.prompts.requires_grad_(False)
        head.fusion.requires_grad_(True)
        groups = [{"params": list(head.fusion.parameters()), "lr": self.recipe.experts.fusion_lr, "weight_decay": 0.0}]
        if "vision" in stage.groups:
            blip.vision_model.requires_grad_(True)
            blip.vision_model.train()
            groups.append({"params": list(blip.vision_model.parameters()), "weight_decay": stage.weight_decay})
        self._log({"type": "stage", "stage": 1, "name": stage.name, "images": len(self.held)})
        route = self.recipe.experts.route_weight

        def loss_fn(batch, rows):
            loss, w = guidg_step(blip, head, batch, route, rows)
            acc = float((w.argmax(dim=1) == rows).float().mean())
            return loss, {"loss": float(loss.detach()), "routing_accuracy": acc}

        self._loop(stage, groups, batches, domains, loss_fn, 1)
        blip.requires_grad_(False)
        blip.eval()

    @torch.no_grad()
    def _val_losses(self, blip, head, processor) -> dict[str, float]:
        """Mean caption loss of each domain's validation images (first caption) under that domain's expert."""
        from reefcap.models.data.images import load_image

        from .labels import build_targets

        sums: dict[str, list[float]] = {}
        for start in range(0, len(self.val), 64):
            chunk = self.val[start : start + 64]
            pixels = processor.image_processor(images=[load_image(r.path) for r in chunk], return_tensors="pt")
            batch = build_targets(processor.tokenizer, [r.captions[0] for r in chunk], max_words=self.config.max_words)
            rows = torch.tensor([self.labels.index(self.domain(r)) for r in chunk])
            image = blip.vision_model(pixel_values=pixels["pixel_values"]).last_hidden_state
            for label, loss in zip(chunk, expert_losses(blip, head, image, batch, rows).tolist(), strict=True):
                sums.setdefault(self.domain(label), []).append(loss)
        return {d: round(sum(v) / len(v), 5) for d, v in sums.items()}

    @torch.no_grad()
    def _routing(self, blip, head, processor) -> float:
        """Fraction of held-out images whose largest fusion weight is their true domain (no augmentation)."""
        from reefcap.models.data.images import load_image

        hits = 0
        for start in range(0, len(self.held), 64):
            chunk = self.held[start : start + 64]
            pixels = processor.image_processor(images=[load_image(r.path) for r in chunk], return_tensors="pt")
            image = blip.vision_model(pixel_values=pixels["pixel_values"]).last_hidden_state
            guess = head.weights(image).argmax(dim=1).tolist()
            hits += sum(self.labels[g] == self.domain(r) for g, r in zip(guess, chunk, strict=True))
        return round(hits / max(1, len(self.held)), 4)

    def _write(self, blip, processor, head, dest: Path) -> None:
        extra = {"start": str(self.start.path), "experts": asdict(self.experts)}
        configs = (self.recipe, self.config, extra)
        write_checkpoint(dest, blip, processor, self.start.path, configs, also=lambda tmp: save_experts(tmp, head))
