"""Names of fine-tuned models and of the adapters vLLM knows them by.

Users see OpenAI's form, `ft:{base}:{project}:{suffix}:{job}` (suffix segment empty when none was given) and
`...:ckpt-step-{N}` for checkpoints. vLLM sees `adapter_name()`: built only from our own job id, so nothing a user
typed reaches vLLM.
"""

from __future__ import annotations

import re

# Matched with `fullmatch` only: `$` would also accept a trailing newline ("abc\n").
PROJECT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
SUFFIX = re.compile(r"[A-Za-z0-9_-]{1,64}")


def is_project_name(value: str) -> bool:
    """True for 1 to 64 of `A-Z a-z 0-9 _ -`, and nothing else (no trailing newline)."""
    return PROJECT_NAME.fullmatch(value) is not None


def is_suffix(value: str) -> bool:
    """True for a model name suffix: 1 to 64 of `A-Z a-z 0-9 _ -` (no `:`, no trailing newline)."""
    return SUFFIX.fullmatch(value) is not None


def fine_tuned_model_name(*, base_model: str, project: str, suffix: str | None, job_id: str) -> str:
    return f"ft:{base_model}:{project}:{suffix or ''}:{job_id.removeprefix('ftjob-')}"


def checkpoint_model_name(fine_tuned_model: str, step: int) -> str:
    return f"{fine_tuned_model}:ckpt-step-{step}"


def adapter_name(job_id: str, checkpoint_step: int | None = None) -> str:
    return job_id if checkpoint_step is None else f"{job_id}-ckpt-step-{checkpoint_step}"
