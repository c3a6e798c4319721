"""Protocol comparison: train every recipe from the same start with several seeds, evaluate each selected
model on the underwater test split and the in-air test split (forgetting), and write a Markdown report with
mean +- std tables and PNG plots (validation metrics per epoch, gradient-norm variance per group).

Runs already finished in ``--work`` are reused, so an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import json
import shlex
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from reefcap.models.errors import ReefcapError

from .config import GROUPS, TrainConfig, load_recipe
from .evaluation import write_json
from .frontier import FrontierConfig
from .runs import RunInputs, run_training, scaled_recipe

TABLE_UNDERWATER = ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
TABLE_COLLAPSE = ("repetition_rate", "distinct_2", "empty_or_one_word")
# Water domains for the per-domain columns: the grouping GuiDG's recipe declares (and explains).
DOMAIN_RECIPE = "guidg"
DOMAIN_KEY = "domains"  # per-domain scores of every split, under this key of an evaluation


def _evaluate(model: str | Path, splits: dict[str, Path], cache: Path, meteor: bool) -> dict[str, dict]:
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if DOMAIN_KEY in cached:  # made before per-domain scores: evaluate again
            return cached
    from reefcap.models.engines.loader import load_engine

    from .data import load_records
    from .evaluation import domain_metrics, evaluate

    domains = load_recipe(DOMAIN_RECIPE).experts.domains
    engine = load_engine(str(model), backend="torch")
    out: dict[str, dict] = {DOMAIN_KEY: {}}
    for name, path in splits.items():
        records = load_records(path)
        out[name], predictions = evaluate(engine, records, meteor=meteor)
        out[DOMAIN_KEY].update(domain_metrics(records, predictions, domains))
    write_json(cache, out)
    return out


def _read_log(run: Path) -> list[dict[str, Any]]:
    log = run / "log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}"


def _plots(runs: dict[str, list[Path]], out_dir: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for recipe, dirs in runs.items():
        for i, run in enumerate(dirs):
            # GuiDG's experts validate by loss: their evaluations have no CIDEr to draw here.
            evals = [e for e in _read_log(run) if e.get("type") == "eval" and "CIDEr" in e]
            if not evals:
                continue
            steps = [e["step"] for e in evals]
            kw = {"label": recipe if i == 0 else None, "alpha": 0.8, "color": f"C{list(runs).index(recipe)}"}
            axes[0].plot(steps, [e["CIDEr"] for e in evals], marker="o", **kw)
            axes[1].plot(steps, [e["Bleu_4"] for e in evals], marker="o", **kw)
    for ax, name in zip(axes, ("validation CIDEr", "validation BLEU-4"), strict=True):
        ax.set_xlabel("optimizer step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / f"{stem}-validation.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(GROUPS), figsize=(4 * len(GROUPS), 3.6), sharex=True)
    for recipe, dirs in runs.items():
        train = [e for e in _read_log(dirs[0]) if e.get("type") == "train"] if dirs else []
        for ax, group in zip(axes, GROUPS, strict=True):
            pts = [(e["step"], e[f"grad_var/{group}"]) for e in train if f"grad_var/{group}" in e]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=recipe, color=f"C{list(runs).index(recipe)}", lw=1)
    for ax, group in zip(axes, GROUPS, strict=True):
        ax.set_title(f"grad-norm variance: {group}")
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / f"{stem}-gradients.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


@dataclass(frozen=True)
class CompareConfig:
    """What `reefcap compare` runs and reports: recipes x seeds, test splits, where runs and report go."""

    recipes: tuple[str, ...]
    seeds: int
    test: str
    work: str
    report: str
    test_air: str | None = None
    title: str = "Protocol comparison"
    meteor: bool = True
    epochs_scale: float = 1.0
    lr_scale: float = 1.0
    first_seed: int = 0  # train only seeds first_seed..seeds-1 (a second process sharing the work of one grid)
    report_only: bool = False  # train nothing: report the runs already finished in `work`
    frontier: FrontierConfig = FrontierConfig()  # merges, routed systems, included models, the chosen default


def run_compare(
    compare: CompareConfig, config: TrainConfig, inputs: RunInputs, *, override: bool = False, progress: bool = True
) -> Path:
    """Train every recipe with seeds ``0..seeds-1`` (``config.seed`` is replaced), evaluate, write the report.

    A run with a checkpoint but no ``last/`` is resumed; its saved setup must match (or ``override``).
    """
    # Every name loaded first: a typo fails before any training.
    recipes = {
        n: scaled_recipe(load_recipe(n.partition("@")[0]), compare.epochs_scale, compare.lr_scale)
        for n in compare.recipes
    }
    for i, n in enumerate(compare.recipes):
        base = n.partition("@")[2]
        if base and base not in compare.recipes[:i]:
            raise ReefcapError(f"--recipes: {n} starts from {base}'s runs: list {base} before it")
    if any(r.preserve for r in recipes.values()) and not inputs.preserve_data:
        raise ReefcapError("a recipe with knowledge preservation is listed: pass --preserve-data (in-air captions)")
    if compare.seeds < 1:
        raise ReefcapError("--seeds must be >= 1")
    from .frontier import check_merge_names
    from .protocols import check_honoured

    for recipe in recipes.values():  # a run option some protocol cannot honour fails before any training
        check_honoured(recipe, config)
    check_merge_names(compare.frontier, compare.recipes)
    if compare.frontier.route and not (
        inputs.preserve_data and (compare.frontier.val or inputs.val) and compare.frontier.air_val
    ):
        raise ReefcapError("--route fits a router: pass --preserve-data, --val and --air-val (in-air validation)")
    work, report = Path(compare.work), Path(compare.report)
    splits = {"underwater": Path(compare.test)}
    if compare.test_air:
        splits["in-air"] = Path(compare.test_air)

    start_eval = _evaluate(inputs.model, splits, work / "start-eval.json", compare.meteor)
    results: dict[str, list[dict]] = {"start": [start_eval]}
    runs: dict[str, list[Path]] = {}
    # Seed-major, and the report rewritten after every run: an interrupted grid still reports what finished.
    for seed in range(compare.first_seed, compare.seeds):
        for name, recipe in recipes.items():
            out = work / name / f"seed{seed}"
            # NAME@BASE: the run starts from the same seed's BASE run (e.g. guidg@damf: experts on DAMF's model).
            base = name.partition("@")[2]
            run_inputs = replace(inputs, model=str(work / base / f"seed{seed}" / "best")) if base else inputs
            if compare.report_only and not (out / "last").is_dir():
                continue
            if not (out / "last").is_dir():
                resume = (out / "checkpoint").is_dir()
                run_config = replace(config, seed=seed)
                run_training(recipe, run_config, run_inputs, out, resume=resume, override=override, progress=progress)
            runs.setdefault(name, []).append(out)
            results.setdefault(name, []).append(_evaluate(out / "best", splits, out / "test-eval.json", compare.meteor))
            _write_report(compare, inputs, results, splits, runs)
    if compare.frontier.active:
        families = {n: "experts" if r.experts else n.partition("@")[0] for n, r in recipes.items()}
        _write_report(compare, inputs, results, splits, runs, _frontier(compare, inputs, splits, runs, families))
    return report


def _frontier(compare: CompareConfig, inputs: RunInputs, splits: dict, runs: dict, families: dict) -> list[str]:
    """Evaluate every frontier candidate (see :mod:`.frontier`) and return the report's frontier section."""
    from reefcap.models.engines.loader import load_engine

    from . import frontier_report as fr
    from .frontier import candidates, evaluate_candidate, fit_compare_router

    f, work = compare.frontier, Path(compare.work)
    val = f.val or inputs.val
    all_splits = dict(splits)
    if val and f.air_val:
        all_splits.update({"val-underwater": Path(val), "val-in-air": Path(f.air_val)})
    router, accuracy = None, None
    if f.route:
        router, accuracy = fit_compare_router(inputs.data, inputs.preserve_data, val, f.air_val, splits, work)
    start = load_engine(str(inputs.model), backend="torch")
    results: dict[str, list[dict]] = {}
    kinds: dict[str, str] = {}
    for c in candidates(f, inputs.model, runs, families, work):
        cache = work / "frontier" / f"{c.name.replace(' ', '_').replace('=', '')}-seed{c.seed or 0}.json"
        results.setdefault(c.name, []).append(evaluate_candidate(c, start, router, all_splits, cache))
        kinds[c.name] = c.family
    start.close()
    chosen, why = fr.select_default(results, f.keep_in_air)
    report = Path(compare.report)
    plot = fr.pareto_plot(results, kinds, chosen, report.parent / f"{report.stem}-pareto.png")
    write_json(report.with_name(report.stem + "-frontier.json"), {"results": results, "router": accuracy})
    return [
        "## Frontier: underwater against in-air CIDEr",
        "",
        f"![{plot.stem}]({plot.name})",
        "",
        *fr.pareto_table(results, kinds, chosen),
        "",
        f"Chosen default, by the rule: {why}.",
        "",
        *fr.mixed_lines(results, kinds, chosen),
        "",
        *fr.router_lines(accuracy, router.threshold if router else None),
        "",
    ]


