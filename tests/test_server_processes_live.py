"""Issue 24: `reefcap serve --workers 2` as a real supervisor and two uvicorn workers on one port of 127.0.0.1.

One server for the module (PyTorch on the CPU, an API key, an admin key, a MODELS_DIR holding a new version of
the primary). Every request goes over a fresh connection, so the kernel's SO_REUSEPORT hash spreads them over
both workers; ``X-Reefcap-Worker`` says which answered. Checks, in order: /metrics on either worker counts every
image both served; feedback for a request one worker served is taken by either; one admin reload reaches both
workers while requests keep being answered; a burst of 600 concurrent requests gets an HTTP answer each; a
worker killed with SIGKILL under load is replaced, the other keeps answering and no acknowledged feedback is
lost (last, and under `slow`: it changes the workers, and the replacement takes a model load).
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from server_helpers import (
    LiveServer,
    copy_model,
    metric,
    metric_or_zero,
    png_bytes,
    raw_caption_request,
    send_raw,
    write_manifest,
)

from reefcap.server.settings import ServerSettings

KEY, ADMIN_KEY = "workers-key", "workers-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def nudged_model(src, dst):
    """A copy of ``src`` with one bias moved by 1e-6: another weights version (hash) with the same captions, so
    the quality gate accepts it and a reload visibly changes the version every worker names."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = copy_model(src, dst)
    weights = load_file(folder / "model.safetensors")
    name = next(n for n in sorted(weights) if n.endswith("bias") and weights[n].dtype == torch.float32)
    weights[name] = weights[name] + 1e-6
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    write_manifest(folder, {})
    return folder


@pytest.fixture(scope="module")
def server(tiny_model, euvp_images, tmp_path_factory):
    from reefcap.models.data.records import CaptionRecord, write_coco

    tmp = tmp_path_factory.mktemp("workers")
    models_dir = tmp / "models"
    nudged_model(tiny_model, models_dir / "v2")
    gate = tmp / "gate" / "gate.json"  # four photos: the gate's two runs take a second, not the probe set's 48
    write_coco([CaptionRecord(i, p, ("a reef with fish",)) for i, p in enumerate(euvp_images[:4])], gate)
    srv = LiveServer.torch_cpu(
        tmp,
        tiny_model,
        "",
        workers=2,
        api_key=KEY,
        admin_key=ADMIN_KEY,
        models_dir=models_dir,
        gate_set=gate,
        generation_poll_s=0.2,
    )
    srv.db = tmp / "fb.sqlite3"
    assert _wait_both(lambda: httpx.get(srv.url + "/readyz", timeout=10)), "only one worker ever answered"
    yield srv
    srv.stop()


def _worker(r: httpx.Response) -> int:
    return int(r.headers["x-reefcap-worker"])


def _wait_both(call, timeout: float = 60) -> bool:
    """Call ``call()`` (a fresh connection each time) until answers from both workers were 200."""
    seen, deadline = set(), time.monotonic() + timeout
    while len(seen) < 2 and time.monotonic() < deadline:
        r = call()
        if r.status_code == 200:
            seen.add(_worker(r))
    return len(seen) == 2


def _caption(srv: LiveServer, color=(10, 80, 120)) -> httpx.Response:
    files = [("images", ("a.png", png_bytes(color=color), "image/png"))]
    return httpx.post(srv.url + "/v1/captions", files=files, headers=AUTH, timeout=60)


def _images_total(text: str) -> float:
    return metric_or_zero(text, "reefcap_images_captioned_total")


def test_the_default_is_one_worker_and_workers_divide_the_cores(monkeypatch):
    from reefcap.server.processes import worker_settings

    assert ServerSettings(_env_file=None).workers == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    split = worker_settings(ServerSettings(_env_file=None, workers=2))
    assert (split.inference_threads, split.inference_workers) == (1, 1)  # one thread and one batch each
    chosen = worker_settings(ServerSettings(_env_file=None, workers=2, inference_threads=3, inference_workers=2))
    assert (chosen.inference_threads, chosen.inference_workers) == (3, 2)  # what the settings say stands
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    split = worker_settings(ServerSettings(_env_file=None, workers=4))
    assert (split.inference_threads, split.inference_workers) == (4, 0)  # 0: the warm-up decides, per worker


def test_every_scrape_counts_the_images_both_workers_served(server):
    before = _images_total(server.metrics())
    answers = [_caption(server, (i, 40, 90)) for i in range(16)]
    assert [r.status_code for r in answers] == [200] * 16
    assert {_worker(r) for r in answers} == {0, 1}, "one worker served everything: the test would prove nothing"
    scrapes = [httpx.get(server.url + "/metrics", timeout=10) for _ in range(12)]
    assert {_worker(r) for r in scrapes} == {0, 1}
    for r in scrapes:  # before: each worker counted only its own images
        assert _images_total(r.text) == before + 16, (_worker(r), _images_total(r.text), before)
    pids = {line.split('pid="')[1].split('"')[0] for line in scrapes[0].text.splitlines() if "model_info{" in line}
    assert len(pids) == 2, pids  # one series per live worker


