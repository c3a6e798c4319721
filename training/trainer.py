"""The training loop on HF Accelerate: CPU, one GPU, or several GPUs/nodes through ``accelerate launch``.

A run executes a :class:`~reefcap.training.config.Recipe` stage by stage. Each stage freezes all but its
parameter groups, builds a fresh AdamW + schedule, and steps with gradient accumulation, clipping and
optional mixed precision. Validation (CIDEr + BLEU-4, as BLIP selects models) runs every
``eval_every_epochs`` and at the end of each stage; the best model is kept in ``OUT/best``, the final one in
``OUT/last``, both as Hugging Face checkpoints with the run's configs beside them. ``OUT/checkpoint`` holds
what an exact resume needs: weights, optimizer and scheduler state, per-process RNG state and the position
in the data (batches are a pure function of seed, stage, epoch and index; see ``data.py``).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from reefcap.models.engines.base import DecodeOptions, EngineConfig
from reefcap.models.engines.torch_engine import TorchCaptionEngine, load_blip
from reefcap.models.errors import ReefcapError
from reefcap.models.registry import ResolvedModel, resolve_model

from .augment import TrainTransform
from .config import Recipe, StageConfig, TrainConfig, write_checkpoint
from .data import AirImages, CaptionBatches
from .evaluation import evaluate, selection_score
from .gradstats import GradStats
from .params import apply_stage, optimizer_groups, schedule
from .progress import progress_bar

STATE_FILE = "state.json"


@dataclass
class TrainState:
    """Where a run is; saved in ``OUT/checkpoint/state.json``."""

    stage: int = 0
    stage_step: int = 0
    global_step: int = 0
    best_score: float = -math.inf
    best_step: int = -1
    finished: bool = False
    evals: list[dict[str, Any]] = field(default_factory=list)
    best_cider: float = -math.inf  # early stopping watches validation CIDEr alone
    stale: int = 0  # validations since validation CIDEr last improved
    stopped_early: bool = False


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


class Trainer:
    """Runs one recipe from a start checkpoint on caption records; see the module docstring."""

    def __init__(
        self,
        model: str,
        recipe: Recipe,
        config: TrainConfig,
        out: str | Path,
        train_records: list,
        val_records: list | None = None,
        air_records: list | None = None,
        progress: bool = True,
        inputs: dict[str, Any] | None = None,
    ) -> None:
        from accelerate import Accelerator

        self.recipe, self.config, self.out = recipe, config.validate(), Path(out)
        self.start = resolve_model(model)
        if recipe.preserve and recipe.preserve.air_fraction > 0 and not air_records:
            raise ReefcapError(f"recipe {recipe.name!r} preserves in-air ability: pass in-air data (--preserve-data)")
        # Without CUDA, cpu=True is what makes `accelerate launch --multi_gpu --num_processes N` run N CPU
        # processes over gloo (otherwise each process would train alone).
        cpu = config.device == "cpu" or not torch.cuda.is_available()
        self.acc = Accelerator(mixed_precision=config.mixed_precision, cpu=cpu)
        self.train_records, self.val_records, self.air_records = train_records, val_records or [], air_records
        self.progress = progress and self.acc.is_main_process
        self.ckpt = self.out / "checkpoint"
        self.inputs = inputs  # where the run's model and data came from, saved so a resume can compare

    # ---- persistence ----------------------------------------------------------------------------

    def _write_model(self, model, processor, dest: Path, state: TrainState) -> None:
        extra = {"start": str(self.start.path), "inputs": self.inputs, "state": asdict(state)}
        write_checkpoint(dest, model, processor, self.start.path, (self.recipe, self.config, extra))

    def _save_checkpoint(self, model, processor, optimizer, scheduler, state: TrainState) -> None:
        tmp = self.ckpt.with_name("checkpoint.tmp")
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            self._write_model(model, processor, tmp, state)
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n")
        self.acc.wait_for_everyone()
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, tmp / f"rng-{self.acc.process_index}.pt")
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            shutil.rmtree(self.ckpt, ignore_errors=True)
            tmp.rename(self.ckpt)
        self.acc.wait_for_everyone()

    def _load_state(self) -> TrainState:
        data = json.loads((self.ckpt / STATE_FILE).read_text())
        return TrainState(**data)

    # ---- evaluation -----------------------------------------------------------------------------

    def _validate(self, model, processor, state: TrainState, epoch: float, log) -> None:
        if not self.val_records:
            return
        if self.acc.is_main_process:
            model.eval()
            engine = TorchCaptionEngine(
                model, processor, ResolvedModel(self.out.name, self.start.path, "local"), EngineConfig(device="cpu")
            )
            records = (
                self.val_records[: self.config.eval_max_images] if self.config.eval_max_images else self.val_records
            )
            options = DecodeOptions(num_beams=self.config.eval_beams)
            metrics, _ = evaluate(engine, records, options, self.config.eval_batch_size, meteor=False)
            score = selection_score(metrics)
            entry = {
                "type": "eval",
                "step": state.global_step,
                "stage": state.stage,
                "epoch": round(epoch, 4),
                "score": round(score, 6),
                **metrics,
            }
            state.evals.append(entry)
            log(entry)
            if score > state.best_score:
                state.best_score, state.best_step = score, state.global_step
                self._write_model(model, processor, self.out / "best", state)
            cider = float(metrics["CIDEr"])
            state.best_cider, state.stale = (
                (cider, 0) if cider > state.best_cider else (state.best_cider, state.stale + 1)
            )
            model.train()
        self.acc.wait_for_everyone()

    # ---- the loop -------------------------------------------------------------------------------

    def run(self, resume: bool = False) -> dict[str, Any]:
        acc, cfg = self.acc, self.config
        resuming = resume and (self.ckpt / STATE_FILE).is_file()
        if not resuming and acc.is_main_process and (self.out / "last").exists():
            raise ReefcapError(f"{self.out} already holds a finished run; pass --resume or choose another --out")
        state = self._load_state() if resuming else TrainState()
        if state.finished:
            return self._summary(state)
        if state.stage >= len(self.recipe.stages):
            raise ReefcapError(f"the run stopped in stage {state.stage + 1}; recipe {self.recipe.name!r} has fewer")
        source = ResolvedModel(self.start.name, self.ckpt, "local") if resuming else self.start
        model, processor = load_blip(source)
        model.text_decoder.label_smoothing = self.recipe.label_smoothing
        model.config.text_config.label_smoothing = self.recipe.label_smoothing
        model.train()
        teacher, anchors = self._preservation(model)
        torch.manual_seed(cfg.seed + acc.process_index)
        if resuming:
            rng = torch.load(self.ckpt / f"rng-{acc.process_index}.pt", weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])

        size = processor.image_processor.size["height"]
        transform = TrainTransform(size, cfg.augment)
        batches = CaptionBatches(
            self.train_records,
            processor,
            transform,
            cfg.batch_size,
            cfg.seed,
            acc.process_index,
            acc.num_processes,
            cfg.max_words,
            cfg.max_text_len,
        )
        air = None
        if self.recipe.preserve and self.recipe.preserve.air_fraction > 0:  # 0: the L2 pull alone, no in-air data
            per = max(1, round(self.recipe.preserve.air_fraction * cfg.batch_size))
            air = AirImages(self.air_records, processor, transform, per, cfg.seed, acc.process_index)
        steps_per_epoch = max(1, len(batches) // cfg.grad_accum)
        totals = [max(1, round(s.epochs * steps_per_epoch)) for s in self.recipe.stages]
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
        writer, logf = self._loggers()

        def log(entry: dict[str, Any]) -> None:
            if acc.is_main_process:
                logf.write(json.dumps(entry) + "\n")
                logf.flush()
                for k, v in entry.items():
                    if isinstance(v, (int, float)) and k not in ("step", "stage"):
                        writer.add_scalar(f"{entry.get('type', 'train')}/{k}", v, entry["step"])

        bar = progress_bar(sum(totals), self.recipe.name, self.progress, initial=state.global_step)
        stats = GradStats(model, cfg.grad_window)
        start_time = time.time()
        stop = False
        for si in range(state.stage, len(self.recipe.stages)):
            stage, total = self.recipe.stages[si], totals[si]
            if si != state.stage:
                state.stage, state.stage_step = si, 0
            counts = apply_stage(model, stage.groups)
            entry = {"type": "stage", "step": state.global_step, "stage": si, "name": stage.name, "steps": total}
            log({**entry, "steps_per_epoch": steps_per_epoch, **{f"trainable/{g}": n for g, n in counts.items()}})
            optimizer, scheduler = self._optimizer(model, stage, total, resuming and state.stage_step > 0)
            resuming = False
            objective = CaptionObjective(model, teacher)
            wrapped, optimizer = acc.prepare(objective, optimizer)
            stats.reset()
            eval_every = max(1, round(cfg.eval_every_epochs * steps_per_epoch))
            while state.stage_step < total:
                entry = self._step(wrapped, model, optimizer, scheduler, batches, air, anchors, stats, state, si)
                state.stage_step += 1
                state.global_step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{entry['loss']:.3f}", stage=stage.name, refresh=False)  # redraw at its interval
                log(entry)
                epoch = state.stage_step / steps_per_epoch
                run_done = si == len(self.recipe.stages) - 1 and state.stage_step == total
                at_max = cfg.max_steps is not None and state.global_step >= cfg.max_steps and not run_done
                if state.stage_step % eval_every == 0 or state.stage_step == total or at_max:
                    self._validate(model, processor, state, epoch, log)
                    state.stopped_early = self._patience_over(state, log) and not run_done
                    at_max = at_max or state.stopped_early
                    self._save_checkpoint(model, processor, optimizer, scheduler, state)
                elif cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0:
                    self._save_checkpoint(model, processor, optimizer, scheduler, state)
                if at_max:
                    stop = True
                    break
            if stop:
                break
        bar.close()
        state.finished = not stop or state.stopped_early
        if state.finished:
            state.stage_step = totals[-1]
        model.eval()
        self._save_checkpoint(model, processor, optimizer, scheduler, state)
        if acc.is_main_process:
            self._write_model(model, processor, self.out / "last", state)
            if state.best_step < 0:  # no validation data: the last model is the selected one
                self._write_model(model, processor, self.out / "best", state)
            log({"type": "end", "step": state.global_step, "seconds": round(time.time() - start_time, 2)})
            writer.close()
            logf.close()
        acc.wait_for_everyone()
        return self._summary(state)

    def _patience_over(self, state: TrainState, log) -> bool:
        """Whether validation CIDEr has not improved for ``patience`` validations (every process agrees)."""
        stale = torch.tensor([state.stale], device=self.acc.device)
        state.stale = int(self.acc.gather(stale).max().item())  # only the main process validates
        over = self.config.patience is not None and state.stale >= self.config.patience
        if over:
            reason = f"validation CIDEr not above {state.best_cider:.4f} for {state.stale} validations"
            log({"type": "early_stop", "step": state.global_step, "reason": reason})
        return over

    def _optimizer(self, model, stage: StageConfig, total: int, restore: bool):
        """A stage's AdamW and lr schedule; with ``restore``, their state from ``OUT/checkpoint``."""
        optimizer = torch.optim.AdamW(optimizer_groups(model, stage.lr, stage.weight_decay), lr=stage.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(stage, total))
        if not restore:
            return optimizer, scheduler
        wanted = [(g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups]
        saved = torch.load(self.ckpt / "optim.pt", weights_only=True)
        try:
            optimizer.load_state_dict(saved["optimizer"])
        except ValueError:  # another set of trainable tensors: Adam's moments have nothing to attach to
            raise ReefcapError(
                f"stage {stage.name!r} is in progress with other parameter groups; it cannot resume with {stage.groups}"
            ) from None
        scheduler.load_state_dict(saved["scheduler"])
        # The saved state carries the lr and decay the run started with; the stage's own win, so that
        # --resume-override applies. Unchanged they are the same floats (LambdaLR: base_lr * factor(step)).
        factor = schedule(stage, total)(scheduler.last_epoch)
        scheduler.base_lrs = [lr for lr, _ in wanted]
        for group, (lr, decay) in zip(optimizer.param_groups, wanted, strict=True):
            group.update(initial_lr=lr, weight_decay=decay, lr=lr * factor)
        return optimizer, scheduler

    def _step(self, wrapped, model, optimizer, scheduler, batches, air, anchors, stats, state, si) -> dict[str, Any]:
        acc, cfg, preserve = self.acc, self.config, self.recipe.preserve
        n = len(batches)
        totals = {"caption": 0.0, "distill": 0.0, "l2": 0.0}
        for j in range(cfg.grad_accum):
            micro = state.stage_step * cfg.grad_accum + j
            epoch, k = divmod(micro, n)
            batch = {key: v.to(acc.device) for key, v in batches.batch(si * 100_000 + epoch, k).items()}
            if air is not None:
                batch["air_pixel_values"] = air.batch(state.global_step * cfg.grad_accum + j).to(acc.device)
            last = j == cfg.grad_accum - 1
            ctx = acc.no_sync(wrapped) if not last else contextlib.nullcontext()
            with ctx, acc.autocast():
                caption, distill = wrapped(**batch)
                loss = caption
                totals["caption"] += caption.item() / cfg.grad_accum
                if distill is not None:
                    loss = loss + preserve.distill_weight * distill
                    totals["distill"] += distill.item() / cfg.grad_accum
                if anchors is not None and last:
                    # The L2 pull acts once per optimizer step, not once per micro-batch.
                    l2 = sum(((p - a) ** 2).sum() for p, a in anchors if p.requires_grad)
                    loss = loss + preserve.l2_weight * l2 * cfg.grad_accum
                    totals["l2"] += float(l2.detach())
                acc.backward(loss / cfg.grad_accum)
        scale = acc.scaler.get_scale() if acc.scaler is not None else 1.0
        grads = stats.update(scale)
        total_norm = acc.clip_grad_norm_(model.parameters(), cfg.clip_norm) if cfg.clip_norm > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        entry = {
            "type": "train",
            "step": state.global_step + 1,
            "stage": si,
            "lr": scheduler.get_last_lr()[0],
            "loss": totals["caption"],
            **grads,
        }
        if total_norm is not None:
            entry["grad_norm/total"] = float(total_norm)
        if preserve:
            entry["distill"], entry["l2"] = totals["distill"], totals["l2"]
        return entry

    def _preservation(self, model):
        """The frozen start model's vision encoder and the start weights, when the recipe preserves."""
        if not self.recipe.preserve:
            return None, None
        start, _ = load_blip(self.start)
        teacher = start.vision_model.to(self.acc.device).eval().requires_grad_(False)
        start_params = dict(start.named_parameters())
        anchors = [(p, start_params[name].detach().to(self.acc.device)) for name, p in model.named_parameters()]
        return teacher, anchors

    def _loggers(self):
        if not self.acc.is_main_process:
            return None, None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.out / "tb")), (self.out / "log.jsonl").open("a")

    def _summary(self, state: TrainState) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "steps": state.global_step,
            "finished": state.finished,
            "best_step": state.best_step,
            "best_score": state.best_score if state.best_step >= 0 else None,
            "stopped_early": state.stopped_early,
            "evals": state.evals,
        }
