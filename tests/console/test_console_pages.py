"""The console's files as a real `tuneworks api` serves them, the drift history endpoint, and the packaging.

The pages load without a key (the key is only for `/v1`), carry a Content-Security-Policy that allows no inline
script, and ship inside the package (every file under `service/console/static` is matched by the package data
globs of `pyproject.toml`, so `pip install .` and the API image have them).
"""

from __future__ import annotations

import re
import tomllib
from fnmatch import fnmatch

import httpx
import pytest

from core import metrics
from service.console import drift_history
from service.console.router import STATIC
from tests.conftest import REPO, ApiServer
from tests.service.conftest import server  # noqa: F401  (the module's API process)


def get(server: ApiServer, path: str, **kwargs: object) -> httpx.Response:  # noqa: F811
    return httpx.get(server.base_url.removesuffix("/v1") + path, timeout=10, **kwargs)  # type: ignore[arg-type]


def test_root_and_console_redirect_to_the_app(server: ApiServer) -> None:  # noqa: F811
    for path in ("/", "/console"):
        response = get(server, path)
        assert response.status_code == 307 and response.headers["location"] == "/console/"


@pytest.mark.parametrize(
    "path", ["/console/", "/console/app.js", "/console/app.css", "/console/vendor/uPlot.iife.min.js"]
)
def test_console_files_load_without_a_key_with_security_headers(server: ApiServer, path: str) -> None:  # noqa: F811
    response = get(server, path)
    assert response.status_code == 200 and response.content
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "set-cookie" not in response.headers


def test_a_missing_console_file_is_a_404_envelope(server: ApiServer) -> None:  # noqa: F811
    response = get(server, "/console/nothing-here.js")
    assert response.status_code == 404 and "error" in response.json()


def test_the_page_has_no_inline_script_and_the_app_never_writes_html() -> None:
    html = (STATIC / "index.html").read_text()
    scripts = re.findall(r"<script[^>]*>", html)
    assert scripts and all(" src=" in tag for tag in scripts)
    assert not re.search(r"\son\w+=", html) and " style=" not in html
    app = (STATIC / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in app, sink
    assert '<input name="api_key"' not in html and 'name: "api_key"' in app  # the sign-in field


def test_every_console_file_is_package_data() -> None:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    globs = data["service.console"]
    root = STATIC.parent
    files = [p.relative_to(root).as_posix() for p in STATIC.rglob("*") if p.is_file()]
    assert "static/vendor/uPlot.iife.min.js" in files
    missing = [f for f in files if not any(fnmatch(f, g) and f.count("/") == g.count("/") for g in globs)]
    assert missing == []


def test_the_drift_history_needs_a_key_and_names_only_the_projects_models(server: ApiServer) -> None:  # noqa: F811
    assert httpx.get(f"{server.base_url}/drift").status_code == 401
    response = httpx.get(f"{server.base_url}/drift", headers={"Authorization": f"Bearer {server.key}"})
    body = response.json()
    assert response.status_code == 200 and body["data"] == []
    assert body["thresholds"] == {
        "drift_score": 0.15,
        "out_of_distribution_ratio": 0.3,
        "min_window_prompts": 50,
    }
    missing = httpx.get(f"{server.base_url}/drift", params={"model": "ft:x:other:y:z"},
                        headers={"Authorization": f"Bearer {server.key}"})  # fmt: skip
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"


def test_the_sampler_keeps_a_bounded_history_of_the_drift_gauges() -> None:
    clock = iter(range(1000, 2000, 30))
    sampler = drift_history.Sampler(points=3, clock=lambda: next(clock))
    model = "ft:test-console:p:s:sampler"
    try:
        for score in (0.05, 0.05, 0.2, 0.3, 0.4):
            metrics.DRIFT_SCORE.labels(model).set(score)
            metrics.DRIFT_OOD_RATIO.labels(model).set(score / 2)
            metrics.DRIFT_WINDOW.labels(model).set(60)
            sampler.sample()
        (history,) = sampler.history([model])
    finally:
        for gauge in (metrics.DRIFT_SCORE, metrics.DRIFT_OOD_RATIO, metrics.DRIFT_WINDOW):
            gauge.remove(model)
    # An unchanged value is not a new point; only the newest `points` are kept.
    assert [p.drift_score for p in history.points] == [0.2, 0.3, 0.4]
    assert [p.t for p in history.points] == [1060, 1090, 1120]
    assert history.points[-1].out_of_distribution_ratio == 0.2 and history.points[-1].window_prompts == 60
    assert sampler.history(["ft:unknown"])[0].points == []
