"""Issue 25: what an outsider hits on `reefcap serve` as a real uvicorn subprocess on 127.0.0.1.

One server for the module, at the default limits, with an API key, an admin key and a MODELS_DIR holding a
link to a model outside it. Checks: links out of MODELS_DIR (2), two Authorization headers (3), the security
headers and local docs assets (4), `reefcap caption --server` against a wrong key and no server (6), one
error voice for malformed HTTP, huge heads, too many images, huge images, references, model names and reload
bodies (7), and a burst past the connection limit (8, last: it loads the server most).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import re
import socket
import struct
import zlib

import httpx
import pytest
from server_helpers import LiveServer, copy_model, headless_page, png_bytes, raw_caption_request, send_raw

KEY, ADMIN_KEY = "outsider-key", "outsider-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("outsider")
    models_dir = tmp / "models"
    models_dir.mkdir()
    # A real model with an honest manifest outside MODELS_DIR, so only where it lives can stop its reload.
    outside = copy_model(tiny_model, tmp / "elsewhere" / "outside-model", {})
    (models_dir / "linked").symlink_to(outside, target_is_directory=True)
    srv = LiveServer.torch_cpu(tmp, tiny_model, "", api_key=KEY, admin_key=ADMIN_KEY, models_dir=models_dir)
    yield srv
    srv.stop()


def _raw(srv: LiveServer, request: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` on a fresh connection and read the answer until the server closes it."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data, "the server closed the connection without an answer"
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _error(r: httpx.Response | tuple) -> dict:
    """The JSON error of an answer, after checking it is one."""
    if isinstance(r, tuple):
        _, headers, body = r
        assert headers["content-type"].startswith("application/json"), headers
        return json.loads(body)["error"]
    assert r.headers["content-type"].startswith("application/json"), r.headers
    return r.json()["error"]


def test_a_link_out_of_models_dir_is_not_followed(server):
    # Before: the outside model loaded through the gate (200) as if it were in MODELS_DIR.
    r = httpx.post(server.url + "/v1/admin/reload", json={"model": "linked"}, headers=ADMIN, timeout=180)
    assert r.status_code == 404 and _error(r)["code"] == "unknown_model", r.text
    primary = httpx.get(server.url + "/v1/models", headers=AUTH).json()["models"][0]
    assert primary["role"] == "primary" and primary["name"] != "outside-model"


def test_links_inside_models_dir_are_followed_and_files_linked_out_are_not(tiny_model, tmp_path):
    from reefcap.server.admin import reload_target
    from reefcap.server.gateway import ApiError

    root = tmp_path / "models"
    release = copy_model(tiny_model, root / "releases" / "v4")
    (root / "v4").symlink_to(release, target_is_directory=True)
    assert reload_target("v4", root, "primary") == str(release.resolve())  # what loads is the real folder
    sneaky = copy_model(tiny_model, root / "sneaky")  # a folder inside whose weights are a link out
    (sneaky / "model.safetensors").unlink()
    (sneaky / "model.safetensors").symlink_to(tiny_model / "model.safetensors")
    with pytest.raises(ApiError) as refused:
        reload_target("sneaky", root, "primary")
    assert (refused.value.status, refused.value.code) == (404, "unknown_model")


def test_two_authorization_headers_are_refused(server):
    # Before: the last one won, so a wrong key followed by the right one answered 200.
    for keys in (("wrong", KEY), (KEY, "wrong"), (KEY, KEY)):
        headers = [("Authorization", f"Bearer {k}") for k in keys]
        r = httpx.get(server.url + "/v1/models", headers=headers)
        assert r.status_code in (400, 401), (keys, r.status_code)
        assert "Authorization" in _error(r)["message"]
    assert httpx.get(server.url + "/v1/models", headers=AUTH).status_code == 200


def test_page_and_docs_send_security_headers_and_nothing_comes_from_elsewhere(server):
    page = httpx.get(server.url + "/")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "'unsafe-inline'" not in csp
    assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
    api = httpx.get(server.url + "/healthz")
    assert api.headers["x-content-type-options"] == "nosniff" and "frame-ancestors 'none'" in api.headers.get(
        "content-security-policy", ""
    )
    docs = httpx.get(server.url + "/docs", headers=AUTH)
    assert docs.status_code == 200 and "frame-ancestors 'none'" in docs.headers["content-security-policy"]
    assert "'unsafe-inline'" not in docs.headers["content-security-policy"].split("script-src", 1)[1].split(";")[0]
    # Before: swagger-ui-bundle.js and swagger-ui.css from https://cdn.jsdelivr.net, unpinned.
    assets = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
    assert assets and not [a for a in assets if "//" in a], assets
    for asset in assets:
        r = httpx.get(httpx.URL(server.url + "/docs").join(asset), headers=AUTH)
        assert r.status_code == 200 and r.headers["x-content-type-options"] == "nosniff", asset
        assert len(r.content) > 100, asset


@pytest.mark.heavy  # a headless Chromium
def test_page_and_docs_work_in_chromium_under_their_policies(server):
    """The page's script runs and Swagger UI renders the schema, with no CSP violation and no request that
    leaves the server."""
    watch = (
        "window.__csp = []; document.addEventListener('securitypolicyviolation', "
        "e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"
    )
    with headless_page() as page:
        elsewhere = []
        page.on("request", lambda req: None if req.url.startswith(server.url) else elsewhere.append(req.url))
        page.add_init_script(watch)
        page.goto(server.url + "/")
        # A function, not an expression: playwright would eval() an expression in the page, which its CSP forbids.
        page.wait_for_function("() => document.querySelector('#scores-status').textContent.includes('unauthorized')")
        assert page.evaluate("window.__csp") == []
        page.set_extra_http_headers(AUTH)
        page.goto(server.url + "/docs")
        page.locator(".swagger-ui .info .title", has_text="reefcap").wait_for(timeout=30_000)
        page.locator(".opblock-summary-path", has_text="/v1/captions").first.wait_for(timeout=30_000)
        assert page.evaluate("window.__csp") == []
    assert elsewhere == []


def _caption_cli(capsys, *args: str) -> tuple[int, str, str]:
    from reefcap.cli import main

    code = main(["caption", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_caption_cli_stops_at_once_on_a_wrong_key_or_no_server(server, euvp_images, capsys):
    images = [str(p) for p in euvp_images[:6]]
    # Before: one "unauthorized" line per image on stdout, exit 1.
    code, out, err = _caption_cli(capsys, *images, "--server", server.url, "--api-key", "wrong")
    assert (code, out) == (2, ""), (code, out, err)
    assert len(err.splitlines()) == 1 and "API key" in err and server.url in err, err
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{s.getsockname()[1]}"
    # Before: `reefcap: internal error: ConnectError ...`, exit 3, after retrying for seconds.
    code, out, err = _caption_cli(capsys, *images, "--server", nowhere, "--api-key", KEY)
    assert (code, out) == (2, ""), (code, out, err)
    assert len(err.splitlines()) == 1 and nowhere in err and "internal error" not in err, err
    code, out, _ = _caption_cli(capsys, images[0], "--server", server.url, "--api-key", KEY, "-q")
    assert code == 0 and json.loads(out)["caption"]


MALFORMED = {
    "negative Content-Length": b"POST /v1/captions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "Content-Length and Transfer-Encoding": b"POST /v1/captions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "bad chunk size": b"POST /v1/captions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
    + KEY.encode()
    + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "control character in a header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Note: a\x01b\r\n\r\n",
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_http_gets_a_json_400(server, case):
    # Before: text/plain "Invalid HTTP request received."
    status, headers, body = answer = _raw(server, MALFORMED[case])
    assert status == 400 and headers.get("connection") == "close", (status, headers, body)
    assert _error(answer)["code"] == "invalid_http"


def test_a_header_block_over_the_limit_gets_a_431(server):
    # Before: the connection was reset under the client.
    lines = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"a" * 1000) for i in range(80))
    answer = _raw(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n")
    assert answer[0] == 431 and _error(answer)["code"] == "headers_too_large", answer
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_too_many_images_is_one_limit_one_code_one_message(server):
    png = png_bytes((8, 8))
    as_json = {"images": [{"data": base64.b64encode(png).decode()}] * 17}
    answers = [httpx.post(server.url + "/v1/captions", json=as_json, headers=AUTH, timeout=60)]
    for count, options_file in ((17, False), (17, True), (18, False)):
        files = [("images", (f"{i}.png", png, "image/png")) for i in range(count)]
        if options_file:
            files.append(("options", ("o.json", b"{}", "application/json")))
        answers.append(httpx.post(server.url + "/v1/captions", files=files, headers=AUTH, timeout=60))
    seen = {(r.status_code, _error(r)["code"], _error(r)["message"]) for r in answers}
    assert seen == {(413, "too_many_images", "at most 16 images per request")}, seen
    files = [("images", (f"{i}.png", png, "image/png")) for i in range(16)]
    files.append(("options", ("o.json", b"{}", "application/json")))
    r = httpx.post(server.url + "/v1/captions", files=files, headers=AUTH, timeout=120)
    assert r.status_code == 200 and len(r.json()["results"]) == 16, r.text


def _png_claiming(width: int, height: int) -> bytes:
    """A few dozen bytes of PNG whose header claims ``width`` x ``height`` pixels."""
    data = bytearray(png_bytes((1, 1)))
    data[16:24] = struct.pack(">II", width, height)  # IHDR's width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_the_servers_pixel_limit_and_message_apply_to_every_size(server):
    # Before: past PIL's own bomb limit (about 179 MP) the answer was PIL's message with PIL's limit.
    for width, height in ((8000, 6000), (20_000, 10_000), (100_000, 100_000)):
        files = [("images", ("big.png", _png_claiming(width, height), "image/png"))]
        r = httpx.post(server.url + "/v1/captions", files=files, headers=AUTH)
        error = _error(r)
        assert r.status_code == 413 and error["code"] == "image_too_large", r.text
        assert f"{width}x{height} pixels exceeds the limit of 40000000 pixels" in error["message"], error


def test_schema_errors_are_422_and_unknown_model_names_404(server):
    r = httpx.post(server.url + "/v1/captions", files=[("images", ("a.png", png_bytes()))], headers=AUTH)
    rid = r.json()["request_id"]
    for references in ([""], ["   "], ["x" * 501], [5]):  # before: the first three were 400
        r = httpx.post(server.url + "/v1/feedback", json={"request_id": rid, "references": references}, headers=AUTH)
        assert r.status_code == 422 and _error(r)["code"] == "invalid_request", (references, r.text)
    assert (
        "500"
        in httpx.post(
            server.url + "/v1/feedback", json={"request_id": rid, "references": ["x" * 501]}, headers=AUTH
        ).json()["error"]["message"]
    )
    r = httpx.post(server.url + "/v1/feedback", json={"request_id": rid, "references": ["x" * 500]}, headers=AUTH)
    assert r.status_code == 200, r.text
    for name in ("a" * 201, "no-such-model", "../etc"):  # before: the 201-character name was a 422
        r = httpx.post(server.url + "/v1/admin/reload", json={"model": name}, headers=ADMIN)
        assert r.status_code == 404 and _error(r)["code"] == "unknown_model", (name[:20], r.text)


def test_a_reload_body_that_is_not_json_is_refused(server):
    # Before: 5 MB of spaces was read as {} and reloaded the primary.
    headers = {**ADMIN, "content-type": "application/json"}
    for body in (b" " * 5_000_000, b"\r\n\t "):
        r = httpx.post(server.url + "/v1/admin/reload", content=body, headers=headers, timeout=60)
        assert r.status_code == 400 and _error(r)["code"] == "invalid_json", r.text


def test_a_burst_past_the_connection_limit_gets_answers_not_closed_sockets(server):
    """600 concurrent single-image requests at the default limits (128 connections): each gets 200 or a 503
    with Retry-After. Before: those past the limit had their sockets closed unanswered."""
    request = raw_caption_request(KEY)

    async def burst():
        return await asyncio.wait_for(asyncio.gather(*(send_raw(server.port, request) for _ in range(600))), 120)

    answers = asyncio.run(burst())
    statuses = [status for status, _ in answers]
    counts = collections.Counter(map(str, statuses))
    assert set(counts) <= {"200", "429", "503"}, f"some of 600 got no HTTP answer: {counts}"
    assert all("retry-after" in h for s, h in answers if s in (429, 503))
    assert counts["200"] >= 100, counts  # the first max_connections (128) are served
    r = httpx.post(server.url + "/v1/captions", files=[("images", ("a.png", png_bytes()))], headers=AUTH)
    assert r.status_code == 200, r.text
