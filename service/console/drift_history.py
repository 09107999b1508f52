"""Drift over time, for the console: `GET /v1/drift` (read-only, the caller's project only).

The live drift monitor (`service/drift_monitor.py`) exports only the current value of each fine-tuned model's
`ft_drift_score`, `ft_drift_out_of_distribution_ratio` and `ft_drift_window_prompts` gauges; history is
Prometheus' job in a deployment. So that the console can draw a curve without Prometheus, this module samples
those gauges of this API process every `SAMPLE_SECONDS` (and at each read) into a bounded ring per model, kept
in memory: it starts empty when the process starts, and with several API processes each answers with its own
traffic (as each serves its own gauges).

The thresholds are those of the alert rules (`deploy/prometheus/rules.yml`: `TuneworksDriftHigh`, and the
out-of-distribution alert), which fire only on windows of at least `MIN_WINDOW` prompts.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from pydantic import BaseModel
from sqlmodel import Session, col, select

from core import metrics
from core.tables import ModelRow
from service.errors import not_found

SAMPLE_SECONDS = 30.0
POINTS = 480  # four hours at one point every 30 s
MAX_MODELS = 256
DRIFT_THRESHOLD = 0.15
OOD_THRESHOLD = 0.3
MIN_WINDOW = 50


class DriftPoint(BaseModel):
    t: int  # unix seconds
    drift_score: float
    out_of_distribution_ratio: float
    window_prompts: int


class DriftThresholds(BaseModel):
    drift_score: float = DRIFT_THRESHOLD
    out_of_distribution_ratio: float = OOD_THRESHOLD
    min_window_prompts: int = MIN_WINDOW


class ModelDrift(BaseModel):
    model: str
    points: list[DriftPoint]


class DriftHistory(BaseModel):
    object: str = "list"
    thresholds: DriftThresholds = DriftThresholds()
    data: list[ModelDrift]


def _gauge_values(gauge: Any) -> dict[str, float]:
    """`model` label -> value of one labelled gauge, through its public `collect()`."""
    values: dict[str, float] = {}
    for family in gauge.collect():
        for sample in family.samples:
            model = sample.labels.get("model")
            if model is not None:
                values[model] = float(sample.value)
    return values


class Sampler:
    """Bounded per-model rings of (time, score, OOD share, window) points, fed from the drift gauges."""

    def __init__(self, *, points: int = POINTS, max_models: int = MAX_MODELS,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.points, self.max_models, self.clock = points, max_models, clock
        self._lock = threading.Lock()
        self._rings: OrderedDict[str, deque[DriftPoint]] = OrderedDict()

    def sample(self) -> None:
        """Record the gauges' current values (a model's point only when it differs from its last one)."""
        scores = _gauge_values(metrics.DRIFT_SCORE)
        ood, window = _gauge_values(metrics.DRIFT_OOD_RATIO), _gauge_values(metrics.DRIFT_WINDOW)
        now = int(self.clock())
        with self._lock:
            for model, score in scores.items():
                point = DriftPoint(t=now, drift_score=score, out_of_distribution_ratio=ood.get(model, 0.0),
                                   window_prompts=int(window.get(model, 0)))  # fmt: skip
                ring = self._rings.setdefault(model, deque(maxlen=self.points))
                self._rings.move_to_end(model)
                last = ring[-1] if ring else None
                if last is None or last.model_dump(exclude={"t"}) != point.model_dump(exclude={"t"}):
                    ring.append(point)
            while len(self._rings) > self.max_models:
                self._rings.popitem(last=False)

    def history(self, models: list[str]) -> list[ModelDrift]:
        """The points of each of `models` (in that order), after sampling once more."""
        self.sample()
        with self._lock:
            return [ModelDrift(model=m, points=list(self._rings.get(m, ()))) for m in models]


SAMPLER = Sampler()


async def _sample_forever(sampler: Sampler, every: float) -> None:
    while True:
        sampler.sample()
        await asyncio.sleep(every)


def with_sampler(lifespan: Any, sampler: Sampler = SAMPLER, every: float = SAMPLE_SECONDS) -> Any:
    """`lifespan` (an app's lifespan context factory) that also runs the sampler while the app runs."""

    @asynccontextmanager
    async def wrapped(app: Any) -> AsyncIterator[Any]:
        task = asyncio.create_task(_sample_forever(sampler, every))
        try:
            async with lifespan(app) as state:
                yield state
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return wrapped


def project_models(*, session: Session, project_id: str, model: str | None) -> list[str]:
    """The project's live fine-tuned models and checkpoints (only `model` when given), oldest first.

    Raises:
        NotFound: `model` is not one of them.
    """
    statement = select(ModelRow.id).where(ModelRow.project_id == project_id, col(ModelRow.deleted).is_(False))
    if model is not None:
        statement = statement.where(ModelRow.id == model)
    ids = [str(i) for i in session.exec(statement.order_by(col(ModelRow.pk))).all()]
    if model is not None and not ids:
        raise not_found("model", model, param="model")
    return ids