def _write_report(compare: CompareConfig, inputs: RunInputs, results, splits, runs, extra=()) -> None:
    report = Path(compare.report)
    write_json(report.with_suffix(".json"), {"splits": {k: str(v) for k, v in splits.items()}, "results": results})
    plots = _plots(runs, report.parent, report.stem)
    report.write_text(_markdown(compare, inputs, results, splits, plots) + "\n".join(extra))


def _domain_table(results: dict[str, list[dict]]) -> list[str]:
    """Per water domain (the ``guidg`` recipe's grouping; ``in_air`` = the in-air test split): CIDEr and BLEU-4,
    and the water-type estimate's accuracy for models that make one (weighted by images)."""
    labels = list(load_recipe(DOMAIN_RECIPE).experts.domains)
    head = ["protocol", *[f"{d} {m}" for d in labels for m in ("CIDEr", "BLEU-4")], "routing accuracy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in results.items():
        per = [r.get(DOMAIN_KEY, {}) for r in runs]
        cells = [_mean_std([p[d][k] for p in per if d in p]) for d in labels for k in ("CIDEr", "Bleu_4")]
        routed = [
            sum(m["routing_accuracy"] * m["images"] for m in p.values()) / sum(m["images"] for m in p.values())
            for p in per
            if p and all("routing_accuracy" in m for m in p.values())
        ]
        lines.append(f"| {name} | " + " | ".join([*cells, _mean_std(routed)]) + " |")
    return lines


def _markdown(
    compare: CompareConfig,
    inputs: RunInputs,
    results: dict[str, list[dict]],
    splits: dict[str, Path],
    plots: list[Path],
) -> str:
    cols = [("underwater", k) for k in TABLE_UNDERWATER]
    if "in-air" in splits:
        cols += [("in-air", "Bleu_4"), ("in-air", "CIDEr")]
    cols += [("underwater", k) for k in TABLE_COLLAPSE]
    head = ["protocol", "runs", *[f"{s} {k}" for s, k in cols]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in results.items():
        cells = [_mean_std([r[s][k] for r in runs if k in r.get(s, {})]) for s, k in cols]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    lines += ["", *_domain_table(results)]
    order = sorted(
        (n for n in results if n != "start"),
        key=lambda n: -statistics.fmean(r["underwater"]["CIDEr"] for r in results[n]),
    )
    ordering = " > ".join(f"{n} ({statistics.fmean(r['underwater']['CIDEr'] for r in results[n]):.3f})" for n in order)
    command = "reefcap " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else ""
    parts = [
        f"# {compare.title}",
        "",
        f"Start model `{inputs.model}`; training data `{inputs.data}`; validation `{inputs.val}`; "
        f"{compare.seeds} seed(s) per protocol; epochs scaled by {compare.epochs_scale}, lrs by {compare.lr_scale}. "
        "Scores are pycocoevalcap fractions of the model selected on validation CIDEr + BLEU-4; mean ± std over seeds.",
        "",
        *lines,
        "",
        "`repetition_rate` is the share of captions the serving policy calls degenerate repetition (a word, pair "
        "or triple three times in a row, or 8+ words under 40% distinct: `reefcap.models.metrics.degenerate_reason`, "
        "the captions the fallback would answer); `empty_or_one_word` the share with at most one word.",
        "",
        f"Measured ordering by underwater CIDEr: {ordering}.",
        "",
        *[f"![{p.stem}]({p.name})" for p in plots],
        "",
        "Reproduce with:",
        "",
        "```",
        command,
        "```",
        "",
    ]
    return "\n".join(parts)
