"""`make bench-server`: the caption server under load against the naive baseline, measured in one run.

The baseline is what a user without reefcap writes: a transformers pipeline captioning one image at a time
(BLIP captioning is the "image-text-to-text" task in transformers 5, with BLIP's "a picture of" prompt).
The server runs as a real ``reefcap serve`` subprocess on 127.0.0.1 and is driven with 1, 8 and 32
concurrent clients, one image per request. Both use greedy decoding with the same maximum length.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def _images(limit: int) -> list[bytes]:
    shared = Path(os.environ.get("REEFCAP_SHARED", REPO.parent / "shared"))
    paths = sorted((shared / "data" / "euvp-test" / "raw").glob("*.jpg"), key=lambda p: int(p.stem))[:limit]
    if paths:
        return [p.read_bytes() for p in paths]
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(limit):  # no shared photos: noise images of the same size
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buf, format="JPEG")
        out.append(buf.getvalue())
    return out


def _model(name: str | None, workdir: Path) -> tuple[str, str]:
    from reefcap.models.registry import zoo_models

    zoo = zoo_models()
    if name:
        return name, name
    if "reefscenes-tiny-damf" in zoo:
        return str(zoo["reefscenes-tiny-damf"]), "reefscenes-tiny-damf (bundled)"
    from reefcap.models.factory import init_tiny

    path = init_tiny(workdir / "tiny")
    return str(path), "fresh tiny BLIP (bundled reefscenes-tiny-damf not present; same architecture)"


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def _summary(latencies: list[float], wall: float) -> dict[str, float]:
    return {
        "images": len(latencies),
        "images_per_s": round(len(latencies) / wall, 3),
        "p50_ms": round(_pct(latencies, 0.5) * 1000, 1),
        "p99_ms": round(_pct(latencies, 0.99) * 1000, 1),
    }


def baseline(model: str, images: list[bytes], max_length: int, threads: int | None = None) -> dict[str, float]:
    """transformers pipeline, one image at a time (with torch's default threads unless ``threads``)."""
    import io

    import torch

    default_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)

    from PIL import Image
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=model, device="cpu")
    kwargs = {"max_length": max_length, "num_beams": 1, "do_sample": False}
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    pipe(images=pil[0], text="a picture of", generate_kwargs=kwargs)  # warm-up
    latencies = []
    start = time.perf_counter()
    for im in pil:
        t = time.perf_counter()
        pipe(images=im, text="a picture of", generate_kwargs=kwargs)
        latencies.append(time.perf_counter() - t)
    torch.set_num_threads(default_threads)
    return _summary(latencies, time.perf_counter() - start)


async def _load(url: str, images: list[bytes], concurrency: int, total: int) -> dict[str, float]:
    latencies: list[float] = []
    counter = iter(range(total))
    errors = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in counter:
            t = time.perf_counter()
            r = await client.post("/v1/image-to-text", content=images[i % len(images)])
            if r.status_code != 200:
                errors += 1
            latencies.append(time.perf_counter() - t)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"concurrency": concurrency, **_summary(latencies, wall), "errors": errors}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint to serve (default: bundled reefscenes-tiny-damf, else fresh tiny)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--baseline-images", type=int, default=16)
    parser.add_argument("--requests", type=int, default=8, help="requests per client at each concurrency")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model, label = _model(args.model, Path(tmp))
        images = _images(23)
        print(f"model: {label}", flush=True)
        base = baseline(model, images[: args.baseline_images], args.max_length)
        print(f"naive baseline (transformers pipeline, 1 image at a time): {base}", flush=True)
        # The same baseline with one torch thread, as the server uses on this machine: shows how much of the
        # gain is batching rather than thread settings.
        base1 = baseline(model, images[: args.baseline_images], args.max_length, threads=1)
        print(f"naive baseline, torch threads=1: {base1}", flush=True)

        port = _free_port()
        cmd = [sys.executable, "-m", "reefcap.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--model", model, "--fallback", "none", "--backend", args.backend, "--log-level", "warning"]
        cmd += ["--max-batch-size", str(args.max_batch_size), "--feedback-db", str(Path(tmp) / "fb.sqlite3")]
        env = {**os.environ, "REEFCAP_MAX_LENGTH": str(args.max_length), "REEFCAP_NUM_BEAMS": "1"}
        env["REEFCAP_MAX_QUEUE"] = "1024"
        proc = subprocess.Popen(cmd, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None:
                    raise SystemExit(f"server exited with {proc.returncode}")
                time.sleep(0.5)
            backend = httpx.get(url + "/readyz").json()["primary"]["backend"]
            asyncio.run(_load(url, images, 4, 8))  # warm-up
            rows = []
            for c in (1, 8, 32):
                row = asyncio.run(_load(url, images, c, c * args.requests if c > 1 else 2 * args.requests))
                row["speedup_vs_baseline"] = round(row["images_per_s"] / base["images_per_s"], 2)
                row["speedup_vs_baseline_1_thread"] = round(row["images_per_s"] / base1["images_per_s"], 2)
                rows.append(row)
                print(f"server ({backend}) {row}", flush=True)
        finally:
            proc.terminate()
            proc.wait(60)

    print()
    print(f"{'':26} {'images/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'x naive':>8} {'x naive 1t':>10}")
    b, b1 = base, base1
    print(f"{'naive pipeline':26} {b['images_per_s']:9.2f} {b['p50_ms']:9.1f} {b['p99_ms']:9.1f} {1:8.2f}")
    print(f"{'naive pipeline, 1 thread':26} {b1['images_per_s']:9.2f} {b1['p50_ms']:9.1f} {b1['p99_ms']:9.1f}")
    for r in rows:
        name = f"server c={r['concurrency']}"
        s1, s2 = r["speedup_vs_baseline"], r["speedup_vs_baseline_1_thread"]
        print(f"{name:26} {r['images_per_s']:9.2f} {r['p50_ms']:9.1f} {r['p99_ms']:9.1f} {s1:8.2f} {s2:10.2f}")
    result = {"model": label, "backend": backend, "baseline": base, "baseline_1_thread": base1, "server": rows}
    result["cpus"] = os.cpu_count()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
