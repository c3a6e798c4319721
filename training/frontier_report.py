"""The frontier's part of the comparison report: the Pareto table and plot (underwater against in-air test
CIDEr for every candidate), the mixed survey, the router's accuracy, and the default the rule chooses.

``results`` maps a candidate's name to its evaluations (one per seed: :func:`.frontier.evaluate_candidate`);
``families`` its plot group.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .frontier import MIXED

FAMILY_STYLE = {  # colour, marker
    "start": ("black", "*"),
    "naive": ("C3", "o"),
    "low_lr": ("C1", "o"),
    "visual_only": ("C8", "o"),
    "damf": ("C0", "o"),
    "damf_preserve": ("C2", "o"),
    "experts": ("C4", "D"),
    "included": ("C7", "s"),
    "merged": ("C9", "."),
    "routed": ("C6", "^"),
}


def _mean(runs: list[dict], split: str, metric: str = "CIDEr") -> float | None:
    values = [r[split][metric] for r in runs if metric in r.get(split, {})]
    return statistics.fmean(values) if values else None


def points(results: dict[str, list[dict]]) -> dict[str, tuple[float, float]]:
    """(in-air, underwater) test CIDEr of every candidate, mean over seeds."""
    out = {}
    for name, runs in results.items():
        air, wet = _mean(runs, "in-air"), _mean(runs, "underwater")
        if air is not None and wet is not None:
            out[name] = (air, wet)
    return out


def pareto(pts: dict[str, tuple[float, float]]) -> set[str]:
    """Names no other candidate beats on both axes (ties count as not beaten)."""
    return {
        n
        for n, (x, y) in pts.items()
        if not any(x2 >= x and y2 >= y and (x2 > x or y2 > y) for m, (x2, y2) in pts.items() if m != n)
    }


def select_default(results: dict[str, list[dict]], keep: float) -> tuple[str | None, str]:
    """The rule: the highest underwater validation CIDEr among candidates keeping at least ``keep`` of the start
    model's in-air validation CIDEr. (name, the sentence saying why); None without validation scores."""
    start_air = _mean(results.get("start", []), "val-in-air")
    if start_air is None:
        return None, "no in-air validation split (--air-val): the rule cannot be applied"
    bar = keep * start_air
    eligible = {n: _mean(r, "val-underwater") for n, r in results.items() if (_mean(r, "val-in-air") or 0) >= bar}
    eligible = {n: v for n, v in eligible.items() if v is not None}
    best = max(eligible, key=lambda n: eligible[n])
    why = (
        f"`{best}`: the highest underwater validation CIDEr ({eligible[best]:.3f}) among the {len(eligible)} "
        f"candidates keeping at least {keep:.0%} of the start model's in-air validation CIDEr "
        f"({start_air:.3f}, so >= {bar:.3f})"
    )
    return best, why


def _cell(v: float | None, ref: float | None = None, kind: str = "") -> str:
    if v is None:
        return "-"
    if ref and kind == "x":
        return f"{v:.3f} ({v / ref:.2f}x)"
    if ref and kind == "%":
        return f"{v:.3f} ({v / ref:.0%})"
    return f"{v:.3f}"


def pareto_table(results: dict[str, list[dict]], families: dict[str, str], chosen: str | None) -> list[str]:
    pts = points(results)
    front = pareto(pts)
    start = results["start"]
    s_wet, s_air = _mean(start, "underwater"), _mean(start, "in-air")
    v_wet, v_air = _mean(start, "val-underwater"), _mean(start, "val-in-air")
    head = "| candidate | family | seeds | underwater CIDEr (x start) | in-air CIDEr (% of start) | mixed CIDEr | "
    head += "val underwater (x start) | val in-air (% of start) | Pareto |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    order = sorted(results, key=lambda n: -(pts.get(n, (0, 0))[1]))
    for name in order:
        runs = results[name]
        mark = ("**chosen** " if name == chosen else "") + ("yes" if name in front else "")
        label = f"**{name}**" if name == chosen else name
        cells = [
            _cell(_mean(runs, "underwater"), s_wet, "x"),
            _cell(_mean(runs, "in-air"), s_air, "%"),
            _cell(_mean(runs, MIXED)),
            _cell(_mean(runs, "val-underwater"), v_wet, "x"),
            _cell(_mean(runs, "val-in-air"), v_air, "%"),
        ]
        lines.append(f"| {label} | {families.get(name, '')} | {len(runs)} | " + " | ".join(cells) + f" | {mark} |")
    return lines


