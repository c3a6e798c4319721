"""The measuring half of ``make gpu-check``: runs in a worker process that :mod:`.gpu_check` starts and watches.

Each section (parity, throughput, training) returns ``{"rows": [...], "notes": [...]}`` and is appended to a
progress file as one JSON line when it ends, with its error if it raised, so the watcher can write the report
and, if this process hangs or dies (CUDA faults poison the whole process), kill it and start a new worker for
the sections still to run. Sections stop starting new cells once ``deadline`` (a soft time box set below the
watcher's hard limit) has passed and say what they skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from reefcap.bench.gpu_check import Plan

GIB = 1024**3
SOFT_FRACTION = 0.75  # of a section's hard budget: past it, no new cell or step starts


def _emit(progress: Path, record: dict[str, Any]) -> None:
    with progress.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def load_photos(folder: str, fallback: int = 23) -> tuple[list, str]:
    """The sample photos in ``folder`` (numeric names in numeric order), or seeded noise images if there are none."""
    import numpy as np
    from PIL import Image

    path = Path(folder)
    files = sorted(
        (p for p in path.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")),
        key=lambda p: (not p.stem.isdigit(), int(p.stem) if p.stem.isdigit() else 0, p.name),
    )
    if files:
        return [Image.open(p).convert("RGB") for p in files], f"{len(files)} photos from {path}"
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(fallback)]
    return images, f"{fallback} generated noise images ({path} not found)"


def model_path(name: str, work: str) -> str:
    """A zoo name or folder as is; a factory kind (``blip-base-shape``) is built once under ``work``."""
    from reefcap.models.factory import FACTORIES

    if name not in FACTORIES:
        return name
    out = Path(work) / name
    if not (out / "config.json").is_file():
        tmp = out.with_name(name + ".tmp")
        FACTORIES[name](tmp)
        tmp.rename(out)  # whole or absent: a worker killed mid-write leaves only the .tmp folder
    return str(out)


def vision_flops(config: Any) -> float:
    """Forward FLOPs of the ViT image encoder per image (2 per multiply-add; 110 G for ViT-B/16 at 384 px).

    Per layer: QKV and output projections 4nh^2, MLP 2nhf, attention scores and mixing 2n^2h multiply-adds,
    over n = patches + 1 tokens; plus the patch embedding. The text decoder is left out: the roof fraction is
    the encoder's share only, so it is a lower bound of how busy the GPU was.
    """
    v = config.vision_config
    patches = (v.image_size // v.patch_size) ** 2
    n, h, f = patches + 1, v.hidden_size, v.intermediate_size
    per_layer = 4 * n * h * h + 2 * n * h * f + 2 * n * n * h
    embed = patches * 3 * v.patch_size**2 * h
    return 2.0 * (v.num_hidden_layers * per_layer + embed)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | str:
    if not device.startswith("cuda"):
        return "n/a (cpu)"
    import torch

    return round(torch.cuda.max_memory_allocated() / GIB, 2)


def environment() -> dict[str, Any]:
    """Versions and the accelerator, for the report's header."""
    import onnxruntime
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "transformers": transformers.__version__,
        "onnxruntime": onnxruntime.__version__,
        "gpu": gpu,
        "cpus": os.cpu_count(),
    }


def parity(plan: Plan, deadline: float) -> dict[str, Any]:
    """Greedy captions of each bundled model on ``plan.device`` in every dtype, against CPU fp32."""
    from reefcap.models.engines.base import DecodeOptions, EngineConfig
    from reefcap.models.engines.loader import load_engine

    photos, source = load_photos(plan.images)
    options = DecodeOptions.greedy()
    rows, notes = [], [f"Images: {source}. Greedy decoding, default length (20 tokens with the prompt)."]

    def captions(model: str, device: str, dtype: str) -> list[str]:
        engine = load_engine(model, EngineConfig(backend="torch", device=device, dtype=dtype))
        try:
            return [c.caption for c in engine.caption(photos, options)]
        finally:
            engine.close()

    for model in plan.parity_models:
        ref = captions(model, "cpu", "fp32")
        for dtype in plan.parity_dtypes:
            row = {"model": model, "device": plan.device, "dtype": dtype}
            if plan.device == "cpu" and dtype != "fp32":
                rows.append({**row, "identical to cpu fp32": "n/a on cpu", "distinct captions": "-"})
                continue
            if time.monotonic() > deadline:
                rows.append({**row, "identical to cpu fp32": "skipped (time box)", "distinct captions": "-"})
                continue
            got = captions(model, plan.device, dtype)
            same = sum(a == b for a, b in zip(ref, got, strict=True))
            rows.append({**row, "identical to cpu fp32": f"{same}/{len(ref)}", "distinct captions": len(set(got))})
            for i, (a, b) in enumerate(zip(ref, got, strict=True)):
                if a != b and len(notes) < 7:
                    notes.append(f"{model} {dtype} image {i + 1}: cpu fp32 {a!r} vs {b!r}")
    return {"rows": rows, "notes": notes}


