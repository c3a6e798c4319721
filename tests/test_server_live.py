"""`reefcap serve` as a real subprocess on 127.0.0.1: batching, overload, disconnects, fallback, hot reload,
the Hugging Face InferenceClient, the web page in headless Chromium, and draining on shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from server_helpers import LiveServer, _samples, copy_model, corrupt_copy, headless_page, metric, metric_or_zero

from reefcap.models.engines.precision import cpu_flags
from reefcap.models.policy.rolling import MIN_CIDER_IMAGES

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ADMIN = {"Authorization": "Bearer admin-key"}


@pytest.fixture(scope="module")
def models(varied_model, tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("live-models")
    return {
        # The fresh tiny model gives one plain caption for every image, so the primary is never replaced for a
        # degenerate caption and the reload test sees which primary answered.
        "primary": copy_model(tiny_model, root / "reef-primary", {"underwater": {"CIDEr": 0.5, "Bleu_4": 0.2}}),
        "better": copy_model(tiny_model, root / "reef-better", {"underwater": {"CIDEr": 0.7, "Bleu_4": 0.25}}),
        "corrupt": corrupt_copy(tiny_model, root / "reef-corrupt"),
        "fallback": varied_model,
        "root": root,
    }


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    """Primary + fallback, small batches and a small queue so overload is reachable, an API key."""
    tmp = tmp_path_factory.mktemp("live-a")
    srv = LiveServer.torch_cpu(
        tmp,
        models["primary"],
        models["fallback"],
        max_batch_size=8,
        max_wait_ms=50,
        max_queue=16,
        api_key=KEY,
        admin_key="admin-key",
        models_dir=models["root"],
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def local_captions(models):
    """``captions(model, fallback, paths)``: what a server of ``model`` (None: none loads) and ``fallback``
    answers for each image with its default decoding, computed here by the library's policy on the same
    weights, so a served caption can be checked word for word. Greedy rows do not depend on their batch."""
    from reefcap.models.engines.base import DecodeOptions, EngineConfig
    from reefcap.models.engines.torch_engine import TorchCaptionEngine
    from reefcap.models.policy import CaptionPolicy
    from reefcap.server.settings import ServerSettings

    loaded: dict = {}
    defaults = ServerSettings(_env_file=None)
    options = DecodeOptions(num_beams=defaults.num_beams, max_length=defaults.max_length)  # as CaptionService does

    def engine(path):
        if path not in loaded:
            loaded[path] = TorchCaptionEngine.load(str(path), EngineConfig(device="cpu"))
        return loaded[path]

    def captions(model, fallback, paths) -> list[str]:
        policy = CaptionPolicy(engine(model) if model else None, engine(fallback))
        return [s.caption for s in policy.caption([policy.decode(p) for p in paths], options)]

    return captions


@pytest.fixture(scope="module")
def broken_server(models, tmp_path_factory):
    """Corrupt primary, and a long max wait so a queued request stays queued long enough to walk away from."""
    tmp = tmp_path_factory.mktemp("live-b")
    srv = LiveServer.torch_cpu(tmp, models["corrupt"], models["fallback"], max_batch_size=64, max_wait_ms=1500)
    yield srv
    srv.stop()


async def _burst(url: str, bodies: list, path: str = "/v1/image-to-text", **kw) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120, headers=AUTH) as client:
        return await asyncio.gather(
            *(client.post(path, **({"content": b} if path.endswith("text") else b), **kw) for b in bodies)
        )


def test_concurrent_requests_are_batched(server, broken_server, models, euvp_images, local_captions):
    before = server.metrics()
    bodies = [p.read_bytes() for p in euvp_images[:16]]
    responses = asyncio.run(_burst(server.url, bodies))
    assert [r.status_code for r in responses] == [200] * 16
    # Batched with strangers, each image still gets its own caption: the one the same weights give it here.
    want = local_captions(models["primary"], models["fallback"], euvp_images[:16])
    assert [r.json()[0]["generated_text"] for r in responses] == want and all(want)
    # That primary says one caption for every image, which would hide answers swapped between requests; the
    # fallback-only server's captions depend on the image (its 1.5 s wait puts the burst in one batch).
    varied = asyncio.run(_burst(broken_server.url, bodies))
    want = local_captions(None, models["fallback"], euvp_images[:16])
    assert len(set(want)) > 1 and [r.json()[0]["generated_text"] for r in varied] == want
    after = server.metrics()
    batches = metric(after, "reefcap_batch_size_images_count") - metric(before, "reefcap_batch_size_images_count")
    images = metric(after, "reefcap_batch_size_images_sum") - metric(before, "reefcap_batch_size_images_sum")
    assert images >= 16 and batches < images, f"{batches} batches for {images} images: nothing was batched"


def test_default_settings_serve_the_bundled_models_on_onnx(euvp_images, tmp_path, monkeypatch):
    """`reefcap serve` as shipped: the bundled models, backend=auto, which on a CPU means ONNX Runtime."""
    for name in ("MODEL", "FALLBACK", "BACKEND", "DEVICE", "API_KEY"):
        monkeypatch.delenv(f"REEFCAP_{name}", raising=False)  # nothing may override the defaults under test
    cache = tmp_path / "cache"  # a fresh export cache: the exports are made here on first use
    env = {"REEFCAP_CACHE": str(cache), "REEFCAP_FEEDBACK_DB": str(tmp_path / "fb.sqlite3")}
    srv = LiveServer({**env, "REEFCAP_ADMIN_KEY": "admin-key"}, tmp_path / "log")
    try:
        ready = httpx.get(srv.url + "/readyz", timeout=10).json()
        assert ready["primary"]["name"] == "reefscenes-tiny-damf", ready
        assert ready["primary"]["backend"] == ready["fallback"]["backend"] == "onnx", ready
        # dtype auto: the bundled primary's stored int8 agreement holds on AVX2 and AVX-512 VNNI CPUs
        int8 = bool(cpu_flags() & {"avx2", "avx512_vnni"})
        assert (ready["primary"]["dtype"], ready["fallback"]["dtype"]) == ("int8" if int8 else "fp32", "fp32"), ready
        files = [("images", (euvp_images[0].name, euvp_images[0].read_bytes(), "image/jpeg"))]
        r = httpx.post(srv.url + "/v1/captions", files=files, timeout=60)
        assert r.status_code == 200, r.text
        result = r.json()["results"][0]
        assert result["caption"] and result["fallback"] == {"used": False, "reason": None}
        assert result["model"] == {**result["model"], "name": "reefscenes-tiny-damf", "backend": "onnx"}
        assert len(list(cache.rglob("encoder.onnx"))) == 2  # primary and fallback exported, not PyTorch's weights
        # Offline, the same defaults through the same loader: the same model object and caption (server: greedy).
        cmd = [sys.executable, "-m", "reefcap.cli", "caption", str(euvp_images[0]), "--greedy", "-q"]
        line = json.loads(
            subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, **env}).stdout
        )
        assert (line["model"], line["caption"]) == (result["model"], result["caption"])
        # A hot reload loads through the same loader and config: the primary keeps its backend and dtype.
        before = {k: ready["primary"][k] for k in ("name", "backend", "dtype", "version")}
        r = httpx.post(
            srv.url + "/v1/admin/reload", json={}, headers={"Authorization": "Bearer admin-key"}, timeout=120
        )
        assert r.status_code == 200 and r.json()["swapped"], r.text
        after = httpx.get(srv.url + "/readyz", timeout=10).json()["primary"]
        assert {k: after[k] for k in before} == before, after
    finally:
        srv.stop()


def test_malformed_images_get_json_4xx(server):
    r = httpx.post(server.url + "/v1/image-to-text", content=b"GIF89a\x01\x00broken", headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] in ("not_an_image", "truncated_image")
    files = [("images", ("a.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "image/png"))]
    r = httpx.post(server.url + "/v1/captions", files=files, headers=AUTH)
    assert 400 <= r.status_code < 500 and set(r.json()["error"]) == {"code", "message"}
    assert httpx.post(server.url + "/v1/image-to-text", content=b"x").status_code == 401


def test_hf_inference_client_round_trip(server, euvp_images):
    from huggingface_hub import InferenceClient

    client = InferenceClient(model=server.url + "/v1/image-to-text", token=KEY)
    out = client.image_to_text(euvp_images[3])
    direct = httpx.post(server.url + "/v1/image-to-text", content=euvp_images[3].read_bytes(), headers=AUTH)
    assert out.generated_text == direct.json()[0]["generated_text"]


def test_overload_answers_503_with_retry_after_never_500(server, euvp_images):
    files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in euvp_images[:4]]
    responses = asyncio.run(_burst(server.url, [{"files": files}] * 24, path="/v1/captions"))
    codes = [r.status_code for r in responses]
    assert 503 in codes and 200 in codes, codes
    assert set(codes) <= {200, 503}, codes
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded"
    assert metric(server.metrics(), "reefcap_dropped_images_total", reason="queue_full") > 0


def test_hot_reload_under_load_drops_nothing(server, models, euvp_images):
    data = [p.read_bytes() for p in euvp_images[:6]]
    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def client_loop():
        with httpx.Client(base_url=server.url, timeout=120, headers=AUTH) as c:
            while not stop.is_set():
                for d in data:
                    r = c.post("/v1/captions", files=[("images", ("x.jpg", d, "image/jpeg"))])
                    name = r.json()["results"][0]["model"]["name"] if r.status_code == 200 else r.text
                    results.append((r.status_code, name))

    threads = [threading.Thread(target=client_loop) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    worse = copy_model(models["primary"], models["root"] / "reef-worse")  # no manifest: fails the gate
    r = httpx.post(server.url + "/v1/admin/reload", json={"model": worse.name}, headers=ADMIN, timeout=120)
    assert r.status_code == 409, r.text
    r = httpx.post(server.url + "/v1/admin/reload", json={"model": "reef-better"}, headers=ADMIN, timeout=120)
    assert r.status_code == 200, r.text
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join(120)
    codes = {code for code, _ in results}
    names = [name for _, name in results]
    assert codes == {200}, results
    # Primary answers (not replaced by the fallback) came from the old model before the swap, the new one after.
    primary_names = [n for n in names if n.startswith("reef-")]
    assert "reef-primary" in primary_names and primary_names[-1] == "reef-better"
    assert httpx.get(server.url + "/readyz").json()["primary"]["name"] == "reef-better"


DROP_FILE = """([name, b64]) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const transfer = new DataTransfer();
    transfer.items.add(new File([bytes], name, { type: "image/jpeg" }));
    document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true }));
}"""
ROWS_DONE = "n => document.querySelectorAll('#results tbody tr.done').length === n"


def _page_rows(page) -> list[dict]:
    cells = ("caption", "model", "fallback", "uiqm", "uciqe")
    return page.eval_on_selector_all(
        "#results tbody tr.done",
        f"rows => rows.map(r => Object.assign({{request_id: r.dataset.requestId, name: r.querySelector('.name')"
        f".textContent}}, ...{list(cells)}.map(c => ({{[c]: r.querySelector('.' + c).textContent}}))))",
    )


@pytest.mark.heavy  # a headless Chromium
def test_web_workbench_in_headless_chromium(server, euvp_images):
    """Two images chosen at once and one dropped give three rows; a typed reference is stored in SQLite and
    the model's rolling scores on the page follow; everything through the API key typed into the page."""
    import base64
    import sqlite3

    reference = "a small fish swims over a coral reef"
    with headless_page() as page:
        page.goto(server.url + "/")
        page.fill("#key", KEY)
        page.set_input_files("#files", [str(euvp_images[5]), str(euvp_images[6])])
        page.wait_for_function(ROWS_DONE, arg=2, timeout=60_000)
        page.evaluate(DROP_FILE, ["dropped.jpg", base64.b64encode(euvp_images[7].read_bytes()).decode()])
        page.wait_for_function(ROWS_DONE, arg=3, timeout=60_000)
        rows = _page_rows(page)
        first = page.locator("#results tbody tr.done").first
        model = first.get_attribute("data-model")
        score_row = page.locator(f'#scores tbody tr[data-model="{model}"]')
        assert score_row.locator(".bleu4").all_text_contents() in ([], ["n/a"])  # no feedback yet
        first.locator(".refs").fill(reference)
        first.locator(".send").click()
        first.locator(".feedback", has_text="stored 1").wait_for(timeout=30_000)
        score_row.locator(".bleu4", has_text=".").wait_for(timeout=30_000)  # a number, no longer "n/a"
        page_scores = {c: score_row.locator("." + c).text_content() for c in ("bleu4", "cider", "images")}
        status = page.text_content("#status")
    assert [r["name"] for r in rows] == [euvp_images[5].name, euvp_images[6].name, "dropped.jpg"]
    assert "3 captioned, 0 failed" in status
    for row, path in zip(rows, euvp_images[5:8], strict=True):  # the same answers as the API gives
        direct = httpx.post(
            server.url + "/v1/captions",
            headers=AUTH,
            files=[("images", ("x.jpg", path.read_bytes(), "image/jpeg"))],
            data={"options": json.dumps({"quality": True})},
        ).json()["results"][0]
        assert row["caption"] == direct["caption"] and row["model"].startswith(direct["model"]["name"])
        assert float(row["uiqm"]) == pytest.approx(direct["quality"]["uiqm"], abs=1e-3)
        assert float(row["uciqe"]) == pytest.approx(direct["quality"]["uciqe"], abs=1e-3)
        assert row["fallback"] == "no" and len(row["request_id"]) == 32
    db = sqlite3.connect(server.log_path.parent / "fb.sqlite3")
    try:
        ids = [r["request_id"] for r in rows]
        marks = ",".join("?" * len(ids))
        stored = db.execute(f"SELECT request_id, idx, reference FROM feedback WHERE request_id IN ({marks})", ids)
        stored = stored.fetchall()
        with_refs = db.execute(  # images of this model with references: what the rolling scores cover
            "SELECT count(DISTINCT s.request_id || '/' || s.idx) FROM served s JOIN feedback f "
            "ON f.request_id = s.request_id AND f.idx = s.idx WHERE s.model = ?",
            (model,),
        ).fetchone()[0]
    finally:
        db.close()
    assert stored == [(rows[0]["request_id"], 0, reference)]
    gauges = server.metrics()
    want = metric(gauges, "reefcap_caption_quality_score", model=model, metric="Bleu_4", split="rolling")
    assert float(page_scores["bleu4"]) == pytest.approx(want, abs=1e-3), page_scores
    if with_refs >= MIN_CIDER_IMAGES:  # other tests of this module may have posted references for this model
        want = metric(gauges, "reefcap_caption_quality_score", model=model, metric="CIDEr", split="rolling")
        assert float(page_scores["cider"]) == pytest.approx(want, abs=1e-3), page_scores
    else:  # too few images for CIDEr: absent from the answer and /metrics, "n/a" on the page
        assert page_scores["cider"] == "n/a"
        rolling_cider = {"model": model, "metric": "CIDEr", "source": "feedback", "split": "rolling"}
        assert not _samples(gauges, "reefcap_caption_quality_score", rolling_cider)
    assert page_scores["images"] == str(with_refs)


