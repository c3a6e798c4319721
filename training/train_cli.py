"""`reefcap train`, `reefcap eval` and `reefcap compare`: adapt a checkpoint with a recipe, score it, and
compare protocols. Heavy imports happen inside the handlers so `reefcap --help` stays fast."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path


def _train_config(args: argparse.Namespace):
    from .config import AugmentConfig, TrainConfig

    aug = AugmentConfig(enabled=not args.no_augment, underwater_p=args.underwater_aug)
    return TrainConfig(
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        clip_norm=args.clip_norm,
        mixed_precision=args.mixed_precision,
        device=args.device,
        seed=getattr(args, "seed", 0),
        max_steps=args.max_steps,
        eval_every_epochs=args.eval_every,
        eval_max_images=args.eval_max_images,
        eval_beams=args.eval_beams,
        patience=args.patience,
        augment=aug,
    )


def _inputs(args: argparse.Namespace):
    from .runs import RunInputs

    return RunInputs(model=args.model, data=args.data, val=args.val, preserve_data=args.preserve_data)


def _train(args: argparse.Namespace) -> int:
    from .config import load_recipe
    from .finish import finish_run, parse_tests
    from .runs import run_training, scaled_recipe

    recipe = scaled_recipe(load_recipe(args.recipe), args.epochs_scale, args.lr_scale)
    tests = parse_tests(args.test)  # checked before training: a typo must not cost a run
    if args.air_val and not (args.preserve_data and args.val):
        from reefcap.models.errors import ReefcapError

        raise ReefcapError("--air-val fits a router: pass --preserve-data (in-air training images) and --val too")
    summary = run_training(
        recipe,
        _train_config(args),
        _inputs(args),
        args.out,
        resume=args.resume,
        override=args.resume_override,
        progress=not args.no_progress,
    )
    from accelerate import PartialState

    if PartialState().is_main_process:
        extra = _train_router(args, tests)
        if not args.no_manifest:
            manifest = finish_run(args.out, recipe, _inputs(args), summary, tests, extra=extra)
            summary["manifest"] = str(Path(args.out) / "best" / "manifest.json")
            summary["metrics"] = manifest["metrics"]
        if extra:
            summary["router"] = {k: extra["router"][k] for k in ("threshold", "accuracy")}
        print(json.dumps({k: v for k, v in summary.items() if k != "evals"}))
    return 0


def _train_router(args: argparse.Namespace, tests: dict[str, str]) -> dict:
    """With --air-val: fit the underwater / in-air router into OUT/best (training data --data vs --preserve-data,
    threshold on --val vs --air-val) and return its manifest section, accuracy per domain and water type."""
    if not args.air_val:
        return {}
    from .router import attach_router

    data = {"underwater": args.data, "air": args.preserve_data, "val_underwater": args.val, "val_air": args.air_val}
    return {"router": attach_router(Path(args.out) / "best", data, tests)}


def _decode_options(args: argparse.Namespace):
    from reefcap.models.engines.base import DecodeOptions
    from reefcap.models.policy import DEFAULT_MAX_LENGTH, DEFAULT_NUM_BEAMS

    # Without --model, `reefcap eval` measures what `reefcap serve` answers by default: its decoding too.
    serving = getattr(args, "model", "") is None
    start = DecodeOptions(num_beams=DEFAULT_NUM_BEAMS, max_length=DEFAULT_MAX_LENGTH) if serving else DecodeOptions()
    # validate() raises InvalidOptionsError, a ReefcapError: the CLI reports it as a usage error.
    return start.merged(
        num_beams=args.beams,
        max_length=args.max_length,
        min_length=args.min_length,
        repetition_penalty=args.repetition_penalty,
    ).validate()


def _eval_models(args: argparse.Namespace) -> tuple[str, str | None]:
    """(model, fallback) to evaluate: without --model, what `reefcap serve` answers by default (its primary and
    fallback, routed where the primary has a router); with --model, that model alone unless --fallback NAME."""
    from reefcap.models.policy import DEFAULT_FALLBACK, DEFAULT_PRIMARY, fallback_name

    if args.model is None:
        return DEFAULT_PRIMARY, fallback_name(args.fallback if args.fallback is not None else DEFAULT_FALLBACK)
    return args.model, fallback_name(args.fallback if args.fallback is not None else "none")


def _eval(args: argparse.Namespace) -> int:
    from reefcap.models.engines.base import EngineConfig, require_positive
    from reefcap.models.policy import open_policy

    from .data import load_records
    from .evaluation import domain_metrics, evaluate, route_metrics, write_json
    from .router import water_domains

    # Every flag checked before the data is read or the model loaded: a typo fails at once.
    options = _decode_options(args)
    config = EngineConfig(backend=args.backend, device=args.device, dtype=args.dtype, threads=args.threads)
    require_positive("--batch-size", args.batch_size)
    records = load_records(args.data)
    if args.limit:
        records = records[: args.limit]
    model, fallback = _eval_models(args)
    policy = open_policy(model, fallback, config)  # the one loader, with the server's defaults
    metrics, predictions = evaluate(
        policy, records, options, args.batch_size, meteor=not args.no_meteor, progress=not args.no_progress
    )
    info = (policy.primary or policy.fallback).describe()
    experts = getattr(policy.primary, "experts", None)  # water-type experts: scores and routing per domain
    payload = {
        "model": info.name,
        "version": info.version,
        "data": str(args.data),
        "decode": asdict(options),
        "metrics": metrics,
        # Only with --fallback: which model stood in and for how many images (by reason).
        "fallback": {"model": fallback, "images": dict(policy.counts)} if fallback else None,
        **({"domains": domain_metrics(records, predictions, experts.domains)} if experts else {}),
    }
    routing = route_metrics(records, predictions, water_domains())  # routed models: where images went
    if routing is not None:
        payload["routing"] = {"router_threshold": policy.router.threshold, **routing}
    pred_path = Path(args.predictions) if args.predictions else None
    if args.out:
        out = Path(args.out)
        pred_path = pred_path or out.with_name(out.stem + ".predictions.json")
        payload["predictions"] = str(pred_path)
        write_json(out, payload)
    if pred_path:
        write_json(pred_path, predictions)
    print(json.dumps(metrics))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .compare import CompareConfig, run_compare
    from .frontier import FrontierConfig, parse_alphas, parse_includes

    frontier = FrontierConfig(
        merge=tuple(n.strip() for n in (args.merge or "").split(",") if n.strip()),
        merge_alphas=parse_alphas(args.merge_alphas),
        route=args.route,
        includes=parse_includes(args.include),
        air_val=args.air_val,
        val=args.frontier_val,
    )

    compare = CompareConfig(
        recipes=tuple(n.strip() for n in args.recipes.split(",") if n.strip()),
        seeds=args.seeds,
        test=args.test,
        test_air=args.test_air,
        work=args.work,
        report=args.report,
        title=args.title,
        meteor=not args.no_meteor,
        epochs_scale=args.epochs_scale,
        lr_scale=args.lr_scale,
        first_seed=args.first_seed,
        report_only=args.report_only,
        frontier=frontier,
    )
    report = run_compare(
        compare, _train_config(args), _inputs(args), override=args.resume_override, progress=not args.no_progress
    )
    print(json.dumps({"report": str(report)}))
    return 0


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="start checkpoint: zoo name, local directory or hub id")
    p.add_argument("--data", required=True, help="training captions (COCO JSON or any format `load_dataset` reads)")
    p.add_argument("--val", help="validation captions; model selection on CIDEr + BLEU-4")
    p.add_argument("--preserve-data", help="in-air training captions, for recipes with knowledge preservation")
    p.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every stage's epochs (short runs)")
    p.add_argument("--lr-scale", type=float, default=1.0, help="multiply every stage's lr (small models)")
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--clip-norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--device", choices=["auto", "cpu"], default="auto", help="cpu forces CPU even with a GPU")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (resumable)")
    p.add_argument("--eval-every", type=float, default=1.0, help="validate every N epochs (and at stage ends)")
    p.add_argument("--eval-max-images", type=int, help="validate on the first N images only")
    p.add_argument(
        "--eval-beams", type=int, default=3, help="beams of validation captions (GuiDG experts validate by loss)"
    )
    p.add_argument(
        "--patience",
        type=int,
        help="stop after N validations in a row without a better validation CIDEr (GuiDG experts: validation loss)",
    )
    p.add_argument("--no-augment", action="store_true", help="resize only (no crop, flip, RandAugment)")
    p.add_argument(
        "--underwater-aug",
        type=float,
        default=0.0,
        metavar="P",
        help="re-render training images underwater with probability P (extra augmentation)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoint exactly; refused if the options differ from the run's saved ones",
    )
    p.add_argument(
        "--resume-override",
        action="store_true",
        help="with --resume: continue with the options given now where they differ from the saved ones",
    )
    p.add_argument("--no-progress", action="store_true")


def _register_train(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="adapt a BLIP checkpoint with a recipe (DAMF, baselines, GuiDG, pretraining)")
    train.add_argument("--recipe", required=True, help="bundled recipe name or a YAML file")
    _add_run_options(train)
    train.add_argument("--out", required=True, help="run directory: best/, last/, checkpoint/, log.jsonl, tb/")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--test",
        action="append",
        metavar="NAME=FILE",
        help="also score the selected model on this split for its manifest (repeatable, e.g. underwater=test.json)",
    )
    train.add_argument(
        "--air-val",
        help="in-air validation captions: also fit the underwater / in-air router saved in OUT/best (with "
        "--preserve-data and --val; README 'Serving default')",
    )
    train.add_argument(
        "--no-manifest",
        action="store_true",
        help="skip best/manifest.json and the run report (scoring the whole validation split takes a while)",
    )
    train.set_defaults(handler=_train)


def _register_eval(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="caption a test set and score it (BLEU, METEOR, ROUGE-L, CIDEr, collapse)")
    ev.add_argument(
        "--model",
        help="model to score (default: what `reefcap serve` answers by default: its primary, routed with its "
        "fallback where the primary has a router, and its decoding, greedy, unless --beams etc. say otherwise)",
    )
    ev.add_argument("--data", required=True, help="test captions")
    ev.add_argument("--out", help="write metrics here (JSON); predictions go beside it in COCO results format")
    ev.add_argument("--predictions", help="where to write the COCO-format predictions")
    ev.add_argument(
        "--fallback",
        metavar="NAME|none",
        help="with --model, default none: an evaluation measures the model itself, collapses and failures "
        "included. NAME measures what the server answers instead (the same policy: failures and degenerate "
        "captions go to NAME, and in-air images too where the model has a router; the output counts them). "
        "Without --model the default is the server's fallback",
    )
    ev.add_argument("--backend", default="auto", help="auto (as the server: onnx where it imports), torch or onnx")
    ev.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    ev.add_argument("--dtype", default="auto", help="auto (as the server: int8 where its agreement holds), fp32, ...")
    ev.add_argument("--threads", type=int, default=0, help="intra-op threads (0: the server's thread policy)")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--beams", type=int)
    ev.add_argument("--max-length", type=int)
    ev.add_argument("--min-length", type=int)
    ev.add_argument("--repetition-penalty", type=float)
    ev.add_argument("--limit", type=int, help="evaluate the first N images only")
    ev.add_argument("--no-meteor", action="store_true", help="skip METEOR (a Java process; slowest metric)")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(handler=_eval)


def _register_compare(sub: argparse._SubParsersAction) -> None:
    cmp_ = sub.add_parser("compare", help="train several recipes x seeds from one start and report the comparison")
    cmp_.add_argument("--recipes", default="naive,low_lr,visual_only,damf,damf_preserve")
    cmp_.add_argument("--seeds", type=int, default=3)
    cmp_.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="train seeds FIRST..SEEDS-1 only, e.g. in a second process on the same --work; a later run "
        "without it reuses every finished run and reports all seeds",
    )
    _add_run_options(cmp_)
    cmp_.add_argument("--test", required=True, help="underwater test captions")
    cmp_.add_argument("--test-air", help="in-air test captions (forgetting)")
    cmp_.add_argument("--work", required=True, help="folder for the runs (one per recipe and seed)")
    cmp_.add_argument("--report", required=True, help="Markdown report to write (plots beside it)")
    cmp_.add_argument("--title", default="Protocol comparison")
    cmp_.add_argument(
        "--report-only", action="store_true", help="train nothing: report the runs already finished in --work"
    )
    cmp_.add_argument("--no-meteor", action="store_true")
    front = cmp_.add_argument_group("frontier (merges, routing, the chosen default; README 'Serving default')")
    front.add_argument("--air-val", help="in-air validation captions: the router's threshold and the default's rule")
    front.add_argument(
        "--frontier-val", help="underwater validation captions for the router and the rule (default: --val)"
    )
    front.add_argument("--include", action="append", metavar="LABEL=MODEL", help="also compare a ready model")
    front.add_argument("--merge", metavar="NAMES", help="protocols (recipes or include labels) to WiSE-FT merge")
    front.add_argument("--merge-alphas", metavar="A,A", help="values of a in (0, 1): (1 - a) start + a model")
    front.add_argument("--route", action="store_true", help="also score every adapted model routed with the start")
    cmp_.set_defaults(handler=_compare)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `train`, `eval` and `compare` (and the zoo, adapt, merge and router commands) to the `reefcap` parser."""
    _register_train(sub)
    _register_eval(sub)
    _register_compare(sub)

    from .adapt import register as register_adapt
    from .merge import register as register_merge
    from .router import register as register_router
    from .zoo import register as register_zoo

    register_zoo(sub)
    register_adapt(sub)
    register_merge(sub)
    register_router(sub)
