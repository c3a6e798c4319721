"""Scale-out: the same BatchCaptioner in a Ray Data actor pool (one actor per GPU, or per CPU slot).

Each actor loads the engines once (primary and fallback, behind the same captioning policy as local mode
and the server) and captions whole batches; records come back as JSON strings so any
record shape (caption or error) crosses Ray's Arrow blocks unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from typing import Any

from reefcap.models.engines.base import DecodeOptions, EngineConfig
from reefcap.models.errors import ReefcapError


class CaptionActor:
    """A Ray Data callable class: holds one engine, captions one batch of image paths per call."""

    def __init__(self, model: str, config: dict, options: dict, fallback: str | None, quality: bool = False) -> None:
        from reefcap.models.policy import open_policy

        from .batch import BatchCaptioner

        # The one loader, as the server and local mode load; the config's threads are this actor's CPU slots.
        engine_config = EngineConfig(**config)
        policy = open_policy(model, fallback, engine_config)
        workers = max(1, engine_config.threads)
        self.captioner = BatchCaptioner(
            policy, batch_size=1 << 30, options=DecodeOptions(**options), workers=workers, quality=quality
        )

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        names = [str(n) for n in batch["image"]]
        return {"record": [json.dumps(r, ensure_ascii=False) for r in self.captioner.run(names)]}


def _start_ray(address: str | None, num_cpus: int | None) -> bool:
    """Connect to ``address``, or start a local instance; True when this call started it (and must stop it)."""
    try:
        import ray
    except ImportError:
        raise ReefcapError("--ray needs Ray: pip install 'reefcap[ray]'") from None
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if address:
        kwargs["address"] = address
    elif num_cpus:
        kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)
    return True


def actor_plan(resources: dict[str, float], config: EngineConfig) -> tuple[int, dict[str, int], EngineConfig]:
    """``(actors, resources per actor, each actor's engine config)``: one actor per GPU, else one per two CPU
    slots (two keeps intra-op threads useful while still using every core), the actor's threads its slots."""
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if gpus:
        return gpus, {"num_gpus": 1}, dataclasses.replace(config, device="cuda", threads=config.threads or 1)
    slots = min(2, cpus)
    threads = config.threads or slots
    return max(1, cpus // slots), {"num_cpus": slots}, dataclasses.replace(config, device="cpu", threads=threads)


def run_on_ray(
    names: Iterable[str],
    model: str,
    config: EngineConfig | None = None,
    address: str | None = None,
    batch_size: int = 16,
    options: DecodeOptions | None = None,
    num_cpus: int | None = None,
    fallback: str | None = None,
    quality: bool = False,
) -> Iterator[list[dict[str, Any]]]:
    """Caption ``names`` on a Ray cluster (``address``) or a local instance; yield records per batch.

    ``config``: how each actor loads the models (the one loader's defaults when None; device and threads are set
    per actor). ``fallback``: the model that answers where the primary fails or collapses (None: no fallback).
    ``quality``: add each input's UIQM/UCIQE to its record, as local mode does.

    Batches arrive as actors finish them, not in input order; every input appears exactly once.
    """
    names = list(names)
    if not names:
        return
    started_here = _start_ray(address, num_cpus)
    import ray

    try:
        actors, pool, actor_config = actor_plan(ray.cluster_resources(), config or EngineConfig())
        engine = {k: v for k, v in asdict(actor_config).items() if k != "limits"}
        opts = asdict(options or DecodeOptions())
        ctor = dict(model=model, config=engine, options=opts, fallback=fallback, quality=quality)
        ds = ray.data.from_items([{"image": n} for n in names])
        ds = ds.map_batches(
            CaptionActor,
            fn_constructor_kwargs=ctor,
            batch_size=batch_size,
            batch_format="numpy",
            concurrency=actors,
            **pool,
        )
        for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
            yield [json.loads(s) for s in batch["record"]]
    finally:
        if started_here:
            ray.shutdown()
