"""BLIP's captioning loss as a :class:`~reefcap.training.protocol.Protocol`: every recipe without an ``experts:``
section (naive, low_lr, visual_only, DAMF and its preserving variant, pretraining)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from reefcap.models.engines.base import DecodeOptions, EngineConfig
from reefcap.models.engines.torch_engine import TorchCaptionEngine, load_blip
from reefcap.models.errors import ReefcapError
from reefcap.models.registry import ResolvedModel

from .augment import TrainTransform
from .config import Recipe, TrainConfig
from .data import AirImages, CaptionBatches
from .evaluation import evaluate, selection_score
from .params import apply_stage, optimizer_groups
from .protocol import Protocol, Validation


class CaptionObjective(torch.nn.Module):
    """BLIP's captioning loss, plus feature distillation on in-air images when preservation is on.

    One module so that a distributed wrapper sees every use of the weights in a single forward.
    """

    def __init__(self, blip: torch.nn.Module, teacher: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.blip = blip
        self._teacher = [teacher]  # a list keeps the frozen teacher out of parameters() and state_dict()

    def forward(self, pixel_values, input_ids, attention_mask, labels, air_pixel_values=None):
        out = self.blip(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        distill = None
        teacher = self._teacher[0]
        if air_pixel_values is not None and teacher is not None:
            student = self.blip.vision_model(pixel_values=air_pixel_values).last_hidden_state
            with torch.no_grad():
                target = teacher(pixel_values=air_pixel_values).last_hidden_state
            distill = torch.nn.functional.mse_loss(student.float(), target.float())
        return out.loss, distill


class CaptionProtocol(Protocol):
    """BLIP's captioning loss on the recipe's parameter groups, with the recipe's knowledge preservation.

    Honours every TrainConfig field. Validation: greedy/beam captions scored by CIDEr + BLEU-4 (BLIP's
    selection, ``OUT/best``); patience watches validation CIDEr.
    """

    kind = "caption"

    def __init__(self, recipe: Recipe, config: TrainConfig, train: list, val: list | None, air: list | None) -> None:
        super().__init__(recipe, config)
        if recipe.preserve and recipe.preserve.air_fraction > 0 and not air:
            raise ReefcapError(f"recipe {recipe.name!r} preserves in-air ability: pass in-air data (--preserve-data)")
        self.train_records, self.val_records, self.air_records = train, val or [], air
        self.teacher, self.anchors, self.air = None, None, None
        self._batches: CaptionBatches | None = None

    @property
    def validates(self) -> bool:
        return bool(self.val_records)

    def build(self, start: ResolvedModel, acc: Any, checkpoint: Path | None = None) -> None:
        self.acc, self.start = acc, start
        self.model, self.processor = load_blip(ResolvedModel(start.name, checkpoint, "local") if checkpoint else start)
        self.model.text_decoder.label_smoothing = self.recipe.label_smoothing
        self.model.config.text_config.label_smoothing = self.recipe.label_smoothing
        self.model.train()
        self.teacher, self.anchors = self._preservation()

    def _preservation(self):
        """The frozen start model's vision encoder and the start weights, when the recipe preserves."""
        if not self.recipe.preserve:
            return None, None
        start, _ = load_blip(self.start)
        teacher = start.vision_model.to(self.acc.device).eval().requires_grad_(False)
        start_params = dict(start.named_parameters())
        anchors = [(p, start_params[name].detach().to(self.acc.device)) for name, p in self.model.named_parameters()]
        return teacher, anchors

    def stage_batches(self, si: int, transform: TrainTransform, rank: int, world: int) -> CaptionBatches:
        cfg = self.config
        if self._batches is None:  # one set for every stage: it caches the decoded images
            self._batches = CaptionBatches(
                self.train_records,
                self.processor,
                transform,
                cfg.batch_size,
                cfg.seed,
                rank,
                world,
                cfg.max_words,
                cfg.max_text_len,
            )
            preserve = self.recipe.preserve
            if preserve and preserve.air_fraction > 0:  # 0: the L2 pull alone, no in-air data
                per = max(1, round(preserve.air_fraction * cfg.batch_size))
                self.air = AirImages(self.air_records, self.processor, transform, per, cfg.seed, rank)
        return self._batches

    def begin_stage(self, si: int) -> tuple[torch.nn.Module, list[dict], dict[str, Any]]:
        stage = self.recipe.stages[si]
        counts = apply_stage(self.model, stage.groups)
        groups = optimizer_groups(self.model, stage.lr, stage.weight_decay)
        return CaptionObjective(self.model, self.teacher), groups, {f"trainable/{g}": n for g, n in counts.items()}

    def extend_batch(self, batch: dict[str, torch.Tensor], draw: int) -> dict[str, torch.Tensor]:
        if self.air is not None:
            batch["air_pixel_values"] = self.air.batch(draw).to(self.acc.device)
        return batch

    def loss(self, wrapped, batch: dict[str, torch.Tensor], last: bool, accum: int) -> tuple[torch.Tensor, dict]:
        preserve = self.recipe.preserve
        caption, distill = wrapped(**batch)
        loss, parts = caption, {"caption": caption.item() / accum}
        if distill is not None:
            loss = loss + preserve.distill_weight * distill
            parts["distill"] = distill.item() / accum
        if self.anchors is not None and last:
            # The L2 pull acts once per optimizer step, not once per micro-batch.
            l2 = sum(((p - a) ** 2).sum() for p, a in self.anchors if p.requires_grad)
            loss = loss + preserve.l2_weight * l2 * accum
            parts["l2"] = float(l2.detach())
        return loss, parts

    def log_fields(self, parts: dict[str, float]) -> dict[str, Any]:
        entry = {"loss": parts.get("caption", 0.0)}
        if self.recipe.preserve:
            entry["distill"], entry["l2"] = parts.get("distill", 0.0), parts.get("l2", 0.0)
        return entry

    def validate(self, si: int) -> Validation:
        cfg, records = self.config, self.val_records
        self.model.eval()
        described = ResolvedModel(self.start.name, self.start.path, "local")
        engine = TorchCaptionEngine(self.model, self.processor, described, EngineConfig(device="cpu"))
        records = records[: cfg.eval_max_images] if cfg.eval_max_images else records
        options = DecodeOptions(num_beams=cfg.eval_beams)
        metrics, _ = evaluate(engine, records, options, cfg.eval_batch_size, meteor=False)
        return Validation(metrics, selection_score(metrics), float(metrics["CIDEr"]))

    def stale_reason(self, best: float, stale: int) -> str:
        return f"validation CIDEr not above {best:.4f} for {stale} validations"
