"""`/docs`: Swagger UI over /openapi.json and an AsyncAPI page over /asyncapi.json, served offline.

The assets come from two PyPI packages (no CDN): Swagger UI 5 from `swagger-ui-py` (its `static/` folder) and
the `<asyncapi-viewer>` web component from `asyncapi-viewer` (its `static/` folder). Their folders are found
without importing the packages (which would pull in their framework glue).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

NAV = '<nav class="streamplex-docs"><a href="/docs">HTTP API (OpenAPI)</a> · <a href="/docs/asyncapi">WebSocket protocol (AsyncAPI)</a> · <a href="/">dashboard</a></nav>'

SWAGGER_PAGE = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>streamplex: HTTP API</title>
<link rel="stylesheet" href="/docs/assets/swagger/swagger-ui.css">
<link rel="icon" href="/docs/assets/swagger/favicon-32x32.png">
</head>
<body>
{NAV}
<div id="swagger-ui"></div>
<script src="/docs/assets/swagger/swagger-ui-bundle.js"></script>
<script src="/docs/swagger-init.js"></script>
</body>
</html>
"""

SWAGGER_INIT = 'window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true });\n'

ASYNCAPI_PAGE = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>streamplex: WebSocket protocol</title>
<link rel="icon" href="/docs/assets/swagger/favicon-32x32.png">
<script src="/docs/assets/asyncapi/asyncapi-viewer.iife.js"></script>
</head>
<body>
{NAV}
<asyncapi-viewer src="/asyncapi.json" sidebar></asyncapi-viewer>
</body>
</html>
"""


def package_static(package: str) -> Path:
    """The `static/` folder of an installed package; RuntimeError naming the package when it is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the package {package!r} is not installed (a dependency in pyproject.toml); /docs needs its assets")
    folder = Path(next(iter(spec.submodule_search_locations))) / "static"
    if not folder.is_dir():
        raise RuntimeError(f"{folder} is missing: the installed {package!r} does not ship the assets /docs needs")
    return folder


def routes() -> list[BaseRoute]:
    """The /docs pages and their assets."""

    async def swagger(request: Request) -> Response:
        return HTMLResponse(SWAGGER_PAGE)

    async def swagger_init(request: Request) -> Response:
        return Response(SWAGGER_INIT, media_type="text/javascript")

    async def asyncapi(request: Request) -> Response:
        return HTMLResponse(ASYNCAPI_PAGE)

    return [
        Route("/docs", swagger),
        Route("/docs/swagger-init.js", swagger_init),
        Route("/docs/asyncapi", asyncapi),
        Mount("/docs/assets/swagger", StaticFiles(directory=package_static("swagger_ui"))),
        Mount("/docs/assets/asyncapi", StaticFiles(directory=package_static("asyncapi_viewer"))),
    ]
