"""The web console: a single-page app served by the API process at `/console` (and `/` redirects there).

Static files shipped inside the package (`static/`: HTML, JS, CSS and the vendored uPlot chart library), no
build step and nothing fetched at run time. The page signs in with an API key kept in the tab's sessionStorage and
calls the same `/v1` API as the SDK with `Authorization: Bearer`; these files themselves need no key. Every
console response carries a Content-Security-Policy without inline script, and the app puts what the API returns
into the DOM as text only. `install(app)` adds the routes, the static mount and the drift sampler.
"""

from __future__ import annotations

from fastapi import FastAPI

from service.console import drift_history, router


def install(app: FastAPI) -> None:
    """Mount the console on `app`: `/` and `/console` redirects, `/console/*` files, `GET /v1/drift`."""
    app.include_router(router.pages)
    app.include_router(router.api, prefix="/v1")
    app.mount("/console", router.static_app(), name="console")
    app.router.lifespan_context = drift_history.with_sampler(app.router.lifespan_context)
