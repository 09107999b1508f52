"""The trainer's hooks for one job attempt: steps become metrics events and Prometheus samples, epoch ends become
checkpoints, resume state goes to the store, and cancel/pause/lease loss are read from the job row between steps.

Called from the training thread; every database write here is a short transaction of its own. Checkpoints and
resume state are fenced by the attempt's lease: when another attempt holds it, nothing is written and the run
stops (`lost`). The first resume state saved past the attempt's starting step marks progress, so that the
attempt does not count against `job_max_attempts` if the worker dies later.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from core import metrics
from core.hyperparameters import Hyperparameters
from core.ids import now
from core.job_spec import JobSpec
from core.job_status import TERMINAL, JobStatus, add_event
from core.storage import ArtifactStore, FenceLost
from core.store_keys import state_key
from core.tables import JobEventRow, JobRow
from runner import artifacts, lease
from runner.lease import Lease, LeaseLost
from runner.trainer import StopReason, TrainCallbacks

logger = logging.getLogger(__name__)

STATUS_POLL_SECONDS = 0.5  # how often the training thread reads the job's status (cancel / pause)
ESTIMATE_SECONDS = 5.0  # how often `estimated_finish` and `step` are written
DPO_METRICS = ("preference_accuracy", "reward_margin", "chosen_reward", "rejected_reward")
EVENT_METRICS = frozenset(
    {
        "step",
        "train_loss",
        "train_mean_token_accuracy",
        "valid_loss",
        "valid_mean_token_accuracy",
        "full_valid_loss",
        "full_valid_mean_token_accuracy",
        "tokens",
        *(f"{where}_{name}" for where in ("train", "valid", "full_valid") for name in DPO_METRICS),
    }
)  # fmt: skip  DPO jobs add reward margin, chosen / rejected reward and preference accuracy


class JobCallbacks(TrainCallbacks):
    """Trainer hooks of one job attempt (called from the training thread)."""

    def __init__(self, *, engine: Engine, store: ArtifactStore, job: JobRow, spec: JobSpec, held: Lease,
                 model_name: str, keep: int) -> None:  # fmt: skip
        self.engine, self.store, self.job, self.spec, self.held = engine, store, job, spec, held
        self.model_name, self.keep = model_name, keep
        self.lost = False  # set when another worker took the lease
        self.shutdown = False  # set when this worker is stopping
        self.progressed = False  # resume state past `first_step` was saved
        self.deleted_models: list[str] = []
        self.started = time.monotonic()
        self.first_step: int | None = None
        self.recorded_step = 0  # the highest step that already has a metrics event (from an earlier attempt)
        self.last_poll = 0.0
        self.last_estimate = 0.0
        self.last_metrics: dict[str, Any] = {}

    def on_start(self, *, total_steps: int, hyperparameters: Hyperparameters, step: int) -> None:
        update_job(self.engine, self.job.id, **self.spec.resolved_columns(hyperparameters),
                   total_steps=total_steps, step=step)  # fmt: skip
        self.first_step = step
        self.recorded_step = last_recorded_step(self.engine, self.job.id)
        if step:
            add_event(
                self.engine, self.job.id, f"Resuming from step {step}/{total_steps} (saved training state)"
            )

    def on_step(self, step: int, total_steps: int, values: dict[str, Any]) -> None:
        self.last_metrics = values
        data = {k: v for k, v in values.items() if k in EVENT_METRICS}
        data["total_steps"] = total_steps
        # Steps between the resume state and a crash run twice; a resumed run reproduces them exactly, so the
        # event the first run wrote stands, and each step has one metrics event.
        if step > self.recorded_step:
            add_event(
                self.engine, self.job.id, step_message(step, total_steps, values), type="metrics", data=data
            )
        count_step(self.job.model, values)
        if time.monotonic() - self.last_estimate >= ESTIMATE_SECONDS or step == total_steps:
            self.last_estimate = time.monotonic()
            update_job(
                self.engine, self.job.id, step=step, estimated_finish=self._estimate(step, total_steps)
            )

    def _estimate(self, step: int, total_steps: int) -> int:
        done = max(1, step - (self.first_step or 0))
        per_step = (time.monotonic() - self.started) / done
        return int(now() + per_step * (total_steps - step))

    def on_checkpoint(self, step: int, epoch: int, adapter_dir: Path) -> None:
        if self.lost:
            return
        try:
            artifacts.save_checkpoint(self.engine, self.store, job=self.job, lease=self.held,
                                      model_name=self.model_name, step=step, adapter_dir=adapter_dir,
                                      metrics=self.last_metrics)  # fmt: skip
            add_event(self.engine, self.job.id, f"Checkpoint created at step {step}")
            metrics.CHECKPOINTS_WRITTEN.labels(base_model=self.job.model).inc()
            self.deleted_models += artifacts.prune_checkpoints(
                self.engine, self.store, lease=self.held, keep=self.keep
            )
        except (FenceLost, LeaseLost):
            self._lose(f"checkpoint at step {step}")

    def on_resume_state(self, step: int, state_dir: Path) -> None:
        if self.lost:
            return
        try:
            self.store.put_dir(state_key(self.job.id), state_dir, fence=self.held.fence(self.engine))
            if not self.progressed and step > (self.first_step or 0):
                lease.mark_progress(self.engine, self.held)
                self.progressed = True
        except (FenceLost, LeaseLost):
            self._lose(f"resume state at step {step}")

    def _lose(self, what: str) -> None:
        logger.warning("job %s: %s not written: %s lost the lease", self.job.id, what, self.held.owner)
        self.lost = True

    def should_stop(self) -> StopReason | None:
        if self.shutdown:
            return "pause"
        if self.lost:
            return "cancel"
        if time.monotonic() - self.last_poll < STATUS_POLL_SECONDS:
            return None
        self.last_poll = time.monotonic()
        status, owner = lease.owner_of(self.engine, self.job.id)
        if owner != self.held.owner:
            self.lost = True
            return "cancel"
        if status == JobStatus.paused:
            return "pause"
        if status in TERMINAL:  # cancelled by the user, or failed / succeeded by someone else: stop
            return "cancel"
        return None


def last_recorded_step(engine: Engine, job_id: str) -> int:
    """The step of the job's newest metrics event (0 when none): events are written in step order."""
    with Session(engine) as session:
        data = session.exec(
            select(JobEventRow.data)
            .where(JobEventRow.job_id == job_id, JobEventRow.type == "metrics")
            .order_by(col(JobEventRow.pk).desc())
            .limit(1)
        ).first()
    return int((data or {}).get("step") or 0)


