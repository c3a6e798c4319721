"""Preview grids and the realism report: ReefScenes renderings measured against real underwater photos.

The report measures UIQM, UCIQE (models/quality.py) and the channel-mean ratios R/G and B/G on the real
EUVP samples (raw/ and enhanced/) and on renderings of the same procedural scenes in air and underwater,
then checks that (1) both quality measures rate enhanced/ above raw/ on average, (2) the underwater
renderings fall inside the range of the real raw photos, (3) the in-air renderings do not.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from reefcap.models import quality
from reefcap.models.data.records import DatasetError
from reefcap.models.reefscenes.captions import names_conditions
from reefcap.models.samples import EUVP_DIR, REPO, sample_photos

MEASURES = ("uiqm", "uciqe", "r_g", "b_g")
LABELS = {"uiqm": "UIQM", "uciqe": "UCIQE", "r_g": "R/G", "b_g": "B/G"}
REPORT_NAME, FIGURE_NAME = "reefscenes-report.md", "reefscenes-real-vs-synthetic.png"


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def caption_cell(image: Image.Image, text: str, width: int, lines: int = 4) -> Image.Image:
    """``image`` resized to ``width`` with ``text`` wrapped under it: one cell of a report's picture grid."""
    font = _font(12)
    wrapped = textwrap.wrap(text, width=max(10, width // 7))[:lines]
    cell = Image.new("RGB", (width, width + 16 * lines + 6), "white")
    cell.paste(image.convert("RGB").resize((width, width), Image.BICUBIC), (0, 0))
    draw = ImageDraw.Draw(cell)
    for i, line in enumerate(wrapped):
        draw.text((4, width + 3 + 16 * i), line, fill=(20, 20, 20), font=font)
    return cell


def preview(root, out, n: int = 6, split: str = "test", cell: int = 192) -> Path:
    """A PNG grid: one row per scene, in air beside underwater, each with a caption (an underwater one that
    names the water when there is one)."""
    root = Path(root)
    docs = {}
    for domain in ("surface", "underwater"):
        path = root / domain / f"{split}.json"
        if path.is_file():
            docs[domain] = json.loads(path.read_text(encoding="utf-8"))
    if not docs:
        raise DatasetError(f"{root}: no surface/{split}.json or underwater/{split}.json (not a ReefScenes folder?)")
    by_domain = {}
    for domain, doc in docs.items():
        caps: dict[int, list[str]] = {}
        for ann in doc["annotations"]:
            caps.setdefault(ann["image_id"], []).append(ann["caption"])
        by_domain[domain] = {
            img["scene_id"]: (root / domain / img["file_name"], caps[img["id"]]) for img in doc["images"]
        }
    scene_ids = sorted(set.intersection(*(set(v) for v in by_domain.values())))[:n]
    if not scene_ids:
        raise DatasetError(f"{root}: no scenes in split {split!r}")
    domains = [d for d in ("surface", "underwater") if d in by_domain]
    header = 24
    probe = caption_cell(Image.new("RGB", (8, 8)), "", cell)
    grid = Image.new(
        "RGB", (cell * len(domains) + 8 * (len(domains) - 1), header + probe.height * len(scene_ids)), "white"
    )
    draw = ImageDraw.Draw(grid)
    for col, domain in enumerate(domains):
        draw.text(
            (col * (cell + 8) + 4, 4),
            "in air (surface)" if domain == "surface" else "underwater",
            fill="black",
            font=_font(14),
        )
    for row, sid in enumerate(scene_ids):
        for col, domain in enumerate(domains):
            path, caps = by_domain[domain][sid]
            named = [c for c in caps if names_conditions(c)]
            text = (named or caps)[0] if domain == "underwater" else caps[0]
            with Image.open(path) as im:
                grid.paste(caption_cell(im, f"#{sid}: {text}", cell), (col * (cell + 8), header + row * probe.height))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out


def _render_pair(job):
    from reefcap.models.reefscenes.optics import render, sample_params
    from reefcap.models.reefscenes.painter import paint
    from reefcap.models.reefscenes.probe import STREAM_LAYOUT, STREAM_RENDER, STREAM_WATER, jpeg_bytes
    from reefcap.models.reefscenes.scenes import sample_scene, scene_rng

    seed, scene_id, size = job
    scene = sample_scene(scene_rng(seed, scene_id, STREAM_LAYOUT), scene_id)
    air, rel = paint(scene, size)
    params = sample_params(scene_rng(seed, scene_id, STREAM_WATER))
    uw = render(air, rel * params.range_m, params, scene_rng(seed, scene_id, STREAM_RENDER))
    # Measure what the dataset stores: the JPEG-decoded images.
    air = np.asarray(Image.open(io.BytesIO(jpeg_bytes(air, 92))).convert("RGB"))
    uw = np.asarray(Image.open(io.BytesIO(jpeg_bytes(uw, params.jpeg_quality))).convert("RGB"))
    return air, uw, quality.measure(air), quality.measure(uw)


def _load(euvp: Path, kind: str, size: int | None) -> list[np.ndarray]:
    out = []
    for p in sample_photos(kind, euvp):
        with Image.open(p) as im:
            im = im.convert("RGB")
            out.append(
                np.asarray(im if size is None or im.size == (size, size) else im.resize((size, size), Image.LANCZOS))
            )
    return out


def _stats(rows: list[dict]) -> dict:
    return {m: np.array([r[m] for r in rows]) for m in MEASURES}


def _inside(values: np.ndarray, lo: float, hi: float) -> float:
    return float(np.mean((values >= lo) & (values <= hi)))


def measure_sets(euvp, scenes: int, seed: int, size: int, workers: int, keep: int = 6) -> dict:
    """Measures for real raw/enhanced photos (resized to ``size``) and ``scenes`` renderings in each domain."""
    euvp = Path(euvp)
    raw, enhanced = _load(euvp, "raw", size), _load(euvp, "enhanced", size)
    jobs = [(seed, i, size) for i in range(scenes)]
    if workers > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            pairs = pool.map(_render_pair, jobs, chunksize=8)
    else:
        pairs = [_render_pair(j) for j in jobs]
    return {
        "raw": _stats([quality.measure(x) for x in raw]),
        "enhanced": _stats([quality.measure(x) for x in enhanced]),
        "in air": _stats([p[2] for p in pairs]),
        "underwater": _stats([p[3] for p in pairs]),
        "_images": {
            "raw": raw[:keep],
            "in air": [p[0] for p in pairs[:keep]],
            "underwater": [p[1] for p in pairs[:keep]],
        },
    }


def _shown(folder: Path) -> str:
    """A folder as the report names it: relative to the repository when inside it (no machine's paths)."""
    folder = folder.resolve()
    return str(folder.relative_to(REPO)) if folder.is_relative_to(REPO) else str(folder)


def realism_checks(sets: dict) -> dict:
    """The three checks of the issue, with the numbers behind them."""
    raw = sets["raw"]
    rng = {m: (float(raw[m].min()), float(raw[m].max())) for m in MEASURES}
    enhanced_above = {m: bool(sets["enhanced"][m].mean() > raw[m].mean()) for m in ("uiqm", "uciqe")}
    uw_mean_inside = {m: bool(rng[m][0] <= sets["underwater"][m].mean() <= rng[m][1]) for m in MEASURES}
    air_mean_inside = {m: bool(rng[m][0] <= sets["in air"][m].mean() <= rng[m][1]) for m in MEASURES}
    joint = {}
    for name in ("underwater", "in air"):
        ok = np.ones_like(sets[name]["uiqm"], dtype=bool)
        for m in MEASURES:
            ok &= (sets[name][m] >= rng[m][0]) & (sets[name][m] <= rng[m][1])
        joint[name] = float(ok.mean())
    return {
        "raw_range": rng,
        "enhanced_above_raw": enhanced_above,
        "underwater_mean_inside": uw_mean_inside,
        "in_air_mean_inside": air_mean_inside,
        "share_inside": {n: {m: _inside(sets[n][m], *rng[m]) for m in MEASURES} for n in ("underwater", "in air")},
        "joint_share_inside": joint,
        # Passing: enhanced > raw on both; every underwater mean inside the real range; the in-air set outside it
        # on at least one measure's mean, and far fewer in-air renderings than underwater ones inside on all four.
        "passed": bool(
            all(enhanced_above.values())
            and all(uw_mean_inside.values())
            and not all(air_mean_inside.values())
            and joint["in air"] < 0.5 * joint["underwater"]
        ),
    }


def figure(images: dict, out: Path, cell: int = 128) -> Path:
    rows = [
        ("real EUVP raw", images["raw"]),
        ("ReefScenes underwater", images["underwater"]),
        ("same scenes in air", images["in air"]),
    ]
    cols = max(len(r[1]) for r in rows)
    label = 170
    grid = Image.new("RGB", (label + cols * (cell + 4), len(rows) * (cell + 4)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (name, imgs) in enumerate(rows):
        draw.text((6, r * (cell + 4) + cell // 2 - 8), name, fill="black", font=_font(14))
        for c, img in enumerate(imgs):
            grid.paste(
                Image.fromarray(img).resize((cell, cell), Image.BICUBIC), (label + c * (cell + 4), r * (cell + 4))
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out, optimize=True)
    return out


def _table(sets: dict) -> list[str]:
    head = "| set | n | " + " | ".join(f"{LABELS[m]} mean (min to max)" for m in MEASURES) + " |"
    lines = [head, "|---|---|" + "---|" * len(MEASURES)]
    for name in ("raw", "enhanced", "underwater", "in air"):
        s = sets[name]
        cells = [f"{s[m].mean():.3f} ({s[m].min():.3f} to {s[m].max():.3f})" for m in MEASURES]
        label = {"raw": "EUVP raw (real)", "enhanced": "EUVP enhanced (real)"}.get(name, f"ReefScenes {name}")
        lines.append(f"| {label} | {len(s['uiqm'])} | " + " | ".join(cells) + " |")
    return lines


def _separation(ev: dict) -> str:
    outside = [LABELS[m] for m in MEASURES if not ev["in_air_mean_inside"][m]]
    inside = [LABELS[m] for m in MEASURES if ev["in_air_mean_inside"][m]]
    text = f"In-air renderings fall outside the real raw range on {', '.join(outside) or 'no measure'} (by their mean)"
    if inside:
        text += (
            f" but inside it on {', '.join(inside)}: those no-reference scores alone do not tell these in-air"
            " renderings from underwater photos; the colour cast does."
        )
    return text if text.endswith(".") else text + "."


def _checks(ev: dict) -> list[str]:
    def mark(ok: bool) -> str:
        return "yes" if ok else "NO"

    lines = ["| check | " + " | ".join(LABELS[m] for m in MEASURES) + " |", "|---|" + "---|" * len(MEASURES)]
    above = ev["enhanced_above_raw"]
    lines.append(
        "| enhanced mean > raw mean | " + " | ".join(mark(above[m]) if m in above else "-" for m in MEASURES) + " |"
    )
    for key, label in (
        ("underwater_mean_inside", "underwater mean inside raw range"),
        ("in_air_mean_inside", "in-air mean inside raw range"),
    ):
        lines.append(f"| {label} | " + " | ".join(mark(ev[key][m]) for m in MEASURES) + " |")
    for name in ("underwater", "in air"):
        share = ev["share_inside"][name]
        lines.append(
            f"| share of {name} renderings inside raw range | " + " | ".join(f"{share[m]:.0%}" for m in MEASURES) + " |"
        )
    return lines


def _intro(cmd: str, euvp: Path, scenes: int, seed: int) -> list[str]:
    """The report's heading and method: the command that reproduces it, what was measured, how, the figure."""
    return [
        "# ReefScenes realism report",
        "",
        f"Generated by `{cmd}` (training/report.py); rerun it to reproduce every number here.",
        "",
        f"Real photos: the EUVP test pairs in `{_shown(euvp)}` (`raw/` as taken, `enhanced/` after",
        f"enhancement). Synthetic: scenes 0 to {scenes - 1} of seed {seed}, each rendered in air and underwater",
        "exactly as `reefcap data reefscenes` renders them (same layout, water and noise streams, JPEG-decoded).",
        "UIQM and UCIQE follow the conventions documented in `models/quality.py` (Panetta et al. 2016,",
        "weights 0.0282/0.2953/3.5753; Yang & Sowmya 2015, weights 0.4680/0.2745/0.2576, terms normalised",
        "to 0..1); R/G and B/G are ratios of the channel means of the sRGB image.",
        "",
        f"![real EUVP raw photos beside ReefScenes renderings]({FIGURE_NAME})",
        "",
    ]


def write_report(out="docs", euvp=None, scenes: int = 200, seed: int = 0, size: int = 256, workers: int = 2) -> dict:
    """Measure, check and write ``OUT/reefscenes-report.md`` and its figure; returns the checks.

    ``euvp`` is a folder with ``raw/`` and ``enhanced/`` photos; by default the samples in examples/photos/euvp.
    """
    out = Path(out)
    euvp = EUVP_DIR if euvp is None else Path(euvp)
    main = measure_sets(euvp, scenes, seed, size, workers)
    ev = realism_checks(main)
    small_size = 128 if size != 128 else 96
    small = measure_sets(euvp, scenes, seed, small_size, workers, keep=0)
    ev_small = realism_checks(small)
    figure(main["_images"], out / FIGURE_NAME)
    where = "" if euvp == EUVP_DIR else f" --euvp {euvp}"
    cmd = f"reefcap data report --out {out}{where} --scenes {scenes} --seed {seed} --size {size}"
    md = [
        *_intro(cmd, euvp, scenes, seed),
        f"## At {size} px (the EUVP photos' own size)",
        "",
        *_table(main),
        "",
        *_checks(ev),
        "",
        "Renderings inside the raw range on all four measures at once: underwater"
        f" {ev['joint_share_inside']['underwater']:.0%}, in air {ev['joint_share_inside']['in air']:.0%}.",
        _separation(ev),
        "",
        f"**Result: {'PASS' if ev['passed'] else 'FAIL'}** (enhanced above raw on UIQM and UCIQE; every underwater",
        "mean inside the range of the real raw photos; the in-air set outside it on at least one measure and less than",
        "half as often inside on all four as the underwater set).",
        "",
        f"## At {small_size} px (the dataset's default size; real photos downscaled)",
        "",
        *_table(small),
        "",
        *_checks(ev_small),
        "",
        f"Inside on all four: underwater {ev_small['joint_share_inside']['underwater']:.0%}, in air"
        f" {ev_small['joint_share_inside']['in air']:.0%}. **Result: {'PASS' if ev_small['passed'] else 'FAIL'}**",
        "",
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_NAME).write_text("\n".join(md), encoding="utf-8")
    return {
        "report": str(out / REPORT_NAME),
        "figure": str(out / FIGURE_NAME),
        "passed": ev["passed"] and ev_small["passed"],
        "checks": {str(size): ev, str(small_size): ev_small},
    }
