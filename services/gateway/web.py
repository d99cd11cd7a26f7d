"""The gateway's web pages: chat and labeling for application keys (/, /label), the operator console
(/console).

The pages are static and public: they hold no data. Their scripts send the key the user typed (kept in the
tab's sessionStorage, never in a URL) with every call to the JSON API, which does all the checking."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from alignloop.config import Settings

WEB_DIR = Path(__file__).parent / "web"
PAGES = {"/": "index.html", "/label": "label.html", "/console": "console.html"}

# Scripts and styles only from these files, no inline code: text a model or a user wrote can never run, even
# if a page mishandled it. connect-src 'self': the pages talk to this gateway and nothing else.
# form-action 'none': should a script fail to load, a sign-in form cannot fall back to sending the key.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'", "script-src 'self'", "style-src 'self'", "img-src 'self'", "connect-src 'self'",
    "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'",
])
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate (ETag) rather than keep a stale script after an upgrade of the gateway.
    "Cache-Control": "no-cache",
}


class _Assets(StaticFiles):
    async def get_response(self, path: str, scope: Scope):
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def _page(file: Path):
    async def page() -> FileResponse:
        return FileResponse(file, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    return page


def register(app: FastAPI, settings: Settings, operator: Any) -> None:
    """Adds the pages, their assets under /static, and the console's settings route (operator keys only;
    `operator` is the gateway's dependency that checks for one)."""
    for path, name in PAGES.items():
        app.add_api_route(path, _page(WEB_DIR / name), methods=["GET"], include_in_schema=False)
    app.mount("/static", _Assets(directory=WEB_DIR / "static"), name="static")

    @app.get("/v1/admin/console/config", dependencies=[Depends(operator)])
    async def console_config() -> dict:
        return {
            "object": "console.config",
            "policy_model": settings.policy_model_name,
            # MLflow 3's UI opens a run from its id alone at #/runs/{run_id}.
            "mlflow_url": (settings.mlflow_ui_url or settings.tracking_uri).rstrip("/"),
        }
