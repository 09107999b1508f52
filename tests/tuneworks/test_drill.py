"""The fault drill, small: `tuneworks drill` against a fresh `tuneworks up` (its own Redis, API, worker, vLLM).

Jobs fine-tune the tiny model (fast steps) while SmolLM2 is the served base model (the vLLM kill is real). The
worker is killed while jobs train, Redis with jobs queued and running, vLLM, and the API mid-upload; every job
must still succeed with exactly one model and no event written twice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.base_models import TINY
from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def test_a_small_drill_loses_and_duplicates_nothing(tmp_path: Path, models_dir: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(models_dir, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FT_")}
    # Short leases and frequent resume state: a killed worker's job is taken over in seconds, not half a minute.
    env |= {"FT_LEASE_SECONDS": "6", "FT_RECONCILE_SECONDS": "2", "FT_RESUME_STATE_SECONDS": "2",
            "FT_LOG_LEVEL": "INFO"}  # fmt: skip
    report = tmp_path / "drill.json"
    args = ["--worker-kills", "3", "--redis-kills", "1", "--vllm-kills", "1", "--api-kills", "1", "--jobs", "2",
            "--epochs", "20", "--base-model", TINY, "--home", str(home), "--json", str(report), "--timeout", "900"]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "tuneworks.cli", "drill", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=1400)  # fmt: skip
    print(done.stdout[-3000:], done.stderr[-3000:])
    figures = json.loads(report.read_text())
    assert figures["kills"] == {"worker": 3, "redis": 1, "vllm": 1, "api": 1}
    assert set(figures["jobs"].values()) == {"succeeded"}, figures["jobs"]
    assert figures["jobs_lost"] == 0
    assert figures["jobs_with_several_models"] == 0
    assert figures["duplicated_events"] == 0
    assert figures["bad_files"] == 0
    assert done.returncode == 0
