"""GuiDG training for BLIP (recipe ``guidg``): water-type soft-prompt experts, then their per-image fusion.

- Stage 1 (``groups: [prompts]``): one expert per domain, K context vectors inserted after ``[DEC]``, trained on
  its domain's images with the whole BLIP frozen. All experts train in one pass: each row of a batch uses its
  own domain's expert, and the experts share no parameters, so each sees only its domain's gradients.
- Stage 2 (``groups: [vision, fusion]`` or ``[fusion]``): the cross-modal attention (and the vision encoder)
  train on data held out from stage 1 (``holdout`` of each domain's scenes) with GuiDG's loss
  ``sum_i w_i * loss_i`` per image (``loss_i`` = the caption loss under expert ``i``), AdamW, cosine.

:class:`ExpertsProtocol` is this as a :class:`~reefcap.training.protocol.Protocol`: the one
:class:`~reefcap.training.trainer.Trainer` runs it, with mixed precision, gradient accumulation, clipping,
patience and exact resume like every recipe. Validation (with ``--val``) is each domain's teacher-forced caption
loss under its own expert: logged, watched by patience, and with ``select_on_val`` the per-expert selection
(each expert ends stage 1 as its best state on its domain's validation loss, GuiDG's checkpoint choice).

The result is a BLIP checkpoint folder with the experts beside it (:mod:`reefcap.models.engines.experts`), written
to ``OUT/best`` and ``OUT/last`` (the same model: no step is selected on validation), with ``log.jsonl`` and
``reefcap_train.json`` like every run.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reefcap.models.engines.experts import ExpertsConfig, init_prompts, load_experts, modules, save_experts
from reefcap.models.engines.torch_engine import load_blip
from reefcap.models.errors import ReefcapError
from reefcap.models.registry import ResolvedModel

from .augment import TrainTransform
from .config import Recipe, TrainConfig
from .data import CaptionBatches
from .labels import IGNORE, build_targets
from .params import parameter_groups
from .protocol import ALL_FIELDS, Protocol, Validation

BEST_FILE = "reefcap_experts_best.safetensors"  # in OUT/checkpoint only: the per-expert selection so far


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
    positions = (torch.arange(embeds.shape[1], device=embeds.device) - k).clamp(min=0)[None].expand(rows, -1)
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
    experts = torch.arange(n_exp, device=image.device).repeat(image.shape[0])
    losses = expert_losses(blip, head, image.repeat_interleave(n_exp, dim=0), rows, experts)
    loss = (weights * losses.view(-1, n_exp)).sum(dim=1).mean()
    if route_weight > 0 and domains is not None:
        loss = loss + route_weight * torch.nn.functional.nll_loss(weights.clamp(min=1e-8).log(), domains)
    return loss, weights


class DomainBatches(CaptionBatches):
    """Caption batches that also carry each row's domain (``domains``: its index in the experts' labels)."""

    def __init__(self, records: list, domains: list[int], *args: Any) -> None:
        super().__init__(records, *args)
        self.domains = np.asarray(domains, dtype=np.int64)

    def batch(self, epoch: int, k: int) -> dict[str, torch.Tensor]:
        out = super().batch(epoch, k)
        rows = [self.pairs[i][0] for i in self.indices(epoch, k)]
        out["domains"] = torch.as_tensor(self.domains[rows])
        return out


class ExpertsObjective(torch.nn.Module):
    """Stage 1: each row's loss under its own domain's expert, ``(mean, per-row losses)``; stage 2 (``fused``):
    GuiDG's loss, ``(loss, fusion weights)``. One module so that a distributed wrapper sees every use of the
    weights in a single forward."""

    def __init__(self, blip: torch.nn.Module, head: torch.nn.Module, fused: bool, route_weight: float) -> None:
        super().__init__()
        self.blip, self.head, self.fused, self.route_weight = blip, head, fused, route_weight

    def forward(self, pixel_values, input_ids, attention_mask, labels, domains):
        text = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.fused:
            batch = {"pixel_values": pixel_values, **text}
            loss, weights = guidg_step(self.blip, self.head, batch, self.route_weight, domains)
            return loss, weights.detach()
        with torch.no_grad():  # stage 1 trains the prompts against the frozen encoder
            image = self.blip.vision_model(pixel_values=pixel_values).last_hidden_state
        losses = expert_losses(self.blip, self.head, image, text, domains)
        return losses.mean(), losses.detach()


def check_recipe(recipe: Recipe) -> None:
    """Refuse what the experts protocol would otherwise ignore: its stage layout is fixed, it has no preservation."""
    if recipe.experts is None or len(recipe.stages) != 2:
        raise ReefcapError(f"recipe {recipe.name!r}: GuiDG needs an `experts:` section and two stages")
    first, second = recipe.stages
    if tuple(first.groups) != ("prompts",):
        raise ReefcapError(f"recipe {recipe.name!r}: GuiDG's stage 1 trains groups [prompts], got {list(first.groups)}")
    if "fusion" not in second.groups or not set(second.groups) <= {"vision", "fusion"}:
        raise ReefcapError(
            f"recipe {recipe.name!r}: GuiDG's stage 2 trains [fusion] or [vision, fusion], got {list(second.groups)}"
        )
    if recipe.preserve is not None:
        raise ReefcapError(f"recipe {recipe.name!r}: the experts protocol cannot honour `preserve`; remove it")


class ExpertsProtocol(Protocol):
    """GuiDG's two stages (see the module docstring) on the Trainer.

    Honours every TrainConfig field but ``eval_beams``: its validation is teacher-forced, it decodes nothing.
    """

    kind = "experts"
    honours = ALL_FIELDS - {"eval_beams"}
    validate_at_stop = False  # stage 1's validations pick each expert's state; patience counts them too

    def __init__(self, recipe: Recipe, config: TrainConfig, train: list, val: list | None, air: list | None) -> None:
        super().__init__(recipe, config)
        check_recipe(recipe)
        spec = recipe.experts
        self.experts = ExpertsConfig(domains=dict(spec.domains), context=spec.context, heads=spec.heads)
        self.labels = self.experts.labels
        # In-air captions (--preserve-data) are the in-air expert's data, when it has one.
        records = list(train) + list(air or [])
        self.expert_part, self.held = split_domains(records, self.experts, spec.holdout, config.seed)
        self.val = [r for r in val or [] if self.domain(r) is not None]
        missing = [d for d in self.labels if not any(self.domain(r) == d for r in self.expert_part)]
        if missing:
            raise ReefcapError(f"no training images for domain(s) {missing}: check the data (and --preserve-data)")
        if not self.held:
            raise ReefcapError("stage 2 needs held-out images: raise `holdout` in the recipe or add data")
        self.head: Any = None
        self.best: dict[int, tuple[float, torch.Tensor]] = {}  # expert -> (val loss, prompts) of its best state
        self._stage = 0

    def domain(self, rec) -> str | None:
        return self.experts.domain_of(rec.metadata)

    @property
    def validates(self) -> bool:
        return bool(self.val)

    def build(self, start: ResolvedModel, acc: Any, checkpoint: Path | None = None) -> None:
        self.acc = acc
        blip, self.processor = load_blip(ResolvedModel(start.name, checkpoint, "local") if checkpoint else start)
        blip.text_decoder.label_smoothing = self.recipe.label_smoothing
        blip.requires_grad_(False)
        self.model = blip
        if checkpoint is not None:
            self.head = load_experts(checkpoint, blip)
            return
        _, ExpertsHead = modules()
        text_dim, image_dim = blip.config.text_config.hidden_size, blip.config.vision_config.hidden_size
        init = init_prompts(blip.text_decoder.get_input_embeddings(), self.processor.tokenizer, self.experts)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)  # the same fusion init on every process, whatever ran before
            self.head = ExpertsHead(self.experts, image_dim, text_dim, init)

    def stage_batches(self, si: int, transform: TrainTransform, rank: int, world: int) -> DomainBatches:
        cfg = self.config
        records = self.held if si else self.expert_part
        domains = [self.labels.index(self.domain(r)) for r in records]
        args = (self.processor, transform, cfg.batch_size, cfg.seed + si, rank, world, cfg.max_words, cfg.max_text_len)
        return DomainBatches(records, domains, *args)

    def begin_stage(self, si: int) -> tuple[torch.nn.Module, list[dict], dict[str, Any]]:
        stage, blip, head = self.recipe.stages[si], self.model, self.head
        self._stage = si
        blip.requires_grad_(False)
        head.prompts.requires_grad_(si == 0)
        head.fusion.requires_grad_(si == 1)
        if si == 0:
            groups = {"prompts": {"params": [head.prompts], "weight_decay": 0.0}}
        else:
            # The fusion starts from scratch: its own lr; the stage's is for the pretrained vision encoder.
            fusion = {"params": list(head.fusion.parameters()), "lr": self.recipe.experts.fusion_lr}
            groups = {"fusion": {**fusion, "weight_decay": 0.0}}
            if "vision" in stage.groups:
                blip.vision_model.requires_grad_(True)
                vision = list(blip.vision_model.parameters())
                groups["vision"] = {"params": vision, "weight_decay": stage.weight_decay}
        fields = {f"trainable/{g}": sum(p.numel() for p in group["params"]) for g, group in groups.items()}
        fields["images"] = len(self.held if si else self.expert_part)
        objective = ExpertsObjective(blip, head, fused=si == 1, route_weight=self.recipe.experts.route_weight)
        return objective, list(groups.values()), fields

    def train_mode(self, si: int) -> None:
        self.model.eval()  # frozen base: no dropout, the experts learn against the model that will serve
        if si == 1 and "vision" in self.recipe.stages[1].groups:
            self.model.vision_model.train()

    def loss(self, wrapped, batch: dict[str, torch.Tensor], last: bool, accum: int) -> tuple[torch.Tensor, dict]:
        domains = batch["domains"]
        loss, detail = wrapped(**batch)
        parts = {"loss": loss.item() / accum}
        if self._stage == 1:  # detail: the fusion weights; how often the largest is the image's true domain
            parts["hits"] = float((detail.argmax(dim=1) == domains).sum())
            parts["rows"] = float(len(domains))
            return loss, parts
        for i, label in enumerate(self.labels):  # detail: per-row losses, summed per domain over micro-batches
            rows = domains == i
            if rows.any():
                parts[f"sum/{label}"] = float(detail[rows].float().sum())
                parts[f"rows/{label}"] = float(rows.sum())
        return loss, parts

    def log_fields(self, parts: dict[str, float]) -> dict[str, Any]:
        entry: dict[str, Any] = {"loss": parts["loss"]}
        if "rows" in parts:
            entry["routing_accuracy"] = parts["hits"] / parts["rows"]
        for label in self.labels:
            if f"rows/{label}" in parts:
                entry[f"loss/{label}"] = parts[f"sum/{label}"] / parts[f"rows/{label}"]
        return entry

    def validate(self, si: int) -> Validation:
        losses = self._val_losses()
        mean = sum(losses.values()) / len(losses)
        if si == 0 and self.recipe.experts.select_on_val:
            for e, label in enumerate(self.labels):
                if label in losses and losses[label] < self.best.get(e, (float("inf"),))[0]:
                    self.best[e] = (losses[label], self.head.prompts.detach()[e].clone())
        metrics = {**{f"val_loss/{d}": v for d, v in losses.items()}, "val_loss": round(mean, 5)}
        return Validation(metrics, None, -mean)

    def stale_reason(self, best: float, stale: int) -> str:
        return f"validation loss (mean over domains) not below {-best:.4f} for {stale} validations"

    def end_stage(self, si: int) -> None:
        if si != 0:
            return
        with torch.no_grad():
            for e, (_, prompts) in self.best.items():
                self.head.prompts[e] = prompts.to(self.head.prompts.device)
            if self.acc is not None and self.acc.num_processes > 1:  # only the main process validated
                from accelerate.utils import broadcast

                self.head.prompts.copy_(broadcast(self.head.prompts.detach().clone(), from_process=0))

    def finish(self) -> dict[str, Any]:
        return {"routing_accuracy_holdout": self._routing()}

    def write_beside(self, dest: Path) -> None:
        save_experts(dest, self.head)

    def config_extra(self) -> dict[str, Any]:
        return {"experts": self.experts.to_dict()}

    def save_state(self, folder: Path) -> None:
        if not self.best:
            return
        from safetensors.torch import save_file

        tensors = {f"prompts.{e}": p.detach().contiguous().cpu() for e, (_, p) in self.best.items()}
        save_file(tensors, str(folder / BEST_FILE), metadata={str(e): repr(v) for e, (v, _) in self.best.items()})

    def load_state(self, folder: Path) -> None:
        from safetensors import safe_open

        self.best = {}
        if not (folder / BEST_FILE).is_file():
            return
        with safe_open(str(folder / BEST_FILE), framework="pt") as f:
            for e, loss in (f.metadata() or {}).items():
                self.best[int(e)] = (float(loss), f.get_tensor(f"prompts.{e}"))

    def grad_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        groups = {g: [p for _, p in ps] for g, ps in parameter_groups(self.model).items()}
        return {**groups, "prompts": [self.head.prompts], "fusion": list(self.head.fusion.parameters())}

    def _pixels(self, chunk: list) -> torch.Tensor:
        from reefcap.models.data.images import load_image

        pixels = self.processor.image_processor(images=[load_image(r.path) for r in chunk], return_tensors="pt")
        return pixels["pixel_values"].to(self.head.prompts.device)

    @torch.no_grad()
    def _val_losses(self) -> dict[str, float]:
        """Mean caption loss of each domain's validation images (first caption) under that domain's expert."""
        cfg, blip = self.config, self.model
        blip.eval()
        records = self.val[: cfg.eval_max_images] if cfg.eval_max_images else self.val
        sums: dict[str, list[float]] = {}
        for start in range(0, len(records), cfg.eval_batch_size):
            chunk = records[start : start + cfg.eval_batch_size]
            captions = [r.captions[0] for r in chunk]
            batch = build_targets(self.processor.tokenizer, captions, max_words=cfg.max_words, max_len=cfg.max_text_len)
            batch = {k: v.to(self.head.prompts.device) for k, v in batch.items()}
            rows = torch.tensor([self.labels.index(self.domain(r)) for r in chunk], device=self.head.prompts.device)
            image = blip.vision_model(pixel_values=self._pixels(chunk)).last_hidden_state
            for rec, loss in zip(chunk, expert_losses(blip, self.head, image, batch, rows).tolist(), strict=True):
                sums.setdefault(self.domain(rec), []).append(loss)
        return {d: round(sum(v) / len(v), 5) for d, v in sums.items()}

    @torch.no_grad()
    def _routing(self) -> float:
        """Fraction of held-out images whose largest fusion weight is their true domain (no augmentation)."""
        hits, size = 0, self.config.eval_batch_size
        self.model.eval()
        for start in range(0, len(self.held), size):
            chunk = self.held[start : start + size]
            image = self.model.vision_model(pixel_values=self._pixels(chunk)).last_hidden_state
            guess = self.head.weights(image).argmax(dim=1).tolist()
            hits += sum(self.labels[g] == self.domain(r) for g, r in zip(guess, chunk, strict=True))
        return round(hits / max(1, len(self.held)), 4)
