"""``GET /docs``: Swagger UI for the OpenAPI schema, from the installed ``fastapi-offline`` package's copy of the
swagger-ui dist, never from a CDN (a survey ship has no internet, and an unpinned CDN script without an integrity
hash could serve anything to the page where users paste their key). The assets are the files of the pinned package
version; the page has no inline script, so its Content-Security-Policy allows scripts from this server only.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse, Response

from .gateway import ApiError

ASSETS = Path(str(importlib.resources.files("fastapi_offline") / "static"))
# Relative URLs: /docs, its assets and /openapi.json keep working behind a proxy that adds a path prefix.
DOCS_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>reefcap - API docs</title>
<link rel="stylesheet" href="docs/assets/swagger-ui.css">
<link rel="icon" type="image/png" href="docs/assets/favicon.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="docs/assets/swagger-ui-bundle.js"></script>
<script src="docs/assets/init.js"></script>
</body>
</html>
"""
# FastAPI's own Swagger UI settings, as a file instead of an inline script; no validator badge (it is fetched
# from swagger.io).
INIT_JS = """"use strict";
window.ui = SwaggerUIBundle({
  url: "openapi.json",
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
});
"""
# Swagger UI's CSS embeds its icons as data: URLs; "try it out" calls this server only.
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
FILES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon.png": "image/png",
}

docs_router = APIRouter()


@docs_router.get("/docs", include_in_schema=False)
async def docs() -> HTMLResponse:
    return HTMLResponse(DOCS_HTML, headers={"Content-Security-Policy": DOCS_CSP})


@docs_router.get("/docs/assets/{name}", include_in_schema=False)
async def docs_asset(name: str) -> Response:
    """One of a fixed list of files (no path from the request reaches the filesystem)."""
    if name == "init.js":
        return Response(INIT_JS, media_type="text/javascript; charset=utf-8")
    if name not in FILES:
        raise ApiError(404, "not_found", "no such docs asset")
    # A week: the files change only with the installed package, and the page is reloaded often while reading.
    return FileResponse(ASSETS / name, media_type=FILES[name], headers={"Cache-Control": "public, max-age=604800"})
