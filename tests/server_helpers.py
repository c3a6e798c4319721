"""Helpers for the server tests: model folders with manifests, a collapsed model, image bytes."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import shutil
from pathlib import Path

from PIL import Image


def copy_model(src: Path, dst: Path, metrics: dict | None = None) -> Path:
    """A copy of a checkpoint folder, with a manifest.json holding ``metrics`` and the SHA-256 of every file
    (what `reefcap train` and `zoo-pack` write, so the quality gate's hash check passes) when given."""
    shutil.copytree(src, dst)
    (dst / "manifest.json").unlink(missing_ok=True)
    if metrics is not None:
        write_manifest(dst, {"metrics": metrics})
    return dst


def write_manifest(folder: Path, manifest: dict) -> dict:
    """``manifest`` plus the real SHA-256 of every file in ``folder``, written as its manifest.json."""
    from reefcap.models.registry import sha256_file

    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != "manifest.json"}
    payload = {**manifest, "files": files}
    (folder / "manifest.json").write_text(json.dumps(payload))
    return payload


def collapsed_model(src: Path, dst: Path, word: str = "coral") -> Path:
    """A real checkpoint whose decoder always prefers one word: greedy decoding loops on it (DAMF's collapse)."""
    import torch
    from transformers import BertTokenizer, BlipForConditionalGeneration

    model = BlipForConditionalGeneration.from_pretrained(src)
    tok = BertTokenizer.from_pretrained(src)
    token = tok.convert_tokens_to_ids(word)
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[token] += 100.0
    model.save_pretrained(dst)
    for f in src.iterdir():
        if not (dst / f.name).exists():
            shutil.copy(f, dst / f.name)
    return dst


def unchecked_engine_class():
    """The PyTorch engine with its text-position check off: a model whose generate really raises (IndexError past
    its positions) on options that look valid, which is how these tests make a primary fault. A real engine
    refuses such options up front as the request's fault (``check_options``)."""
    from reefcap.models.engines.torch_engine import TorchCaptionEngine

    class UncheckedEngine(TorchCaptionEngine):
        def text_positions(self) -> int | None:
            return None

    return UncheckedEngine


def corrupt_copy(src: Path, dst: Path) -> Path:
    """A copy whose weights file is cut in half."""
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return dst


def png_bytes(size: tuple[int, int] = (64, 48), color=(10, 80, 120)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


class LiveServer:
    """``reefcap serve`` as a real subprocess on 127.0.0.1, configured through REEFCAP_* variables."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        import os
        import socket
        import subprocess
        import sys
        import time

        import httpx

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        full = {**os.environ, **env, "REEFCAP_HOST": "127.0.0.1", "REEFCAP_PORT": str(self.port)}
        self.log_path = log_path
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "reefcap.cli", "serve", "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, env=full, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not ready in time: {log_path.read_text()[-2000:]}")

    @classmethod
    def torch_cpu(cls, tmp: Path, model: Path, fallback: Path, **settings: object) -> LiveServer:
        """A PyTorch-on-CPU server for ``model`` and ``fallback`` with its feedback database and log in ``tmp``;
        ``settings`` are further server settings by name (``max_wait_ms=50`` -> ``REEFCAP_MAX_WAIT_MS``)."""
        env = {"REEFCAP_MODEL": str(model), "REEFCAP_FALLBACK": str(fallback), "REEFCAP_BACKEND": "torch"}
        env |= {"REEFCAP_DEVICE": "cpu", "REEFCAP_FEEDBACK_DB": str(tmp / "fb.sqlite3")}
        env |= {f"REEFCAP_{name.upper()}": str(value) for name, value in settings.items()}
        return cls(env, tmp / "server.log")

    def metrics(self) -> str:
        import httpx

        return httpx.get(self.url + "/metrics", timeout=10).text

    def stop(self) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except Exception:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def raw_caption_request(key: str) -> bytes:
    """The bytes of one ``POST /v1/captions`` of a single PNG (multipart, ``Connection: close``), for bursts
    written straight to sockets."""
    boundary = "reefcapburst"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + png_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /v1/captions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


async def send_raw(port: int, request: bytes) -> tuple[int | str, dict[str, str]]:
    """Write ``request`` to a fresh loopback connection and read to EOF (``Connection: close``): the status and
    the lower-cased headers, or why there was no answer (an ``OSError``'s name, or "closed unanswered")."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        data = await reader.read()
        writer.close()
    except OSError as exc:
        return type(exc).__name__, {}
    if not data:
        return "closed unanswered", {}
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    return int(head[0].split()[1]), {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}


def _samples(text: str, name: str, labels: dict) -> list[float]:
    """Values of the samples of series ``name`` whose labels include ``labels`` (exposition text format)."""
    want = {k: str(v) for k, v in labels.items()}
    out = []
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        sample, _, rest = head.partition("{")
        if sample == name and want.items() <= dict(_LABEL.findall(rest)).items():
            out.append(float(value))
    return out


def metric(text: str, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``; fails when there is none.

    A missing series is an error, not 0: read as 0, a misspelt name or label would pass every ``== 0`` check.
    """
    values = _samples(text, name, labels)
    assert values, f"no sample of {name} with labels {labels} in /metrics"
    return sum(values)


def metric_or_zero(text: str, name: str, **labels) -> float:
    """Like :func:`metric`, but 0 for a labelled series never incremented (prometheus shows none until then).

    The metric family must still be declared (its ``# TYPE`` line), so a misspelt name fails here too.
    """
    declared = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    family = re.sub(r"_(count|sum|bucket)$", "", name)
    assert name in declared or family in declared, f"metric {name} is not declared in /metrics"
    return float(sum(_samples(text, name, labels)))


def serve(settings, pool, scenario):
    """Run ``scenario(client, app)`` against the app built from ``settings`` and ``pool``, with its lifespan,
    in-process (httpx's ASGI transport)."""
    import asyncio

    import httpx

    from reefcap.server.app import create_app

    async def main():
        app = create_app(settings, pool)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://reefcap.test", timeout=60) as client:
                return await scenario(client, app)

    return asyncio.run(main())


@contextlib.contextmanager
def headless_page():
    """A page in Debian's headless Chromium driven by playwright (skipped where chromium is missing, failed on
    CI, whose .ci/run installs it); the browser closes on the way out."""
    import os

    import pytest

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=args)
        try:
            yield browser.new_page()
        finally:
            browser.close()
