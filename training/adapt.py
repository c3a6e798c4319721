"""`reefcap adapt`: adapt a model to your images in one command, without knowing the recipes.

1. Data: ``--data`` is a caption file (any format ``load_dataset`` reads) or a folder with ``train.json`` (and
   ``val.json``), e.g. what ``reefcap feedback export`` or ``reefcap data reefscenes`` writes. Without a
   validation split, 15% of the images (grouped by scene) are held out for one.
2. Protocol: ``damf_preserve``. Without in-air data its preservation is the L2 pull to the start weights alone;
   with ``--preserve-data`` (in-air captions) in-air images are mixed in and their features distilled too, and
   several ``--protocols`` may be tried: the one with the best validation CIDEr among those that keep in-air
   CIDEr within ``--forgetting-budget`` of the base model's (default 10%) wins; when none does, the one that
   forgets least, and the summary says so.
   With both in-air files a router is fitted too (``--data`` vs ``--preserve-data``, threshold on the
   validation split vs ``--air-val``: :mod:`reefcap.training.router`) and saved with the model, and forgetting
   is judged on the routed system, as the server serves it: in-air images on ``--in-air-model`` (the server's
   fallback) where the router says so. A model that forgot the surface but routes around it passes.
3. Training stops early when validation CIDEr has not improved for ``--patience`` validations. Learning rates
   are the recipe's, times 10 for models under 40 MB of weights (the tiny BLIPs were pretrained at 5e-4), unless
   ``--lr-scale`` says otherwise.
4. ``OUT`` becomes a servable checkpoint with its manifest (measured metrics, provenance, file hashes); the run
   (curves, report, checkpoints) sits beside it in ``OUT-run``; the ONNX export the server would make on first
   load is made now. With ``--server``, the server is asked to hot-reload OUT, by its folder name (OUT must be a
   folder of the server's ``MODELS_DIR``), through its quality gate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from reefcap.models.errors import ReefcapError
from reefcap.models.policy import DEFAULT_FALLBACK, DEFAULT_PRIMARY

DEFAULT_BASE = DEFAULT_PRIMARY  # adapt what is served unless told otherwise
DEFAULT_PROTOCOL = "damf_preserve"
CHOOSE_AMONG = "damf_preserve,damf"  # the default candidates when in-air validation data is given
TINY_WEIGHTS_BYTES = 40 << 20


@dataclass(frozen=True)
class AdaptConfig:
    """What `reefcap adapt` was asked to do (the command line, typed)."""

    data: str
    out: str
    base: str = DEFAULT_BASE
    val: str | None = None
    preserve_data: str | None = None
    air_val: str | None = None
    protocols: tuple[str, ...] = (DEFAULT_PROTOCOL,)
    forgetting_budget: float = 0.10
    patience: int = 3
    epochs_scale: float = 1.0
    lr_scale: float | None = None  # None: 10 for tiny models, else 1
    batch_size: int = 16
    eval_max_images: int | None = 100
    seed: int = 0
    export: bool = True
    progress: bool = True
    in_air_model: str = DEFAULT_FALLBACK  # answers in-air images where the router says so (the server's fallback)


def resolve_data(config: AdaptConfig, work: Path) -> tuple[str, str]:
    """(train, val) caption files; a validation split is cut from the training data when none exists."""
    from reefcap.models.data.records import split_records, write_coco

    from .data import load_records

    data = Path(config.data)
    train, val = data, Path(config.val) if config.val else None
    if data.is_dir():
        train = data / "train.json"
        if not train.is_file():
            raise ReefcapError(f"{data}: a data folder needs train.json (as `reefcap feedback export` writes)")
        if val is None and (data / "val.json").is_file() and json.loads((data / "val.json").read_text())["images"]:
            val = data / "val.json"
    records = load_records(train)
    if val is not None:
        return str(train), str(val)
    if len(records) < 4:
        raise ReefcapError(f"{train}: {len(records)} images are too few to hold out a validation split (need 4+)")
    splits = split_records(records, seed=config.seed, ratios=(0.85, 0.15, 0.0), respect_existing=False)
    if not splits["val"]:  # very small sets: at least one image to validate on
        splits["val"] = [splits["train"].pop()]
    for name in ("train", "val"):
        write_coco(splits[name], work / "data" / f"{name}.json", info={"description": f"reefcap adapt {name} split"})
    return str(work / "data" / "train.json"), str(work / "data" / "val.json")


def _recipe(name: str, config: AdaptConfig, lr_scale: float):
    from .config import PreserveConfig, load_recipe
    from .runs import scaled_recipe

    recipe = scaled_recipe(load_recipe(name), config.epochs_scale, lr_scale)
    if recipe.preserve and not config.preserve_data:  # no in-air images: keep the L2 pull, drop the distillation
        recipe = replace(recipe, preserve=PreserveConfig(air_fraction=0.0, distill_weight=0.0))
    return recipe


def default_lr_scale(base: str) -> float:
    """10 for models with under 40 MB of weights (the tiny BLIPs), else 1 (the recipes' BLIP-base lrs)."""
    from reefcap.models.registry import resolve_model

    weights = resolve_model(base).path / "model.safetensors"
    return 10.0 if weights.is_file() and weights.stat().st_size < TINY_WEIGHTS_BYTES else 1.0


def _train_one(name: str, config: AdaptConfig, train: str, val: str, work: Path, lr_scale: float) -> dict[str, Any]:
    from .config import TrainConfig
    from .finish import finish_run
    from .runs import RunInputs, run_training

    recipe = _recipe(name, config, lr_scale)
    inputs = RunInputs(model=config.base, data=train, val=val, preserve_data=config.preserve_data)
    run_config = TrainConfig(
        batch_size=config.batch_size, seed=config.seed, patience=config.patience, eval_max_images=config.eval_max_images
    )
    out = work / name
    resume = (out / "checkpoint").is_dir() and not (out / "last").is_dir()
    summary = run_training(recipe, run_config, inputs, out, resume=resume, progress=config.progress)
    tests = {"in-air": config.air_val} if config.air_val else {}
    manifest = finish_run(out, recipe, inputs, summary, tests, description=f"{config.base} adapted with {name}")
    return {"protocol": name, "run": str(out), "summary": summary, "manifest": manifest}


def choose(candidates: list[dict[str, Any]], base_air: float | None, budget: float) -> tuple[dict[str, Any], str]:
    """The protocol to keep and why: best validation CIDEr within the forgetting budget (see the module doc)."""

    def cider(c: dict, split: str) -> float:
        return float(c["manifest"]["metrics"].get(split, {}).get("CIDEr", 0.0))

    if base_air is None or len(candidates) == 1:
        best = max(candidates, key=lambda c: cider(c, "val"))
        return best, f"{best['protocol']}: best validation CIDEr {cider(best, 'val'):.4f}"
    for c in candidates:
        c["forgetting"] = round(1 - cider(c, "in-air") / base_air, 4) if base_air > 0 else 0.0
    within = [c for c in candidates if c["forgetting"] <= budget]
    if within:
        best = max(within, key=lambda c: cider(c, "val"))
        why = f"best validation CIDEr {cider(best, 'val'):.4f} among protocols within the forgetting budget {budget}"
    else:
        best = min(candidates, key=lambda c: c["forgetting"])
        why = f"no protocol kept in-air CIDEr within {budget} of the base model's: the one that forgets least"
    return best, f"{best['protocol']}: {why} (forgets {best['forgetting']:.1%} of in-air CIDEr)"


def _base_air_cider(config: AdaptConfig, routed: bool = False) -> float | None:
    """The base model's in-air CIDEr on ``--air-val``; ``routed``: as served, with its own router (if any) and
    the in-air model, the reference a routed candidate is judged against."""
    if not config.air_val:
        return None
    return _air_cider(config.base, config, routed)


def _air_cider(model: str, config: AdaptConfig, routed: bool) -> float:
    from reefcap.models.engines.loader import load_engine
    from reefcap.models.policy import CaptionPolicy

    from .data import load_records
    from .evaluation import evaluate

    engine = load_engine(model, backend="torch")
    in_air = load_engine(config.in_air_model, backend="torch") if routed else None
    policy = CaptionPolicy(engine, in_air)  # routes with the router saved with `model`, where it has one
    try:
        return float(evaluate(policy, load_records(config.air_val), meteor=False)[0]["CIDEr"])
    finally:
        policy.close()
        for e in (engine, in_air):
            if e is not None:
                e.close()


def _route_candidates(runs: list[dict[str, Any]], config: AdaptConfig, train: str, val: str) -> dict | None:
    """With in-air training and validation data: fit a router into every candidate and measure its in-air CIDEr
    routed (the model alone's stays under ``in-air (model alone)``); returns the router section, else None."""
    if not (config.preserve_data and config.air_val):
        return None
    from .router import attach_router

    data = {"underwater": train, "air": config.preserve_data, "val_underwater": val, "val_air": config.air_val}
    section = None
    for run in runs:
        section = attach_router(Path(run["run"]) / "best", data)
        metrics = run["manifest"]["metrics"]
        metrics["in-air (model alone)"] = metrics.get("in-air")
        metrics["in-air"] = {"CIDEr": round(_air_cider(str(Path(run["run"]) / "best"), config, True), 6)}
    return section


def _publish(best: dict[str, Any], out: Path, why: str, extra: dict[str, Any], router=None) -> dict[str, Any]:
    """Copy the chosen checkpoint to ``out`` and rewrite its manifest with the selection (hashes recomputed)."""
    from .zoo import write_manifest

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(Path(best["run"]) / "best", out)
    manifest = {k: v for k, v in best["manifest"].items() if k != "files"}
    if router is not None:
        manifest["router"] = router
    manifest.update(name=out.name, selection={"chosen": best["protocol"], "why": why, **extra})
    return write_manifest(out, manifest)


def adapt(config: AdaptConfig) -> dict[str, Any]:
    """Run the whole adaptation (see the module docstring); returns the summary `reefcap adapt` prints."""
    from reefcap.models.registry import resolve_model

    out = Path(config.out)
    work = Path(f"{out}-run")
    resolve_model(config.base)  # a typo in --base fails before any data is read
    if not 0 <= config.forgetting_budget < 1:
        raise ReefcapError(f"--forgetting-budget must be in [0, 1), got {config.forgetting_budget}")
    train, val = resolve_data(config, work)
    lr_scale = config.lr_scale if config.lr_scale is not None else default_lr_scale(config.base)
    routed = bool(config.preserve_data and config.air_val)
    base_air = _base_air_cider(config, routed)
    runs = [_train_one(name, config, train, val, work, lr_scale) for name in config.protocols]
    router = _route_candidates(runs, config, train, val)
    best, why = choose(runs, base_air, config.forgetting_budget)
    extra = {"lr_scale": lr_scale, "base_in_air_CIDEr": base_air, "judged": "routed" if routed else "model alone"}
    extra["candidates"] = {r["protocol"]: r["manifest"]["metrics"] for r in runs}
    manifest = _publish(best, out, why, extra, router)
    result = {"model": str(out), "run": best["run"], "report": str(Path(best["run"]) / "report.md"), "why": why}
    result.update(metrics=manifest["metrics"], stopped_early=best["summary"].get("stopped_early"))
    if router is not None:
        result["router"] = {k: router[k] for k in ("threshold", "accuracy")}
    if config.export:
        from reefcap.models.export.onnx import cached_export

        result["onnx"] = str(cached_export(str(out), "fp32"))  # the export the server's first load would make
    return result


def reload_on_server(server: str, model: Path, admin_key: str | None, timeout: float = 600.0) -> dict[str, Any]:
    """Ask ``server`` to hot-reload ``model`` through its quality gate; returns its answer (raises on refusal).

    The server loads models by name from its ``MODELS_DIR`` (never a path from a request), so ``model`` must be
    a folder there: it is named by its folder name.
    """
    import httpx

    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    url = server.rstrip("/") + "/v1/admin/reload"
    try:
        with httpx.Client(timeout=timeout, headers=headers) as client:
            r = client.post(url, json={"model": model.name})
    except httpx.HTTPError as exc:
        raise ReefcapError(f"cannot reach {server}: {exc}") from None
    try:
        body = r.json()
    except ValueError:
        body = {"error": {"code": "http_error", "message": r.text[:300]}}
    if r.status_code != 200:
        err = body.get("error") or {}
        hint = " (is OUT a folder of the server's MODELS_DIR?)" if err.get("code") == "unknown_model" else ""
        what = f"HTTP {r.status_code} {err.get('code')}: {err.get('message')}{hint}"
        raise ReefcapError(f"{server} did not swap in {model.name}: {what}")
    return body


def _run(args: argparse.Namespace) -> int:
    air = args.preserve_data
    default = CHOOSE_AMONG if air and args.air_val else DEFAULT_PROTOCOL  # in-air data to judge forgetting with
    protocols = tuple(p.strip() for p in (args.protocols or default).split(",") if p.strip())
    if len(protocols) > 1 and not (air and args.air_val):
        raise ReefcapError("several --protocols are chosen between on in-air CIDEr: pass --preserve-data and --air-val")
    config = AdaptConfig(
        data=args.data,
        out=args.out,
        base=args.base,
        val=args.val,
        preserve_data=air,
        air_val=args.air_val,
        protocols=protocols,
        forgetting_budget=args.forgetting_budget,
        patience=args.patience,
        epochs_scale=args.epochs_scale,
        lr_scale=args.lr_scale,
        batch_size=args.batch_size,
        eval_max_images=args.eval_max_images or None,
        seed=args.seed,
        export=not args.no_export,
        progress=not args.no_progress,
        in_air_model=args.in_air_model,
    )
    admin_key = args.admin_key or os.environ.get("REEFCAP_ADMIN_KEY")
    result = adapt(config)
    if args.server:
        try:
            answer = reload_on_server(args.server, Path(config.out), admin_key)
        except ReefcapError as exc:
            result["reload"] = {"swapped": False, "error": str(exc)}
            print(json.dumps(result))
            print(f"reefcap: {exc}", file=sys.stderr)
            return 1
        result["reload"] = {"swapped": True, "primary": answer.get("primary"), "gate": answer.get("gate")}
    print(json.dumps(result))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "adapt",
        help="adapt a model to your images: validation split, damf_preserve, early stopping, manifest, ONNX, reload",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="caption file, or a folder with train.json (and val.json)")
    p.add_argument("--out", required=True, help="the adapted model's folder (the run goes to OUT-run)")
    p.add_argument("--base", default=DEFAULT_BASE, help=f"model to start from (default {DEFAULT_BASE})")
    p.add_argument("--val", help="validation captions (default: val.json beside the data, else 15%% held out)")
    p.add_argument("--preserve-data", help="in-air captions: mixed into training so the model keeps its in-air skill")
    p.add_argument("--air-val", help="in-air validation captions: measures forgetting, chooses among --protocols")
    p.add_argument("--protocols", help=f"recipes to try (default {DEFAULT_PROTOCOL}; {CHOOSE_AMONG} with --air-val)")
    p.add_argument(
        "--in-air-model",
        default=DEFAULT_FALLBACK,
        help=f"with --preserve-data and --air-val: the model in-air images are routed to (default {DEFAULT_FALLBACK})",
    )
    p.add_argument("--forgetting-budget", type=float, default=0.10, help="largest share of in-air CIDEr to lose")
    p.add_argument("--patience", type=int, default=3, help="validations without a better CIDEr before stopping")
    p.add_argument("--epochs-scale", type=float, default=1.0, help="multiply the recipe's epochs")
    p.add_argument("--lr-scale", type=float, help="multiply the recipe's lrs (default: 10 for tiny models, else 1)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-max-images", type=int, default=100, help="validate during training on N images (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-export", action="store_true", help="skip the ONNX export")
    p.add_argument("--server", metavar="URL", help="then hot-reload OUT on this server, through its quality gate")
    p.add_argument("--admin-key", help="the server's admin key, sent as a bearer token (default $REEFCAP_ADMIN_KEY)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_run)