def mixed_lines(results: dict[str, list[dict]], families: dict[str, str], chosen: str | None) -> list[str]:
    """Whether the chosen (routed) default beats every single model on the mixed survey."""
    if chosen is None or _mean(results[chosen], MIXED) is None:
        return []
    mine = _mean(results[chosen], MIXED)
    singles = {n: _mean(r, MIXED) for n, r in results.items() if families.get(n) != "routed" and n != chosen}
    singles = {n: v for n, v in singles.items() if v is not None}
    if not singles:
        return []
    best = max(singles, key=lambda n: singles[n])
    verdict = "beats every single model" if mine > singles[best] else "does NOT beat every single model"
    return [
        f"Mixed survey (both test splits scored as one set): the chosen `{chosen}` scores CIDEr {mine:.3f}; the best "
        f"single model, `{best}`, {singles[best]:.3f}: the default {verdict} "
        f"({len(singles)} single models compared, margin {mine - singles[best]:+.3f})."
    ]


def router_lines(accuracy: dict[str, Any] | None, threshold: float | None) -> list[str]:
    """The router's accuracy per domain and water type, per split."""
    if not accuracy:
        return []
    types = sorted({t for a in accuracy.values() for t in a.get("water_types", {})})
    head = ["split", "all", "underwater", "in air", *types]
    lines = [
        f"Router (threshold {threshold}): share of images routed to their true domain (images in brackets).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for split, acc in accuracy.items():
        cell = lambda a: f"{a['accuracy']:.3f} ({a['images']})" if a else "-"  # noqa: E731
        cells = [cell(acc.get("all")), cell(acc.get("underwater")), cell(acc.get("in_air"))]
        cells += [cell(acc.get("water_types", {}).get(t)) for t in types]
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    return lines


def pareto_plot(results: dict[str, list[dict]], families: dict[str, str], chosen: str | None, out: Path) -> Path:
    """Underwater against in-air test CIDEr, one marker per candidate, WiSE-FT sweeps joined from the start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = points(results)
    front = sorted((pts[n] for n in pareto(pts)), key=lambda p: p[0])
    fig, ax = plt.subplots(figsize=(8.5, 6))
    sx, sy = pts["start"]
    ax.axvline(0.95 * sx, color="grey", ls="--", lw=0.8, label="95% of start in air")
    ax.axhline(2 * sy, color="grey", ls=":", lw=0.8, label="2x start underwater")
    ax.plot(*zip(*front, strict=True), color="grey", lw=1, alpha=0.6, label="Pareto front")
    for parent in sorted({n.split(" a=")[0][len("merged ") :] for n in pts if n.startswith("merged ")}):
        sweep = sorted((n for n in pts if n.startswith(f"merged {parent} a=")), key=lambda n: float(n.split("a=")[1]))
        line = [pts["start"], *(pts[n] for n in sweep), *([pts[parent]] if parent in pts else [])]
        ax.plot(*zip(*line, strict=True), color=FAMILY_STYLE["merged"][0], lw=0.8, alpha=0.7)
    seen = set()
    for name, (x, y) in pts.items():
        fam = families.get(name, "included")
        colour, marker = FAMILY_STYLE.get(fam, ("C7", "s"))
        ax.scatter(
            x,
            y,
            color=colour,
            marker=marker,
            s=90 if name == chosen else 40,
            zorder=3,
            edgecolors="black" if name == chosen else "none",
            label=None if fam in seen else fam,
        )
        seen.add(fam)
        if not name.startswith("merged ") or name == chosen:
            ax.annotate(name, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("in-air test CIDEr")
    ax.set_ylabel("underwater test CIDEr")
    ax.set_title("Underwater vs in-air CIDEr per protocol (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
