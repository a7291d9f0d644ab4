"""The console: a single-page app the gateway serves at ``/``, and the offline API docs.

The console is plain ES modules and CSS under ``static/`` (no build step: what is in the
repository is what the browser runs), with its third-party assets vendored under
``static/vendor/`` (Chart.js for charts, Swagger UI for ``/docs``). It calls the same ``/v1``
API as every other client, with the same credentials: a user's bearer token from
``POST /v1/auth/token`` or an API key. ``docs/console.md`` lists its panels and the endpoints
each one uses.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.routing import BaseRoute

STATIC = Path(__file__).parent / "static"
PREFIX = "/console"
# FastAPI's own docs pages load Swagger UI and Redoc from a CDN: blank on a machine offline.
_CDN_PAGES = {"/docs", "/docs/oauth2-redirect", "/redoc"}
# The shell is small and changes with every release; browsers must not keep a stale one.
_NO_STORE = {"Cache-Control": "no-store"}


def _path(route: BaseRoute) -> str | None:
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else None


def mount_console(app: FastAPI) -> None:
    """Serve the console at ``/`` (its assets under ``/console``) and Swagger UI at ``/docs``
    from vendored assets, replacing FastAPI's CDN pages."""
    app.router.routes[:] = [r for r in app.router.routes if _path(r) not in _CDN_PAGES]
    app.mount(PREFIX, StaticFiles(directory=STATIC), name="console")

    @app.get("/", include_in_schema=False)
    async def console_index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=_NO_STORE)

    @app.get("/docs", include_in_schema=False)
    async def api_docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} API",
            swagger_js_url=f"{PREFIX}/vendor/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url=f"{PREFIX}/vendor/swagger-ui/swagger-ui.css",
            swagger_favicon_url=f"{PREFIX}/vendor/swagger-ui/favicon-32x32.png",
        )
