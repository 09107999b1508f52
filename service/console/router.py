"""The console's routes: redirects to it, its static files with security headers, and the drift history."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Query
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.console import drift_history
from service.deps import DatabaseDep, ProjectDep
from service.errors import GUARDED, documented

STATIC = Path(__file__).parent / "static"

# No inline script or style element anywhere; the API is the same origin; the page may not be framed.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-cache"),  # revalidated (etag) so an upgrade shows at once
]

pages = APIRouter(include_in_schema=False)
api = APIRouter(tags=["console"], responses=documented(*GUARDED))


@pages.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/console/", status_code=307)


@pages.get("/console")
async def console() -> RedirectResponse:
    return RedirectResponse("/console/", status_code=307)


@api.get("/drift", include_in_schema=False)
async def drift(
    project: ProjectDep, db: DatabaseDep, model: str | None = Query(None)
) -> drift_history.DriftHistory:
    """Drift score and out-of-distribution share over time of the project's fine-tuned models (this process)."""
    models = await db.run(drift_history.project_models, project_id=project.id, model=model)
    return drift_history.DriftHistory(data=drift_history.SAMPLER.history(models))


class _SecurityHeaders:
    """Adds `SECURITY_HEADERS` to every response of the wrapped app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def static_app() -> ASGIApp:
    """The console's files (`index.html` for `/console/`), with the security headers."""
    return _SecurityHeaders(StaticFiles(directory=STATIC, html=True))
