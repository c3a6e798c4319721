"""Throughput benchmark of the caption engines against the naive baseline, measured in one run.

Every engine captions the same in-memory photos (decoding JPEGs is left out; preprocessing is in) with greedy
decoding at a fixed caption length (``min_length == max_length``), so models with random weights, which may
never emit EOS or emit it at once, cost the same per image on every backend. The naive baseline is what a
newcomer writes: a transformers ``pipeline("image-text-to-text")`` called once per image with the same prompt
and number of new tokens.

Each (engine, batch size) cell runs whole batches until ``budget_s`` seconds have passed or ``repeats``
batches ran; the first batch of a cell is a warm-up and is dropped whenever more than one ran. Images/s come
from the fastest timed batch (as ``timeit`` does): on a machine shared with other jobs the slower batches
measure the neighbours more than the engine. The median batch latency is reported too.
"""

from __future__ import annotations

import functools
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from reefcap.models.engines.base import DecodeOptions, EngineConfig


@dataclass(frozen=True)
class BenchRow:
    model: str
    engine: str  # "naive pipeline" | "torch" | "onnx"
    device: str
    precision: str
    batch: int
    images_per_s: float
    batch_latency_ms: float  # median over timed batches
    batches: int
    speedup: float | None = None  # images/s over the naive baseline's, same model, same run

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _time_cell(
    run: Callable[[list[Image.Image]], Any], images: list[Image.Image], batch: int, budget_s: float, repeats: int
) -> tuple[float, float, int]:
    inputs = [images[i % len(images)] for i in range(batch)]
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < repeats and (not times or time.perf_counter() - started < budget_s):
        t0 = time.perf_counter()
        run(inputs)
        times.append(time.perf_counter() - t0)
    timed = times[1:] if len(times) > 1 else times
    return batch / min(timed), statistics.median(timed) * 1000, len(timed)


def naive_pipeline(model_path: Path, options: DecodeOptions, device: str = "cpu") -> Callable[[list[Image.Image]], Any]:
    """The newcomer's loop: the transformers pipeline, one image per call, greedy, fixed number of new tokens."""
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=str(model_path), device=device)
    prompt_tokens = len(pipe.tokenizer(options.prompt)["input_ids"]) - 1  # [DEC] + words, as BLIP counts them
    new = options.max_length - prompt_tokens

    def run(images: list[Image.Image]) -> None:
        for image in images:
            pipe(images=image, text=options.prompt, max_new_tokens=new, generate_kwargs={"min_new_tokens": new})

    return run


def _caption(engine: Any, options: DecodeOptions, images: list[Image.Image]) -> None:
    engine.caption(images, options)


def engine_variants(torch_cuda: bool, ort_cuda: bool) -> list[tuple[str, str, str]]:
    """(backend, device, dtype) triples to measure: the CPU ones, plus GPU ones where a GPU is usable."""
    variants = [("torch", "cpu", "fp32"), ("torch", "cpu", "bf16"), ("onnx", "cpu", "fp32"), ("onnx", "cpu", "int8")]
    if torch_cuda:
        variants += [("torch", "cuda", "fp16"), ("torch", "cuda", "bf16")]
    if ort_cuda:
        variants += [("onnx", "cuda", "fp16")]
    return variants


def gpu_available() -> tuple[bool, bool]:
    """(torch sees CUDA, onnxruntime has the CUDA execution provider)."""
    import onnxruntime as ort
    import torch

    return torch.cuda.is_available(), "CUDAExecutionProvider" in ort.get_available_providers()


def run_bench(
    model: str,
    images: Sequence[Path],
    batch_sizes: Sequence[int],
    *,
    caption_length: int = 20,
    budget_s: float = 10.0,
    repeats: int = 5,
    naive_images: int = 4,
    variants: Sequence[tuple[str, str, str]] | None = None,
    log: Callable[[BenchRow], None] | None = None,
) -> list[BenchRow]:
    """Measure every variant at every batch size, and the naive baseline, on ``model``; returns the rows."""
    from reefcap.models.engines.loader import load_engine
    from reefcap.models.registry import resolve_model

    resolved = resolve_model(model)
    photos = [Image.open(p).convert("RGB") for p in images]
    options = DecodeOptions.greedy(min_length=caption_length, max_length=caption_length)
    torch_cuda, ort_cuda = gpu_available()
    if variants is None:
        variants = engine_variants(torch_cuda, ort_cuda)
    rows: list[BenchRow] = []

    def add(row: BenchRow) -> None:
        rows.append(row)
        if log:
            log(row)

    # On a GPU machine the newcomer would put the pipeline on the GPU too.
    naive_device = "cuda" if torch_cuda else "cpu"
    naive = naive_pipeline(resolved.path, options, naive_device)
    naive([photos[0]])  # warm-up: first call builds caches and picks kernels
    ips, ms, n = _time_cell(naive, photos, 1, budget_s, max(naive_images, 2))
    add(BenchRow(resolved.name, "naive pipeline", naive_device, "fp32", 1, ips, ms, n, 1.0))
    base = ips
    for backend, device, dtype in variants:
        engine = load_engine(str(resolved.path), EngineConfig(backend=backend, device=device, dtype=dtype))
        run = functools.partial(_caption, engine, options)
        try:
            run(photos[:1])  # warm-up outside the timed cells
            for batch in batch_sizes:
                ips, ms, n = _time_cell(run, photos, batch, budget_s, repeats)
                add(BenchRow(resolved.name, backend, device, dtype, batch, ips, ms, n, ips / base))
        finally:
            engine.close()
    return rows


def machine_note() -> str:
    import onnxruntime as ort
    import torch

    cpu, isa = platform.processor() or platform.machine(), ""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            cpu = value.strip()
        elif key.strip() == "flags":  # int8 speed and kernels depend on these (docs/onnx-parity.md)
            flags = value.split()
            isa = " (" + ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f in flags) + ")"
            break
    return (
        f"{cpu}{isa}, {os.cpu_count()} logical cores; torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"onnxruntime {ort.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )


def markdown(rows: Sequence[BenchRow], note: str, caption_length: int) -> str:
    lines = [
        "| model | engine | device | precision | batch | images/s (best batch) | batch latency p50 (ms) | x naive |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        speed = f"{r.speedup:.1f}" if r.speedup is not None else "-"
        lines.append(
            f"| {r.model} | {r.engine} | {r.device} | {r.precision} | {r.batch} | {r.images_per_s:.2f} "
            f"| {r.batch_latency_ms:.0f} | {speed} |"
        )
    best: dict[str, BenchRow] = {}
    for r in rows:
        if r.engine != "naive pipeline" and (r.model not in best or r.images_per_s > best[r.model].images_per_s):
            best[r.model] = r
    summary = [
        f"- **{m}**: best {b.engine} {b.precision} at batch {b.batch}: {b.images_per_s:.2f} images/s, "
        f"{b.speedup:.1f}x the naive pipeline"
        for m, b in best.items()
    ]
    head = (
        f"Greedy decoding, fixed caption length {caption_length} tokens (prompt included), images already "
        f"decoded, preprocessing timed. Machine: {note}."
    )
    return "\n".join([head, "", *summary, "", *lines, ""])