def test_corrupt_primary_is_served_by_fallback(broken_server, euvp_images):
    ready = httpx.get(broken_server.url + "/readyz").json()
    assert ready["serving"] == "fallback" and ready["primary"] is None and ready["status"] == "degraded"
    assert "reef-corrupt" not in str(ready)  # no paths to anyone: why the primary is missing is in the log
    r = httpx.post(broken_server.url + "/v1/captions", files=[("images", ("x.jpg", euvp_images[0].read_bytes()))])
    res = r.json()["results"][0]
    assert r.status_code == 200 and res["fallback"] == {"used": True, "reason": "primary_unavailable"}


def _raw_request(port: int, body: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    head = (
        f"POST /v1/image-to-text HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body)
    return sock


def test_disconnected_clients_queued_work_is_dropped(broken_server, euvp_images):
    before = broken_server.metrics()
    sock = _raw_request(broken_server.port, euvp_images[1].read_bytes())
    time.sleep(0.5)  # queued: the 1.5 s max wait for a fuller batch has not passed
    sock.close()
    time.sleep(2.0)
    after = broken_server.metrics()
    dropped = metric(after, "reefcap_dropped_images_total", reason="disconnected")
    # No client had disconnected before: that series does not exist yet.
    assert dropped - metric_or_zero(before, "reefcap_dropped_images_total", reason="disconnected") == 1
    assert metric(after, "reefcap_batch_size_images_count") == metric(before, "reefcap_batch_size_images_count")


def test_sigterm_drains_in_flight_work(broken_server, models, euvp_images, local_captions):
    answer: dict = {}

    def call():
        answer["r"] = httpx.post(
            broken_server.url + "/v1/image-to-text", content=euvp_images[2].read_bytes(), timeout=60
        )

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.5)  # queued behind the 1.5 s max wait when the signal arrives
    # uvicorn re-raises the signal after its graceful shutdown, so the exit status says SIGTERM.
    assert broken_server.stop() in (0, -15)
    t.join(30)
    assert answer["r"].status_code == 200, answer["r"].text
    # The drained answer is a finished caption (the fallback's: this server's primary is corrupt), not a stub.
    assert answer["r"].json()[0]["generated_text"] == local_captions(None, models["fallback"], euvp_images[2:3])[0]


def test_serve_without_models_fails_with_one_line(tmp_path):
    env = {**os.environ, "REEFCAP_FEEDBACK_DB": str(tmp_path / "f.sqlite3")}
    cmd = [sys.executable, "-m", "reefcap.cli", "serve", "--model", str(tmp_path / "none"), "--fallback", "none"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("reefcap: error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr
    assert "no model could be loaded" in lines[0]
