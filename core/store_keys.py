"""Every key of the artifact store, in one place: what each process reads and writes.

Keys are relative POSIX paths built only from our own ids (`file-…`, `ftjob-…`), never from user input;
`ArtifactStore.path` checks them again.
"""

from __future__ import annotations


def file_key(file_id: str) -> str:
    """An uploaded file, or a result file the worker wrote."""
    return f"files/{file_id}"


def adapter_key(job_id: str) -> str:
    """The final adapter of a job (PEFT folder: adapter_config.json + adapter_model.safetensors)."""
    return f"jobs/{job_id}/adapter"


def checkpoint_key(job_id: str, step: int) -> str:
    """The adapter of a job's checkpoint at optimizer step `step`."""
    return f"jobs/{job_id}/checkpoints/step-{step}"


def state_key(job_id: str) -> str:
    """A running job's resume state (adapter, optimizer, RNG, data position); deleted when the job succeeds."""
    return f"jobs/{job_id}/state"


def drift_profile_key(job_id: str) -> str:
    """The drift profile of a job's training prompts (JSON)."""
    return f"jobs/{job_id}/drift_profile.json"


def imported_adapter_key(import_id: str) -> str:
    """An adapter imported through `POST /v1/models/import` (PEFT folder, as `adapter_key`)."""
    return f"imports/{import_id}/adapter"