def step_message(step: int, total_steps: int, values: dict[str, Any]) -> str:
    """The text of a step's metrics event, as OpenAI writes it."""
    text = f"Step {step}/{total_steps}: training loss={values['train_loss']:.2f}"
    if values.get("valid_loss") is not None:
        text += f", validation loss={values['valid_loss']:.2f}"
    if values.get("full_valid_loss") is not None:
        text += f", full validation loss={values['full_valid_loss']:.2f}"
    if values.get("train_reward_margin") is not None:
        text += f", reward margin={values['train_reward_margin']:.2f}"
    if values.get("full_valid_preference_accuracy") is not None:
        text += f", preference accuracy={values['full_valid_preference_accuracy']:.2f}"
    return text


def count_step(base_model: str, values: dict[str, Any]) -> None:
    """The Prometheus samples of one optimizer step."""
    metrics.TRAIN_STEPS.labels(base_model=base_model).inc()
    metrics.TRAIN_TOKENS.labels(base_model=base_model).inc(values["tokens"])
    metrics.TRAIN_STEP_SECONDS.labels(base_model=base_model).observe(values["seconds"])
    metrics.TRAIN_LOSS.labels(base_model=base_model).set(values["train_loss"])
    metrics.TRAIN_TOKENS_PER_SECOND.labels(base_model=base_model).set(
        values["tokens"] / max(1e-9, values["seconds"])
    )


def update_job(engine: Engine, job_id: str, **values: Any) -> None:
    """Set columns of a job that are not its status (progress, resolved hyperparameters)."""
    with Session(engine) as session:
        session.execute(update(JobRow).where(JobRow.id == job_id).values(**values))  # type: ignore[arg-type]
        session.commit()
