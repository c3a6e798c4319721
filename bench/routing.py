"""What routing costs: the serving default routed against the same models unrouted, on an all-underwater load.

Part of ``make bench-server``, run after :mod:`reefcap.bench.vs` (``python -m reefcap.bench.routing``). Two
``reefcap serve`` processes run side by side on 127.0.0.1 with the same primary and fallback: one as bundled (its
router beside its weights), one from a copy of the primary's folder without ``reefcap_router.json`` (nothing
routed). The load is the 23 EUVP photos, all underwater (every one routed to the primary), so the difference is
the router's own cost (features of each image, the batch split, the hop to a thread for it), not a different
model answering. Measured A B A B with the other server paused, as the LitServe comparison is.

:func:`router_cost` also times the router alone against captioning on the same decoded photos, in-process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROUTER_FILE = "reefcap_router.json"


def unrouted_copy(model: str, tmp: Path) -> str:
    """A copy of ``model``'s checkpoint folder without its router (same weights, so the same ONNX export)."""
    from reefcap.models.registry import resolve_model

    src = resolve_model(model).path
    dst = tmp / f"{src.name}-unrouted"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(ROUTER_FILE))
    return str(dst)


def router_cost(model: str, images: list[bytes], repeats: int = 5) -> dict:
    """Milliseconds per image of the router alone and of captioning (greedy, batch 16, the loader's defaults),
    best of ``repeats``, on ``images`` decoded once."""
    from reefcap.models.data.images import load_image
    from reefcap.models.engines.base import DecodeOptions
    from reefcap.models.engines.loader import load_engine
    from reefcap.models.policy.routing import find_router

    engine = load_engine(model)
    router = find_router(engine)
    if router is None:
        raise SystemExit(f"{model} has no router: nothing to measure")
    decoded = [load_image(b) for b in images]
    route_s, caption_s = [], []
    engine.caption(decoded[:2], DecodeOptions.greedy())  # warm-up
    for _ in range(repeats):
        t = time.perf_counter()
        decisions = router.route(decoded)
        route_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(0, len(decoded), 16):
            engine.caption(decoded[i : i + 16], DecodeOptions.greedy())
        caption_s.append(time.perf_counter() - t)
    engine.close()
    n = len(decoded)
    return {
        "images": n,
        "routed_underwater": sum(d.underwater for d in decisions),
        "router_ms_per_image": round(min(route_s) * 1000 / n, 3),
        "caption_ms_per_image": round(min(caption_s) * 1000 / n, 3),
        "router_share_of_caption": round(min(route_s) / min(caption_s), 4),
    }


def compare_routing(images: list[bytes], levels: tuple[int, ...], rounds: int, per_conn: int, args) -> list[dict]:
    """The serving default routed and unrouted, both up at once, every level measured routed then unrouted."""
    import asyncio

    from reefcap.models.policy import DEFAULT_FALLBACK, DEFAULT_PRIMARY

    from .vs import load, measure, paused, reefcap_requests, start_reefcap, stop

    with tempfile.TemporaryDirectory() as tmp:
        plain = unrouted_copy(DEFAULT_PRIMARY, Path(tmp))
        routed, routed_port = start_reefcap(DEFAULT_PRIMARY, Path(tmp), fallback=DEFAULT_FALLBACK)
        try:
            unrouted, unrouted_port = start_reefcap(plain, Path(tmp), fallback=DEFAULT_FALLBACK)
        except BaseException:
            stop(routed)
            raise
        try:
            reqs = reefcap_requests(images)
            sides = [("routed", routed_port, routed.pid), ("unrouted", unrouted_port, unrouted.pid)]
            for _, port, _ in sides:
                asyncio.run(load(port, reqs, 2, 4, args.timeout))
            rows = []
            for r in range(rounds):
                for c in levels:
                    total = max(c * per_conn, 2 * per_conn)
                    for name, port, pid in sides:
                        with paused([unrouted.pid if name == "routed" else routed.pid]):
                            rows.append({**measure(name, port, pid, reqs, c, total, args.timeout), "round": r + 1})
            return rows
        finally:
            stop(unrouted)
            stop(routed)


def routing_table(rows: list[dict], cost: dict | None) -> list[str]:
    """Per concurrency and round: both goodputs and what routing costs (1 - routed / unrouted)."""
    out = ["\nrouting: the serving default routed vs unrouted, all-underwater load (23 EUVP photos)"]
    out.append(
        f"{'c':>3} {'round':>5} {'routed/s':>9} {'unrouted/s':>11} {'cost':>7} {'p50 r/u ms':>12} "
        f"{'cpu ms/req r/u':>15}"
    )
    for c in sorted({r["concurrency"] for r in rows}):
        for rnd in sorted({r["round"] for r in rows}):
            pair = {r["server"]: r for r in rows if r["concurrency"] == c and r["round"] == rnd}
            a, b = pair["routed"], pair["unrouted"]
            cost_share = 1 - a["goodput"] / b["goodput"] if b["goodput"] else float("nan")
            out.append(
                f"{c:>3} {rnd:>5} {a['goodput']:>9.2f} {b['goodput']:>11.2f} {cost_share:>7.1%} "
                f"{a['p50_ms']:>5.0f}/{b['p50_ms']:<6.0f} "
                f"{a['server_cpu_ms_per_req']:>6.2f}/{b['server_cpu_ms_per_req']:<6.2f}"
            )
    if cost:
        out.append(
            f"router alone: {cost['router_ms_per_image']} ms an image vs {cost['caption_ms_per_image']} ms captioning "
            f"(greedy, batch 16): {cost['router_share_of_caption']:.2%}; {cost['routed_underwater']}/{cost['images']} "
            "photos routed underwater"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m reefcap.bench.routing``: the routed vs unrouted comparison and the router alone."""
    from reefcap.models.policy import DEFAULT_PRIMARY

    from .server import _images
    from .vs import cpu_name

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: one round, few requests")
    parser.add_argument("--rounds", type=int, default=2, help="A B rounds per concurrency")
    parser.add_argument("--requests", type=int, default=8, help="requests per connection")
    parser.add_argument("--timeout", type=float, default=180.0, help="client-side limit per request, seconds")
    parser.add_argument("--out", help="also write every row as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.requests = 1, 2
    images = _images(23)
    print(f"CPU: {cpu_name()}; routing: {DEFAULT_PRIMARY} routed vs unrouted", flush=True)
    rows = compare_routing(images, (1, 8, 32), args.rounds, args.requests, args)
    print("\n".join(routing_table(rows, router_cost(DEFAULT_PRIMARY, images))))
    if args.out:
        Path(args.out).write_text(json.dumps({"cpu": cpu_name(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
