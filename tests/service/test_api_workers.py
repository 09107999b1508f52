"""`FT_API_WORKERS > 1`: every worker process serves requests, and the metrics port sums their counters."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ApiServer, free_port
from tests.service.conftest import service_settings

REQUESTS = 120


def _requests_counted(metrics_port: int, route: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "ft_http_requests_total" and sample.labels.get("route") == route:
                total += sample.value
    return total


def test_counters_add_up_across_worker_processes(tmp_path: Path, redis_url: str) -> None:
    settings = service_settings(tmp_path / "home", redis_url, api_workers=2, api_metrics_port=free_port())
    server = ApiServer(settings, tmp_path / "api.log")
    try:
        headers = {"Authorization": f"Bearer {server.key}"}
        for _ in range(REQUESTS):  # a new connection each time, so the kernel spreads them over the workers
            with httpx.Client(headers=headers, timeout=30) as client:
                response = client.get(f"{server.base_url}/fine_tuning/jobs")
                assert response.status_code == 200
        folder = settings.home_dir / "prometheus" / f"api-{settings.api_port}"
        served_by = {path.stem.rsplit("_", 1)[-1] for path in folder.glob("counter_*.db")}
        assert len(served_by) == 2, f"requests reached worker processes {served_by}"
        text = httpx.get(f"http://127.0.0.1:{settings.api_metrics_port}/metrics", timeout=10).text
        assert any(line.startswith("ft_jobs{") for line in text.splitlines()), "job gauges served too"
        assert _requests_counted(settings.api_metrics_port, "/v1/fine_tuning/jobs") == pytest.approx(REQUESTS)
    finally:
        server.stop()
