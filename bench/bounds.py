"""Issue 13 figures: what an expensive client costs a normal one, and what a feedback post costs at 4,000
references. Runs ``reefcap serve`` (bundled models, defaults) as a subprocess of whichever reefcap is on the
path, so the same script measures a checkout before and after a change:

    python scripts/bench_bounds.py                # prints one JSON object

(a) a normal client sends one image at a time (default decoding) for ``--seconds``, alone and then while
``--expensive`` clients loop on requests of 16 images x num_beams 16 x max_length 64 (the issue's
expensive request; refused by a server with a cost budget) and, separately, on the largest request the
default budget of 2048 admits (16 images x 4 beams x 32 tokens). Its p50/p99 latency and the expensive
clients' statuses are reported.
(b) 200 served images get 20 references each (4,000 in the window), then ``--posts`` more posts on new
images are timed one by one (median and max, milliseconds).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

EXPENSIVE = {"num_beams": 16, "max_length": 64}
IN_BUDGET = {"num_beams": 4, "max_length": 32}


def _photos() -> list[bytes]:
    root = Path(__file__).resolve().parent.parent / "examples" / "photos" / "euvp" / "raw"
    return [p.read_bytes() for p in sorted(root.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg", ".png")]


def _serve(tmp: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "REEFCAP_PORT": str(port), "REEFCAP_FEEDBACK_DB": str(tmp / "fb.sqlite3")}
    cmd = [sys.executable, "-m", "reefcap.cli", "serve", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "log", "wb"))  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"server did not start: {(tmp / 'log').read_text()[-2000:]}")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1) if ordered else float("nan")


async def _normal(client: httpx.AsyncClient, photos: list[bytes], seconds: float) -> list[float]:
    latencies, end, i = [], time.monotonic() + seconds, 0
    while time.monotonic() < end:
        start = time.perf_counter()
        r = await client.post("/v1/image-to-text", content=photos[i % len(photos)])
        if r.status_code == 200:
            latencies.append(time.perf_counter() - start)
        i += 1
    return latencies


async def _expensive(client: httpx.AsyncClient, photos: list[bytes], options: dict, stop: asyncio.Event) -> Counter:
    body = {"images": [{"data": base64.b64encode(photos[i % len(photos)]).decode()} for i in range(16)]}
    body["options"] = options
    statuses: Counter = Counter()
    while not stop.is_set():
        r = await client.post("/v1/captions", json=body)
        statuses[r.status_code] += 1
        if r.status_code != 200:
            await asyncio.sleep(0.05)  # a refused client retries, as a real one would
    return statuses


async def contention(url: str, photos: list[bytes], seconds: float, clients: int) -> dict:
    out: dict = {}
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await _normal(client, photos, 2)  # warm
        alone = await _normal(client, photos, seconds)
        out["alone"] = {"p50_ms": _pct(alone, 0.5), "p99_ms": _pct(alone, 0.99), "requests": len(alone)}
        for name, options in (("expensive", EXPENSIVE), ("in_budget", IN_BUDGET)):
            stop = asyncio.Event()
            hogs = [asyncio.ensure_future(_expensive(client, photos, options, stop)) for _ in range(clients)]
            await asyncio.sleep(0.5)
            lat = await _normal(client, photos, seconds)
            stop.set()
            statuses = sum((await asyncio.gather(*hogs)), Counter())
            out[f"with_{name}"] = {
                "p50_ms": _pct(lat, 0.5),
                "p99_ms": _pct(lat, 0.99),
                "requests": len(lat),
                "their_statuses": dict(statuses),
                "options": options,
            }
    return out


def feedback_posts(url: str, photo: bytes, posts: int) -> dict:
    words = [
        "a",
        "the",
        "fish",
        "turtle",
        "reef",
        "coral",
        "ray",
        "shark",
        "diver",
        "swims",
        "over",
        "near",
        "blue",
        "green",
        "small",
        "school",
        "of",
    ]

    def ref(n: int) -> str:
        return " ".join(words[(n * 7 + k * 3) % len(words)] for k in range(6 + n % 5))

    with httpx.Client(base_url=url, timeout=600) as client:

        def served() -> str:
            r = client.post("/v1/captions", files=[("images", ("a.jpg", photo, "image/jpeg"))])
            return r.json()["request_id"]

        for i in range(200):
            r = client.post(
                "/v1/feedback", json={"request_id": served(), "references": [ref(i * 20 + k) for k in range(20)]}
            )
            assert r.status_code == 200, r.text
        times = []
        for i in range(posts):
            rid = served()
            start = time.perf_counter()
            r = client.post("/v1/feedback", json={"request_id": rid, "references": [ref(10_000 + i), ref(20_000 + i)]})
            times.append(time.perf_counter() - start)
            assert r.status_code == 200, r.text
    return {"references_in_window": 4000 + 2 * posts, "median_ms": _pct(times, 0.5), "max_ms": _pct(times, 1.0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="normal client's measuring time per phase")
    parser.add_argument("--expensive", type=int, default=2, help="expensive clients")
    parser.add_argument("--posts", type=int, default=10, help="timed feedback posts")
    args = parser.parse_args(argv)
    photos = _photos()
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = _serve(Path(tmp))
        try:
            result = {"contention": asyncio.run(contention(url, photos, args.seconds, args.expensive))}
            result["feedback"] = feedback_posts(url, photos[0], args.posts)
        finally:
            proc.terminate()
            proc.wait(60)
    result["cpu"] = f"{os.cpu_count()} logical cores"
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