def throughput(plan: Plan, deadline: float) -> dict[str, Any]:
    """Images/s of greedy fixed-length decoding per (dtype, batch), with peak GPU memory and roof fraction."""
    from reefcap.models.engines.base import DecodeOptions, EngineConfig
    from reefcap.models.engines.loader import load_engine

    photos, source = load_photos(plan.images)
    path = model_path(plan.bench_model, plan.work)
    # min_length == max_length, as `reefcap bench` does: random weights would otherwise stop at any length.
    options = DecodeOptions.greedy(min_length=plan.caption_length, max_length=plan.caption_length)
    rows: list[dict[str, Any]] = []
    flops = None
    for dtype in plan.bench_dtypes:
        engine = load_engine(path, EngineConfig(backend="torch", device=plan.device, dtype=dtype))
        flops = vision_flops(engine.model.config)
        try:
            engine.caption(photos[:1], options)  # first call picks kernels and fills caches
            for batch in plan.bench_batches:
                row = {"model": plan.bench_model, "dtype": dtype, "batch": batch}
                if time.monotonic() > deadline:
                    rows.append({**row, "images/s": "skipped (time box)"})
                    continue
                rows.append({**row, **_time_cell(engine, photos, batch, options, plan, flops)})
        finally:
            engine.close()
    notes = [
        f"Images: {source}, cycled to fill each batch. Greedy, fixed caption length {plan.caption_length} tokens "
        "(prompt included). images/s times `engine.generate` on a batch preprocessed once (GPU work plus the "
        "host-to-device copy and decoding the tokens); `preprocess ms` is the CPU cost of that batch, paid once per "
        "batch by `engine.caption`. Best of the timed batches after one warm-up batch per cell.",
        f"Roof fraction = images/s x {flops / 1e9:.3g} GFLOP (image encoder forward per image) / "
        f"{plan.roof_flops / 1e12:.0f} TFLOP/s (H100 dense bf16 roof); the text decoder's work is not counted.",
        "Peak memory: torch.cuda.max_memory_allocated, reset before each cell (weights included).",
    ]
    return {"rows": rows, "notes": notes}


def _time_cell(engine, photos, batch: int, options, plan: Plan, flops: float) -> dict[str, Any]:
    images = [photos[i % len(photos)] for i in range(batch)]
    t0 = time.perf_counter()
    pixels = engine.preprocess(images)
    pre_ms = (time.perf_counter() - t0) * 1000
    _reset_peak(plan.device)
    times, tokens = [], set()
    started = time.perf_counter()
    for i in range(plan.bench_repeats + 1):  # the first is a warm-up at this batch shape
        t0 = time.perf_counter()
        captions = engine.generate(pixels, options)
        _sync(plan.device)
        if i:
            times.append(time.perf_counter() - t0)
        tokens.update(c.tokens for c in captions)
        if len(captions) != batch:
            raise RuntimeError(f"{len(captions)} captions for a batch of {batch}")
        if i and time.perf_counter() - started > plan.cell_budget_s:
            break
    ips = batch / min(times)
    return {
        "images/s": round(ips, 2),
        "batch ms p50": round(statistics.median(times) * 1000, 1),
        "preprocess ms": round(pre_ms, 1),
        "roof fraction": f"{100 * ips * flops / plan.roof_flops:.3g}%",
        "peak GiB": _peak_gib(plan.device),
        "tokens/caption": ",".join(map(str, sorted(tokens))),
        "timed": len(times),
    }


class SyntheticBatches:
    """Stands in for :class:`~.data.CaptionBatches` in ``Trainer._step``: one fixed batch, so the time is the step's."""

    def __init__(self, batch: dict[str, Any]) -> None:
        self._batch = batch

    def __len__(self) -> int:
        return 1_000_000  # never wraps into a new "epoch" within a check

    def batch(self, epoch: int, k: int) -> dict[str, Any]:
        return self._batch


def _synthetic_batch(processor, batch_size: int, cfg) -> dict[str, Any]:
    import torch

    from reefcap.models.factory import DEFAULT_CORPUS
    from reefcap.training.labels import build_targets

    size = processor.image_processor.size["height"]
    gen = torch.Generator().manual_seed(0)
    captions = [DEFAULT_CORPUS[i % len(DEFAULT_CORPUS)] for i in range(batch_size)]
    targets = build_targets(processor.tokenizer, captions, max_words=cfg.max_words, max_len=cfg.max_text_len)
    return {"pixel_values": torch.randn(batch_size, 3, size, size, generator=gen), **targets}


