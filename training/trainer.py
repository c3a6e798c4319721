"""The training loop on HF Accelerate: CPU, one GPU, or several GPUs/nodes through ``accelerate launch``.

A run executes a :class:`~reefcap.training.config.Recipe` stage by stage; what is trained and how its loss is
computed is the recipe's :class:`~reefcap.training.protocol.Protocol` (BLIP captioning, or GuiDG's water-type
experts). Each stage freezes all but the protocol's parameters for it, builds a fresh AdamW + schedule, and
steps with gradient accumulation, clipping and optional mixed precision. Validation runs every
``eval_every_epochs`` and at the end of each stage; the best model (when the protocol selects one) is kept in
``OUT/best``, the final one in ``OUT/last``, both as Hugging Face checkpoints with the run's configs and the
protocol's files beside them. ``OUT/checkpoint`` holds what an exact resume needs: weights, the protocol's
state, optimizer and scheduler state, per-process RNG state and the position in the data (batches are a pure
function of seed, stage, epoch and index; see ``data.py``).
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

from reefcap.models.errors import ReefcapError
from reefcap.models.registry import resolve_model

from .augment import TrainTransform
from .caption import CaptionObjective
from .config import Recipe, StageConfig, TrainConfig, write_checkpoint
from .gradstats import GradStats
from .params import schedule
from .progress import progress_bar
from .protocol import Protocol
from .protocols import protocol_for

__all__ = ["CaptionObjective", "Trainer", "TrainState"]

STATE_FILE = "state.json"
OPTIM_FILE = "optim.pt"


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
    best_watched: float = -math.inf  # early stopping watches the protocol's value (validation CIDEr: captioning)
    stale: int = 0  # validations since the watched value last improved
    stopped_early: bool = False
    results: dict[str, Any] = field(default_factory=dict)  # the protocol's end-of-run results

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """Read a saved state; checkpoints written before protocols existed call the watched value best_cider."""
        data = dict(data)
        if "best_cider" in data:
            data["best_watched"] = data.pop("best_cider")
        return cls(**data)


@dataclass(frozen=True)
class Plan:
    """Per stage: its batches, optimizer steps per epoch and total optimizer steps."""

    batches: list
    steps_per_epoch: list[int]
    totals: list[int]


class Trainer:
    """Runs one recipe from a start checkpoint on caption records; see the module docstring.

    ``protocol`` defaults to the recipe's (:func:`~reefcap.training.protocols.protocol_for`), which refuses run
    config fields it cannot honour before anything is loaded.
    """

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
        protocol: Protocol | None = None,
    ) -> None:
        from accelerate import Accelerator

        self.recipe, self.config, self.out = recipe, config.validate(), Path(out)
        self.start = resolve_model(model)
        self.protocol = protocol or protocol_for(recipe, self.config, train_records, val_records, air_records)
        # Without CUDA, cpu=True is what makes `accelerate launch --multi_gpu --num_processes N` run N CPU
        # processes over gloo (otherwise each process would train alone).
        cpu = config.device == "cpu" or not torch.cuda.is_available()
        self.acc = Accelerator(mixed_precision=config.mixed_precision, cpu=cpu)
        self.progress = progress and self.acc.is_main_process
        self.ckpt = self.out / "checkpoint"
        self.inputs = inputs  # where the run's model and data came from, saved so a resume can compare
        self._writer = self._logf = None

    # ---- persistence ----------------------------------------------------------------------------

    def _write_model(self, dest: Path, state: TrainState) -> None:
        p = self.protocol
        extra = {"start": str(self.start.path), "inputs": self.inputs, "state": asdict(state), **p.config_extra()}
        configs = (self.recipe, self.config, extra)
        write_checkpoint(dest, p.model, p.processor, self.start.path, configs, also=p.write_beside)

    def _save_checkpoint(self, optimizer, scheduler, state: TrainState) -> None:
        tmp = self.ckpt.with_name("checkpoint.tmp")
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            self._write_model(tmp, state)
            self.protocol.save_state(tmp)
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / OPTIM_FILE)
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
        return TrainState.from_dict(json.loads((self.ckpt / STATE_FILE).read_text()))

    # ---- evaluation -----------------------------------------------------------------------------

    def _validate(self, state: TrainState, epoch: float) -> None:
        if not self.protocol.validates:
            return
        if self.acc.is_main_process:
            result = self.protocol.validate(state.stage)
            entry: dict[str, Any] = {"type": "eval", "step": state.global_step, "stage": state.stage}
            entry["epoch"] = round(epoch, 4)
            if result.score is not None:
                entry["score"] = round(result.score, 6)
            entry.update(result.metrics)
            state.evals.append(entry)
            self._log(entry)
            if result.score is not None and result.score > state.best_score:
                state.best_score, state.best_step = result.score, state.global_step
                self._write_model(self.out / "best", state)
            better = result.watched > state.best_watched
            state.best_watched, state.stale = (result.watched, 0) if better else (state.best_watched, state.stale + 1)
            self.protocol.train_mode(state.stage)
        self.acc.wait_for_everyone()

    def _patience_over(self, state: TrainState) -> bool:
        """Whether the watched value has not improved for ``patience`` validations (every process agrees)."""
        stale = torch.tensor([state.stale], device=self.acc.device)
        state.stale = int(self.acc.gather(stale).max().item())  # only the main process validates
        over = self.config.patience is not None and state.stale >= self.config.patience
        if over:
            reason = self.protocol.stale_reason(state.best_watched, state.stale)
            self._log({"type": "early_stop", "step": state.global_step, "reason": reason})
        return over

    # ---- the loop -------------------------------------------------------------------------------

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Train every stage (or continue ``OUT/checkpoint`` with ``resume``); returns the run's summary."""
        state, resuming = self._begin(resume)
        if state.finished:
            return self._summary(state)
        self._build(resuming)
        plan = self._plan()
        self._open_logs()
        bar = progress_bar(sum(plan.totals), self.recipe.name, self.progress, initial=state.global_step)
        stats = GradStats(self.protocol.model, self.config.grad_window, groups=self.protocol.grad_groups())
        started = time.time()
        stop, restore = False, resuming
        for si in range(state.stage, len(self.recipe.stages)):
            if si != state.stage:
                state.stage, state.stage_step = si, 0
            stop, optimizer, scheduler = self._run_stage(si, state, plan, stats, bar, restore and state.stage_step > 0)
            restore = False
            if stop:
                break
        bar.close()
        self._end(state, plan, stop, optimizer, scheduler, started)
        return self._summary(state)

    def _begin(self, resume: bool) -> tuple[TrainState, bool]:
        """The state to start from, and whether it comes from ``OUT/checkpoint``."""
        resuming = resume and (self.ckpt / STATE_FILE).is_file()
        if not resuming and self.acc.is_main_process and (self.out / "last").exists():
            raise ReefcapError(f"{self.out} already holds a finished run; pass --resume or choose another --out")
        state = self._load_state() if resuming else TrainState()
        if not state.finished and state.stage >= len(self.recipe.stages):
            raise ReefcapError(f"the run stopped in stage {state.stage + 1}; recipe {self.recipe.name!r} has fewer")
        return state, resuming

    def _build(self, resuming: bool) -> None:
        """The protocol's model state, then the RNG: seeded afresh, or exactly as the checkpoint left it."""
        acc = self.acc
        self.protocol.build(self.start, acc, self.ckpt if resuming else None)
        if resuming:
            self.protocol.load_state(self.ckpt)
        torch.manual_seed(self.config.seed + acc.process_index)
        if resuming:
            rng = torch.load(self.ckpt / f"rng-{acc.process_index}.pt", weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])

    def _plan(self) -> Plan:
        cfg, acc = self.config, self.acc
        size = self.protocol.processor.image_processor.size["height"]
        transform = TrainTransform(size, cfg.augment)
        stages = range(len(self.recipe.stages))
        batches = [self.protocol.stage_batches(si, transform, acc.process_index, acc.num_processes) for si in stages]
        per_epoch = [max(1, len(b) // cfg.grad_accum) for b in batches]
        totals = [max(1, round(s.epochs * n)) for s, n in zip(self.recipe.stages, per_epoch, strict=True)]
        return Plan(batches, per_epoch, totals)

    def _run_stage(self, si: int, state: TrainState, plan: Plan, stats: GradStats, bar, restore: bool):
        """Stage ``si`` from ``state.stage_step`` on; returns ``(stop, optimizer, scheduler)``."""
        stage, total = self.recipe.stages[si], plan.totals[si]
        objective, groups, fields = self.protocol.begin_stage(si)
        self.protocol.train_mode(si)
        entry = {"type": "stage", "step": state.global_step, "stage": si, "name": stage.name, "steps": total}
        self._log({**entry, "steps_per_epoch": plan.steps_per_epoch[si], **fields})
        optimizer, scheduler = self._optimizer(groups, stage, total, restore)
        wrapped, optimizer = self.acc.prepare(objective, optimizer)
        stats.reset()
        stop = False
        while state.stage_step < total and not stop:
            entry = self._step(wrapped, optimizer, scheduler, plan.batches[si], stats, state, si)
            state.stage_step += 1
            state.global_step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{entry['loss']:.3f}", stage=stage.name, refresh=False)  # redraw at its interval
            self._log(entry)
            stop = self._after_step(si, state, plan, optimizer, scheduler)
        # A --max-steps stop leaves the stage open: the resume runs its end, from the checkpoint just written.
        if not stop or state.stopped_early:
            self.protocol.end_stage(si)
        return stop, optimizer, scheduler

    def _after_step(self, si: int, state: TrainState, plan: Plan, optimizer, scheduler) -> bool:
        """Validate and checkpoint when due; returns whether the run stops here (max steps or patience)."""
        cfg, total = self.config, plan.totals[si]
        epoch = state.stage_step / plan.steps_per_epoch[si]
        run_done = si == len(self.recipe.stages) - 1 and state.stage_step == total
        at_max = cfg.max_steps is not None and state.global_step >= cfg.max_steps and not run_done
        eval_every = max(1, round(cfg.eval_every_epochs * plan.steps_per_epoch[si]))
        due = state.stage_step % eval_every == 0 or state.stage_step == total
        if due or at_max:
            if due or self.protocol.validate_at_stop:
                self._validate(state, epoch)
                state.stopped_early = self._patience_over(state) and not run_done
                at_max = at_max or state.stopped_early
            self._save_checkpoint(optimizer, scheduler, state)
        elif cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0:
            self._save_checkpoint(optimizer, scheduler, state)
        return at_max

    def _end(self, state: TrainState, plan: Plan, stop: bool, optimizer, scheduler, started: float) -> None:
        """The last checkpoint, ``OUT/last`` (and ``OUT/best`` when nothing was selected), the end of the log."""
        acc = self.acc
        state.finished = not stop or state.stopped_early
        if state.finished:
            state.stage_step = plan.totals[-1]
        self.protocol.model.eval()
        if state.finished and acc.is_main_process:
            state.results = self.protocol.finish()
        self._save_checkpoint(optimizer, scheduler, state)
        if acc.is_main_process:
            self._write_model(self.out / "last", state)
            if state.best_step < 0:  # nothing selected on validation: the last model is the selected one
                self._write_model(self.out / "best", state)
            seconds = round(time.time() - started, 2)
            self._log({"type": "end", "step": state.global_step, "seconds": seconds, **state.results})
            self._close_logs()
        acc.wait_for_everyone()

    def _optimizer(self, groups: list[dict], stage: StageConfig, total: int, restore: bool):
        """A stage's AdamW and lr schedule; with ``restore``, their state from ``OUT/checkpoint``."""
        optimizer = torch.optim.AdamW(groups, lr=stage.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(stage, total))
        if not restore:
            return optimizer, scheduler
        wanted = [(g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups]
        saved = torch.load(self.ckpt / OPTIM_FILE, weights_only=True)
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

    def _step(self, wrapped, optimizer, scheduler, batches, stats: GradStats, state: TrainState, si: int) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns its ``train`` log entry."""
        acc, cfg, protocol = self.acc, self.config, self.protocol
        n = len(batches)
        parts: dict[str, float] = {}
        for j in range(cfg.grad_accum):
            micro = state.stage_step * cfg.grad_accum + j
            epoch, k = divmod(micro, n)
            batch = {key: v.to(acc.device) for key, v in batches.batch(si * 100_000 + epoch, k).items()}
            batch = protocol.extend_batch(batch, state.global_step * cfg.grad_accum + j)
            last = j == cfg.grad_accum - 1
            ctx = acc.no_sync(wrapped) if not last else contextlib.nullcontext()
            with ctx, acc.autocast():
                loss, micro_parts = protocol.loss(wrapped, batch, last, cfg.grad_accum)
                acc.backward(loss / cfg.grad_accum)
            for key, value in micro_parts.items():
                parts[key] = parts.get(key, 0.0) + value
        scale = acc.scaler.get_scale() if acc.scaler is not None else 1.0
        grads = stats.update(scale)
        params = acc.unwrap_model(wrapped).parameters()  # the objective's: the model's, and a protocol's own
        total_norm = acc.clip_grad_norm_(params, cfg.clip_norm) if cfg.clip_norm > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        entry = {"type": "train", "step": state.global_step + 1, "stage": si, "lr": scheduler.get_last_lr()[0]}
        entry.update(protocol.log_fields(parts))
        entry.update(grads)
        if total_norm is not None:
            entry["grad_norm/total"] = float(total_norm)
        return entry

    # ---- logging --------------------------------------------------------------------------------

    def _open_logs(self) -> None:
        if not self.acc.is_main_process:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.out.mkdir(parents=True, exist_ok=True)
        self._writer, self._logf = SummaryWriter(str(self.out / "tb")), (self.out / "log.jsonl").open("a")

    def _log(self, entry: dict[str, Any]) -> None:
        if self._logf is None:  # not the main process
            return
        self._logf.write(json.dumps(entry) + "\n")
        self._logf.flush()
        for k, v in entry.items():
            if isinstance(v, (int, float)) and k not in ("step", "stage"):
                self._writer.add_scalar(f"{entry.get('type', 'train')}/{k}", v, entry["step"])

    def _close_logs(self) -> None:
        self._writer.close()
        self._logf.close()
        self._writer = self._logf = None

    def _summary(self, state: TrainState) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "steps": state.global_step,
            "finished": state.finished,
            "best_step": state.best_step,
            "best_score": state.best_score if state.best_step >= 0 else None,
            "stopped_early": state.stopped_early,
            "evals": state.evals,
            **state.results,
        }
