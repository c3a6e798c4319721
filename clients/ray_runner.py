"""Scale-out: the same BatchCaptioner in a Ray Data actor pool (one actor per GPU, or per CPU slot).

Each actor loads the engines once (primary and fallback, behind the same captioning policy as local mode
and the server) and captions whole batches; records come back as JSON strings so any
record shape (caption or error) crosses Ray's Arrow blocks unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from typing import Any

from reefcap.models.engines.base import DecodeOptions
from reefcap.models.errors import ReefcapError


class CaptionActor:
    """A Ray Data callable class: holds one engine, captions one batch of image paths per call."""

    def __init__(
        self,
        model: str,
        backend: str,
        device: str,
        dtype: str,
        options: dict,
        threads: int,
        fallback: str | None,
        quality: bool = False,
    ) -> None:
        import torch

        from reefcap.models.engines.backends import load_engine
        from reefcap.models.engines.base import EngineConfig
        from reefcap.models.policy import open_policy

        from .batch import BatchCaptioner

        torch.set_num_threads(max(1, threads))  # each actor owns its CPU slots; do not oversubscribe
        config = EngineConfig(device=device, dtype=dtype)
        policy = open_policy(model, fallback, lambda m: load_engine(m, backend=backend, config=config))
        self.captioner = BatchCaptioner(
            policy, batch_size=1 << 30, options=DecodeOptions(**options), workers=threads, quality=quality
        )

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        names = [str(n) for n in batch["image"]]
        return {"record": [json.dumps(r, ensure_ascii=False) for r in self.captioner.run(names)]}


def run_on_ray(
    names: Iterable[str],
    model: str,
    backend: str = "torch",
    address: str | None = None,
    batch_size: int = 16,
    options: DecodeOptions | None = None,
    dtype: str = "fp32",
    num_cpus: int | None = None,
    fallback: str | None = None,
    quality: bool = False,
) -> Iterator[list[dict[str, Any]]]:
    """Caption ``names`` on a Ray cluster (``address``) or a local instance; yield records per batch.

    ``fallback``: the model that answers where the primary fails or collapses (None: no fallback).
    ``quality``: add each input's UIQM/UCIQE to its record, as local mode does.

    Batches arrive as actors finish them, not in input order; every input appears exactly once.
    """
    try:
        import ray
    except ImportError:
        raise ReefcapError("--ray needs Ray: pip install 'reefcap[ray]'") from None

    names = list(names)
    if not names:
        return
    started_here = not ray.is_initialized()
    if started_here:
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address:
            kwargs["address"] = address
        elif num_cpus:
            kwargs["num_cpus"] = num_cpus
        ray.init(**kwargs)
    try:
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        if gpus:
            pool, per_actor = {"num_gpus": 1}, 1
            actors, device = gpus, "cuda"
        else:
            # Two CPU slots per actor keeps torch's intra-op threads useful while still using every core.
            threads = min(2, cpus)
            pool, per_actor = {"num_cpus": threads}, threads
            actors, device = max(1, cpus // threads), "cpu"
        ctor = dict(
            model=model,
            backend=backend,
            device=device,
            dtype=dtype,
            options=asdict(options or DecodeOptions()),
            threads=per_actor,
            fallback=fallback,
            quality=quality,
        )
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
