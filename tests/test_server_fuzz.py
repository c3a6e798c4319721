"""Property-based fuzzing of the HTTP API (hypothesis): whatever a client sends, the answer is never a 5xx and
every error is JSON ``{"error": {"code", "message"}}``. One test sends requests of every shape; two more go
deeper into the bodies that carry values: decoding options on a valid image, and feedback for a served image.

The app runs once, in-process on a real tiny BLIP with its lifespan (batcher, SQLite feedback store), on an event
loop of its own; hypothesis drives requests at it through httpx. Any exception escaping the app fails the
example too (httpx's ASGI transport re-raises it). Examples are bounded and derandomised so the run takes tens
of seconds and a failure reproduces.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading

import httpx
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from reefcap.models.engines.base import EngineConfig
from reefcap.models.engines.torch_engine import TorchCaptionEngine
from reefcap.server.app import create_app
from reefcap.server.pool import ModelPool
from reefcap.server.settings import ServerSettings

API, ADMIN = "Bearer k3y", "Bearer adm1n"
PATHS = ["/v1/captions", "/v1/image-to-text", "/v1/feedback", "/v1/admin/reload", "/v1/models", "/readyz"]
PATHS += ["/healthz", "/metrics", "/", "/openapi.json", "/v1/admin/other", "/v1/nope"]
CTYPES = ["application/json", "APPLICATION/JSON; charset=utf-8", "application/jsonx", "multipart/form-data"]
CTYPES += ["image/png", "application/octet-stream", "text/plain", "", "multipart/form-data; boundary=x"]
SERVED = "@served"  # replaced by the id of a request the app really served, so feedback reaches the store
URL_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-_.~%/"
OPTION_KEYS = ["num_beams", "max_length", "min_length", "repetition_penalty", "prompt", "beams", "temperature"]


class AppThread:
    """The app with its lifespan on an event loop in a thread; ``request`` sends one request from any thread."""

    def __init__(self, app) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.lifespan = app.router.lifespan_context(app)
        self._call(self.lifespan.__aenter__())
        transport = httpx.ASGITransport(app=app)
        self.client = httpx.AsyncClient(transport=transport, base_url="http://fuzz.test", timeout=120)

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(300)

    def request(self, **kwargs) -> httpx.Response:
        return self._call(self.client.request(**kwargs))

    def close(self) -> None:
        self._call(self.client.aclose())
        self._call(self.lifespan.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


@pytest.fixture(scope="module")
def app(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    engine = TorchCaptionEngine.load(str(tiny_model), EngineConfig(device="cpu"))
    s = ServerSettings(
        _env_file=None,
        model=str(tiny_model),
        backend="torch",
        device="cpu",
        feedback_db=tmp / "fb.sqlite3",
        max_wait_ms=1,
        inference_threads=torch.get_num_threads(),
        api_key=API.split()[1],
        admin_key=ADMIN.split()[1],
        models_dir=tmp,
    )
    running = AppThread(create_app(s, ModelPool(engine, None)))
    served = running.request(
        method="POST", url="/v1/image-to-text", content=_png((32, 32)), headers={"Authorization": API}
    )
    assert served.status_code == 200, served.text
    running.served_id = served.headers["x-request-id"]
    yield running
    running.close()


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (size[0] % 256, 60, 120)).save(buf, format="PNG")
    return buf.getvalue()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
# Strategies listed more than once in one_of are drawn more often: most values are of the right type (so the
# request gets past validation to the code behind it), the rest anything.
images = st.builds(_png, st.tuples(st.integers(1, 48), st.integers(1, 48)))
image_bytes = st.one_of(images, images, images, st.binary(max_size=64))
valid_b64 = images.map(lambda b: base64.b64encode(b).decode())
b64 = st.one_of(valid_b64, valid_b64, valid_b64, st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()))
b64 |= st.text(max_size=12)
option_values = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.integers(0, 600) | st.floats()
option_values |= st.text(max_size=30) | st.just("a " * 90)
# Each option in its range or beyond it (lengths past the model's text positions, an 80-word prompt), or wild.
typed = {
    "num_beams": st.integers(1, 16),
    "max_length": st.integers(1, 600),
    "min_length": st.integers(1, 600),
    "repetition_penalty": st.floats(0.5, 5),
    "prompt": st.text(max_size=30) | st.just("a " * 90),
}
typed_options = st.fixed_dictionaries({}, optional=typed)
options = st.one_of(
    typed_options,
    typed_options,
    typed_options,
    st.dictionaries(st.sampled_from(OPTION_KEYS), option_values, max_size=4),
)
captions_json = st.fixed_dictionaries(
    {"images": st.lists(st.fixed_dictionaries({"data": b64}), min_size=1, max_size=3) | st.just([])},
    optional={"options": options},
)
references = st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=3)
indexes = st.integers(0, 3) | st.sampled_from([-1, 2**31, 2**63 - 1, 2**63, 2**64]) | st.integers(-(2**70), 2**70)
feedback_json = st.fixed_dictionaries(
    {
        "request_id": st.one_of(st.just(SERVED), st.just(SERVED), st.text(max_size=70), st.integers()),
        "references": st.one_of(references, references, references, json_values),
    },
    optional={"index": indexes},
)
reload_json = st.fixed_dictionaries({}, optional={"model": st.text(max_size=40) | json_values})
depths = st.sampled_from([2, 100, 1_000, 10_000, 100_000]) | st.integers(1, 100_000)
deeply_nested = depths.map(lambda n: b'{"images": ' + b"[" * n + b"]" * n + b"}")


def _weighted(*pairs: tuple[int, object]) -> st.SearchStrategy:
    return st.sampled_from([value for weight, value in pairs for _ in range(weight)])


@st.composite
def requests(draw) -> dict:
    """One request, most of it well-formed for its route (so bodies reach the code behind the gateway), with
    random values inside and, often, one part of it wrong: method, path, key, content type or body shape."""
    route = draw(_weighted((4, "/v1/captions"), (2, "/v1/image-to-text"), (2, "/v1/feedback"), (1, "/v1/admin/reload")))
    wrong = draw(_weighted((6, "nothing"), (1, "method"), (1, "path"), (1, "auth"), (1, "ctype"), (1, "shape")))
    path = (
        route if wrong != "path" else draw(st.sampled_from(PATHS) | st.text(URL_CHARS, max_size=12).map("/v1/".__add__))
    )
    method = "POST" if wrong != "method" else draw(st.sampled_from(["GET", "PUT", "DELETE", "OPTIONS", "HEAD"]))
    auth = ADMIN if route.startswith("/v1/admin") else API
    if wrong == "auth":
        auth = draw(st.sampled_from([ADMIN, API, "bearer k3y", "", "x", "Bearer"]))
    headers = {"Authorization": auth} if auth else {}
    shape = {"/v1/captions": "captions", "/v1/image-to-text": "raw", "/v1/feedback": "feedback"}.get(route, "reload")
    if route == "/v1/captions" and draw(st.booleans()):
        shape = "multipart"
    if wrong == "shape":
        shape = draw(
            _weighted(
                (1, "captions"),
                (1, "raw"),
                (1, "feedback"),
                (1, "reload"),
                (1, "multipart"),
                (1, "json"),
                (3, "nested"),
                (1, "bytes"),
            )
        )
    if shape == "multipart":
        return {"method": method, "url": path, "headers": headers, **draw(multipart_parts())}
    bodies = {"captions": captions_json, "feedback": feedback_json, "reload": reload_json, "json": json_values}
    if shape in bodies:
        body, ctype = json.dumps(draw(bodies[shape]), allow_nan=True).encode(), "application/json"
    else:
        body = draw({"raw": image_bytes, "nested": deeply_nested, "bytes": st.binary(max_size=80)}[shape])
        ctype = "application/json" if shape == "nested" else "image/png"
    if wrong == "ctype":
        ctype = draw(st.sampled_from(CTYPES) | st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20))
    return {"method": method, "url": path, "headers": {**headers, "Content-Type": ctype}, "content": body}


@st.composite
def multipart_parts(draw) -> dict:
    files = [("images", ("a.png", b, "image/png")) for b in draw(st.lists(image_bytes, max_size=3))]
    extra = draw(st.sampled_from(["none", "field", "file", "stray"]))
    opts = json.dumps(draw(options)).encode()
    if extra == "file":
        files.append(("options", ("o.json", opts, "application/json")))
    elif extra == "stray":
        files.append((draw(st.text(min_size=1, max_size=6)), ("s", b"x", "text/plain")))
    return {"files": files or None, "data": {"options": opts.decode()} if extra == "field" else None}


FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _check(app: AppThread, req: dict) -> httpx.Response:
    """Send ``req`` and hold the answer to the property: no 5xx, and every error JSON ``{"error": ...}``."""
    if isinstance(req.get("content"), bytes):
        req["content"] = req["content"].replace(SERVED.encode(), app.served_id.encode())
    r = app.request(**req)
    event(f"{req['method']} {req['url'] if req['url'] in PATHS else 'other'} -> {r.status_code}")
    assert r.status_code < 500, (req, r.status_code, r.text[:300])
    if r.status_code >= 400 and req["method"] != "HEAD":
        body = r.json()
        assert set(body) == {"error"} and set(body["error"]) >= {"code", "message"}, body
        assert isinstance(body["error"]["code"], str) and body["error"]["message"]
    return r


@settings(FUZZ, max_examples=400)
@given(req=requests())
def test_no_request_gets_a_5xx_and_every_error_is_json(app, req):
    _check(app, req)


@settings(FUZZ, max_examples=60)
@given(image=images, opts=typed_options, multipart=st.booleans())
def test_any_decoding_options_are_captioned_or_refused_with_a_4xx(app, image, opts, multipart):
    """Typed, in or out of range: the options a well-formed caption request may carry (its most costly part)."""
    if multipart:
        files = [("images", ("a.png", image, "image/png")), ("options", ("o.json", json.dumps(opts).encode()))]
        req = {"files": files}
    else:
        body = {"images": [{"data": base64.b64encode(image).decode()}], "options": opts}
        req = {"content": json.dumps(body).encode(), "headers": {"Content-Type": "application/json"}}
    req = {"method": "POST", "url": "/v1/captions", **req}
    req["headers"] = {**req.get("headers", {}), "Authorization": API}
    _check(app, req)


@settings(FUZZ, max_examples=60)
@given(body=feedback_json)
def test_any_feedback_is_stored_or_refused_with_a_4xx(app, body):
    """References for the image the app served (or for unknown ids), at any index."""
    content = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "Authorization": API}
    _check(app, {"method": "POST", "url": "/v1/feedback", "headers": headers, "content": content})
