"""Fixtures of the worker tests: settings for fast leases and frequent resume state, and the row factory."""

from __future__ import annotations

import pytest

from core.settings import Settings
from tests.runner.factory import Factory


@pytest.fixture
def wsettings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "train_threads": 1,
            "lease_seconds": 2,
            "reconcile_seconds": 1,
            "resume_state_seconds": 0.3,
            "worker_metrics_port": 0,
        }  # fmt: skip
    )


@pytest.fixture
def factory(wsettings: Settings) -> Factory:
    return Factory(wsettings)