def training(plan: Plan, deadline: float) -> dict[str, Any]:
    """Optimizer steps of each stage of ``plan.train_recipe`` through the project's Trainer, bf16 autocast."""
    from reefcap.training.config import AugmentConfig, TrainConfig, load_recipe
    from reefcap.training.gradstats import GradStats
    from reefcap.training.trainer import Trainer, TrainState

    recipe = load_recipe(plan.train_recipe)
    cfg = TrainConfig(
        batch_size=plan.train_batch, mixed_precision="bf16", device=plan.device, augment=AugmentConfig(enabled=False)
    )
    path = model_path(plan.train_model, plan.work)
    trainer = Trainer(path, recipe, cfg, Path(plan.work) / "train", train_records=[], progress=False)
    trainer.protocol.build(trainer.start, trainer.acc)  # the model as Trainer.run loads it
    model, processor = trainer.protocol.model, trainer.protocol.processor
    batches = SyntheticBatches(_synthetic_batch(processor, plan.train_batch, cfg))
    stats, state = GradStats(model, cfg.grad_window), TrainState()
    rows = [_train_stage(plan, deadline, trainer, model, batches, stats, state, si) for si in range(len(recipe.stages))]
    notes = [
        f"Recipe `{recipe.name}` ({recipe.description}) on {plan.train_model}; TrainConfig mixed_precision=bf16 "
        f"through Accelerate, AdamW, clipping at {cfg.clip_norm}, the real `Trainer._step`. Synthetic batch: "
        f"random pixels and {plan.train_batch} ReefScenes-style captions, the same batch every step (data loading "
        f"and augmentation are not timed). Untimed warm-up steps per stage: {plan.train_warmup}.",
        "Peak memory is reset before each stage. Stage 2's includes stage 1's AdamW state, as in a real run: "
        "the Trainer's Accelerator keeps every optimizer it prepared referenced.",
    ]
    return {"rows": rows, "notes": notes}


def _train_stage(plan: Plan, deadline: float, trainer, model, batches, stats, state, si: int) -> dict[str, Any]:
    import torch

    from reefcap.training.params import schedule

    stage = trainer.recipe.stages[si]
    # As Trainer.run sets up each stage: the protocol freezes to the stage's groups, fresh AdamW + schedule, prepare.
    objective, groups, fields = trainer.protocol.begin_stage(si)
    counts = {k: v for k, v in fields.items() if k.startswith("trainable/")}
    optimizer = torch.optim.AdamW(groups, lr=stage.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(stage, plan.train_steps))
    wrapped, optimizer = trainer.acc.prepare(objective, optimizer)
    stats.reset()
    state.stage, state.stage_step = si, 0
    _reset_peak(plan.device)
    times, losses = [], []
    for step in range(plan.train_steps):
        if step > plan.train_warmup and time.monotonic() > deadline:
            break
        t0 = time.perf_counter()
        entry = trainer._step(wrapped, optimizer, scheduler, batches, stats, state, si)
        _sync(plan.device)
        if step >= plan.train_warmup:  # the first steps allocate optimizer state and pick kernels
            times.append(time.perf_counter() - t0)
        losses.append(entry["loss"])
        state.stage_step += 1
        state.global_step += 1
    step_s = statistics.median(times)
    return {
        "stage": f"{si + 1} {stage.name}",
        "groups": "+".join(stage.groups),
        "trainable M": round(sum(counts.values()) / 1e6, 1),
        "batch": plan.train_batch,
        "samples/s": round(plan.train_batch / step_s, 2),
        "step ms p50": round(step_s * 1000, 1),
        "timed steps": len(times),
        "peak GiB": _peak_gib(plan.device),
        "loss first -> last": f"{losses[0]:.3f} -> {losses[-1]:.3f}",
    }


SECTIONS = {"parity": parity, "throughput": throughput, "training": training}


def main(argv: list[str] | None = None) -> int:
    """Run the named sections of a plan in order, appending one JSON line per event to the progress file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", required=True, type=Path)
    parser.add_argument("--progress", required=True, type=Path)
    parser.add_argument("--sections", required=True)
    args = parser.parse_args(argv)
    plan = Plan.from_json(args.plan.read_text())
    _emit(args.progress, {"event": "env", "env": environment()})
    for name in args.sections.split(","):
        started = time.monotonic()
        _emit(args.progress, {"event": "start", "section": name})
        record: dict[str, Any] = {"event": "done", "section": name, "ok": True}
        try:
            record["result"] = SECTIONS[name](plan, started + SOFT_FRACTION * plan.budgets[name])
        except Exception as exc:  # recorded in the report; the next section still runs
            record.update(ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-3000:])
        record["seconds"] = round(time.monotonic() - started, 1)
        _emit(args.progress, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
