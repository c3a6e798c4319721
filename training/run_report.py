"""The report of one training run, written beside its checkpoints: ``OUT/report.md`` with two PNGs.

- ``report-curves.png``: training loss per step (raw and smoothed, with the stage boundaries) and the validation
  CIDEr and BLEU-4 of every evaluation, the selected step marked.
- ``report-captions.png``: a grid of validation images with the selected model's caption and a reference.

The markdown names the best step, the scores the manifest holds, and whether the run stopped early.
TensorBoard (``OUT/tb``) keeps every logged number; this is the page a reviewer opens first.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from reefcap.models.reefscenes.realism import caption_cell

GRID_IMAGES = 8


def read_log(out: Path) -> list[dict[str, Any]]:
    """The entries of ``OUT/log.jsonl`` (empty when the run logged nothing)."""
    log = out / "log.jsonl"
    if not log.is_file():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def curves(entries: list[dict[str, Any]], path: Path) -> Path:
    """Training loss and validation CIDEr / BLEU-4 against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [e for e in entries if e.get("type") == "train"]
    # Caption-metric validations only: GuiDG's stage 1 logs per-domain validation losses under "eval" too.
    evals = [e for e in entries if e.get("type") == "eval" and "CIDEr" in e]
    stages = [e for e in entries if e.get("type") == "stage" and e.get("step", 0) > 0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    steps, loss = [e["step"] for e in train], [e["loss"] for e in train]
    axes[0].plot(steps, loss, color="C0", alpha=0.3, lw=0.8, label="loss")
    axes[0].plot(steps, _smooth(loss, max(1, len(loss) // 50)), color="C0", lw=1.6, label="smoothed")
    axes[0].set_title("training loss (caption)")
    if evals:
        e_steps = [e["step"] for e in evals]
        axes[1].plot(e_steps, [e["CIDEr"] for e in evals], marker="o", color="C1", label="CIDEr")
        axes[1].plot(e_steps, [e["Bleu_4"] for e in evals], marker="s", color="C2", label="BLEU-4")
        best = max(evals, key=lambda e: e.get("score", -1.0))
        axes[1].axvline(best["step"], color="grey", ls=":", label=f"selected (step {best['step']})")
    axes[1].set_title("validation")
    for ax in axes:
        for s in stages:
            ax.axvline(s["step"], color="black", lw=0.6, alpha=0.4)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def caption_grid(records: Sequence, predictions: Sequence[dict[str, Any]], path: Path, cell: int = 160) -> Path:
    """The first :data:`GRID_IMAGES` validation images, each with "pred: ..." and "ref: ..." under it."""
    by_id = {p["image_id"]: p["caption"] for p in predictions}
    shown = [r for r in records if r.image_id in by_id][:GRID_IMAGES]
    cells = []
    for rec in shown:
        with Image.open(rec.path) as img:
            text = f"pred: {by_id[rec.image_id]} | ref: {rec.captions[0] if rec.captions else ''}"
            cells.append(caption_cell(img.convert("RGB"), text, cell, lines=6))
    cols = min(4, max(1, len(cells)))
    rows = max(1, -(-len(cells) // cols))
    height = cells[0].height if cells else cell
    grid = Image.new("RGB", (cols * cell, rows * height), "white")
    for i, c in enumerate(cells):
        grid.paste(c, ((i % cols) * cell, (i // cols) * height))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _metrics_table(metrics: dict[str, dict[str, float]]) -> list[str]:
    keys = ("Bleu_4", "ROUGE_L", "CIDEr", "repetition_rate", "empty_or_one_word", "images")
    lines = ["| split | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for split, values in metrics.items():
        cells = [f"{values[k]:.3f}" if isinstance(values.get(k), float) else str(values.get(k, "-")) for k in keys]
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    return lines


def write_run_report(
    out: Path, val_records: Sequence, val_predictions: Sequence[dict[str, Any]], metrics: dict[str, dict[str, float]]
) -> Path:
    """Write ``OUT/report.md`` with its curves and caption grid; returns the markdown's path."""
    entries = read_log(out)
    figures = [curves(entries, out / "report-curves.png")]
    if val_predictions:
        figures.append(caption_grid(val_records, val_predictions, out / "report-captions.png"))
    # Caption-metric validations only: GuiDG's stage 1 logs per-domain validation losses under "eval" too.
    evals = [e for e in entries if e.get("type") == "eval" and "CIDEr" in e]
    best = max(evals, key=lambda e: e.get("score", -1.0)) if evals else None
    early = [e for e in entries if e.get("type") == "early_stop"]
    end = next((e for e in reversed(entries) if e.get("type") == "end"), {})
    lines = [
        f"# Training run `{out.name}`",
        "",
        f"{sum(e.get('type') == 'train' for e in entries)} optimizer steps in {end.get('seconds', '?')} s; "
        f"{len(evals)} validations"
        + (f"; selected step {best['step']} (validation CIDEr {best['CIDEr']:.3f})" if best else "")
        + (f"; stopped early at step {early[-1]['step']} ({early[-1]['reason']})" if early else "")
        + ".",
        "",
        "Scores of the selected checkpoint (`best/manifest.json`; pycocoevalcap fractions, METEOR left out):",
        "",
        *_metrics_table(metrics),
        "",
        *[f"![{p.stem}]({p.name})" for p in figures],
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