def test_feedback_for_what_either_worker_served_is_taken_by_either(server):
    """16 clients at once, each posting feedback as soon as its caption is answered, both on fresh connections."""

    def pair(i: int) -> tuple[httpx.Response, httpx.Response]:
        served = _caption(server, (200, i * 10, 30))
        body = {"request_id": served.json()["request_id"], "index": 0, "references": [f"a reef with {i} fish"]}
        return served, httpx.post(server.url + "/v1/feedback", json=body, headers=AUTH, timeout=30)

    with ThreadPoolExecutor(16) as pool:
        pairs = list(pool.map(pair, range(16)))
    posts = [p for _, p in pairs]
    assert [p.status_code for p in posts] == [200] * 16, [p.text for p in posts if p.status_code != 200]
    crossed = sum(_worker(s) != _worker(p) for s, p in pairs)
    assert crossed > 0, "no post went to the other worker"  # one store per process: 404 unknown_request
    # The rolling scores come from the shared store: every worker's scrape shows the same, all 16 images in.
    rolling = set()
    for _ in range(8):
        text = httpx.get(server.url + "/metrics", timeout=10).text
        rolling.add(metric(text, "reefcap_caption_quality_score", metric="Bleu_4", source="feedback"))
    assert len(rolling) == 1, rolling
    assert max(p.json()["rolling"]["images"] for p in posts) >= 16


def test_one_reload_reaches_every_worker_while_requests_keep_being_answered(server):
    old = httpx.get(server.url + "/readyz").json()["primary"]["version"]
    statuses, versions, stop = collections.Counter(), collections.Counter(), threading.Event()

    def load() -> None:
        while not stop.is_set():
            r = _caption(server)
            statuses[r.status_code] += 1
            if r.status_code == 200:
                versions[r.json()["results"][0]["model"]["version"]] += 1

    clients = [threading.Thread(target=load) for _ in range(3)]
    for t in clients:
        t.start()
    try:
        r = httpx.post(server.url + "/v1/admin/reload", json={"model": "v2"}, headers=ADMIN, timeout=120)
        assert r.status_code == 200 and r.json()["swapped"], r.text
        new, generation = r.json()["primary"]["version"], r.json()["generation"]
        assert new != old and generation >= 1

        def on_new() -> httpx.Response:
            ready = httpx.get(server.url + "/readyz", timeout=10)
            good = ready.json()["primary"]["version"] == new and ready.json()["generation"] == generation
            return ready if good else httpx.Response(503, headers=ready.headers)

        assert _wait_both(on_new, 30), "a worker still serves the old version"
        time.sleep(0.5)
    finally:
        stop.set()
        for t in clients:
            t.join()
    assert set(statuses) == {200}, statuses  # no request failed while the workers swapped
    results = [_caption(server) for _ in range(12)]
    assert {_worker(r) for r in results} == {0, 1}
    assert {r.json()["results"][0]["model"]["version"] for r in results} == {new}
    assert versions[new] > 0


def test_a_burst_of_600_concurrent_requests_gets_an_answer_each(server):
    request = raw_caption_request(KEY)

    async def burst():
        return await asyncio.wait_for(asyncio.gather(*(send_raw(server.port, request) for _ in range(600))), 120)

    answers = asyncio.run(burst())
    counts = collections.Counter(str(status) for status, _ in answers)
    assert set(counts) <= {"200", "429", "503"}, f"some of 600 got no HTTP answer: {counts}"
    assert all("retry-after" in h for s, h in answers if s in (429, 503))
    assert {h["x-reefcap-worker"] for s, h in answers if s == 200} == {"0", "1"}, counts
    assert counts["200"] >= 100, counts
    assert _caption(server).status_code == 200


def _worker_pids(srv: LiveServer) -> set[int]:
    text = srv.metrics()
    return {int(line.split('pid="')[1].split('"')[0]) for line in text.splitlines() if "model_info{" in line}


@pytest.mark.slow  # 15-20 s on 2 vCPUs, most of it the replacement loading its model: `make test-slow`
def test_a_worker_killed_under_load_is_replaced_and_no_acknowledged_feedback_is_lost(server):
    pids = _worker_pids(server)
    assert len(pids) == 2
    acknowledged, errors, answered_after, stop = [], [], [0], threading.Event()
    killed_at = [float("inf")]

    def client(k: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                r = _caption(server, (k * 40, i % 250, 7))
                if r.status_code != 200:
                    errors.append(r.status_code)
                    continue
                ref = f"client {k} image {i} a reef"
                body = {"request_id": r.json()["request_id"], "index": 0, "references": [ref]}
                p = httpx.post(server.url + "/v1/feedback", json=body, headers=AUTH, timeout=30)
                if p.status_code == 200:
                    acknowledged.append((body["request_id"], ref))
                    if time.monotonic() > killed_at[0] + 1:
                        answered_after[0] += 1
                else:
                    errors.append(p.status_code)
            except httpx.HTTPError as exc:  # what the killed worker held: a reset or an empty answer
                errors.append(type(exc).__name__)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        killed_at[0] = time.monotonic()
        time.sleep(3)  # the load goes on: the other worker answers it
    finally:
        stop.set()
        for t in threads:
            t.join()
    deadline = time.monotonic() + 90
    while (victim in _worker_pids(server) or len(_worker_pids(server)) < 2) and time.monotonic() < deadline:
        time.sleep(0.5)
    replaced = _worker_pids(server)
    assert victim not in replaced and len(replaced) == 2, replaced  # its live series gone, a new worker in
    assert answered_after[0] > 0, "nobody was answered after the kill"
    assert len(errors) <= 6, errors  # only what was in flight on the killed worker
    with sqlite3.connect(server.db) as db:  # every acknowledged reference is in the shared database
        stored = set(db.execute("SELECT request_id, reference FROM feedback").fetchall())
    missing = [a for a in acknowledged if a not in stored]
    assert acknowledged and not missing, missing[:5]
    assert _wait_both(lambda: _caption(server)), "the replacement does not answer"
