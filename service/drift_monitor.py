"""The live drift monitor of the API: recent inference traffic of each fine-tuned model against its profile.

The gateway calls `observe(store=, model=, job_id=, prompt=)` for every completion of a fine-tuned model, and a
process-wide `DriftMonitor` keeps a bounded window of recent prompts per model and exports:

- `ft_drift_score{model}`: Jensen-Shannon divergence (base 2, 0..1) between the window's feature distribution
  and the profile's (`core.drift_profile`). The distribution is the three feature families side by side with
  fixed masses (3-grams 1/2, lengths 1/4, scripts 1/4), so the score is the same weighted mean of the families'
  own JS divergences.
- `ft_drift_out_of_distribution_ratio{model}`: share of window prompts whose length lies outside the training
  range (with a factor-2 margin) or whose share of words unseen in training exceeds the profile's threshold.
- `ft_drift_window_prompts{model}`: prompts in the window.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core import metrics
from core.drift_profile import (
    LENGTH_BUCKETS,
    NGRAM_BUCKETS,
    SCRIPTS,
    PromptFeatures,
    Reference,
    combine,
    js_divergence,
    length_bucket,
    load_profile,
)
from core.storage import ArtifactStore

logger = logging.getLogger(__name__)


# --- the live window ---------------------------------------------------------------------------------------


@dataclass
class _Window:
    """Recent prompts of one model, with running sums so that adding and evicting are O(prompt)."""

    reference: Reference
    size: int
    prompts: deque[tuple[PromptFeatures, bool]] = field(default_factory=deque)
    ngrams: Counter[int] = field(default_factory=Counter)
    lengths: list[int] = field(default_factory=lambda: [0] * LENGTH_BUCKETS)
    scripts: list[int] = field(default_factory=lambda: [0] * len(SCRIPTS))
    ood: int = 0
    seen: int = 0

    def add(self, feat: PromptFeatures) -> None:
        ood = self.reference.out_of_distribution(feat)
        self.prompts.append((feat, ood))
        self._count(feat, ood, +1)
        self.seen += 1
        if len(self.prompts) > self.size:
            old, old_ood = self.prompts.popleft()
            self._count(old, old_ood, -1)

    def _count(self, feat: PromptFeatures, ood: bool, sign: int) -> None:
        for bucket, n in Counter(feat.ngrams).items():
            self.ngrams[bucket] += sign * n
            if not self.ngrams[bucket]:
                del self.ngrams[bucket]
        self.lengths[length_bucket(feat.length)] += sign
        self.scripts = [a + sign * b for a, b in zip(self.scripts, feat.scripts, strict=True)]
        self.ood += sign * int(ood)

    def score(self) -> float:
        ngrams = [float(self.ngrams.get(b, 0)) for b in range(NGRAM_BUCKETS)]
        live = combine(ngrams, [float(x) for x in self.lengths], [float(x) for x in self.scripts])
        return js_divergence(live, self.reference.distribution)


ProfileLoader = Callable[[], dict[str, Any] | None]


class DriftMonitor:
    """Per fine-tuned model, a bounded window of recent prompts compared with the model's training profile.

    Thread-safe; `observe` never raises. Models are kept in least-recently-observed order and the oldest is
    forgotten past `max_models`, so memory stays bounded (roughly `window` x 4 KiB per model at worst).
    """

    def __init__(
        self,
        *,
        window: int = 200,
        every: int = 10,
        max_models: int = 256,
        retry_missing_seconds: float = 300.0,
    ) -> None:
        if window < 1 or every < 1 or max_models < 1:
            raise ValueError("`window`, `every` and `max_models` must be at least 1")
        self.window, self.every, self.max_models = window, every, max_models
        self.retry_missing_seconds = retry_missing_seconds
        self._lock = threading.Lock()
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        self._missing: dict[str, float] = {}  # model -> monotonic time its profile was last found missing

    def observe(self, model: str, prompt: str, profile_loader: ProfileLoader) -> None:
        """Add one prompt of `model` to its window; recompute the gauges every `every` prompts.

        Args:
            model: the fine-tuned model name (the gauges' `model` label).
            prompt: the request's text (see `prompt_of_messages`).
            profile_loader: returns the model's profile (`build_profile` output) or None when there is none;
                called only until a profile is found, and at most every `retry_missing_seconds` when missing.
        """
        try:
            self._observe(model, prompt, profile_loader)
        except Exception:  # drift is advisory: it must never break a completion
            logger.warning("drift observation failed for model %s", model, exc_info=True)

    def _observe(self, model: str, prompt: str, profile_loader: ProfileLoader) -> None:
        window = self._window(model, profile_loader)
        if window is None:
            return
        feat = PromptFeatures.of(prompt if isinstance(prompt, str) else str(prompt))
        with self._lock:
            if self._windows.get(model) is not window:
                return  # forgotten meanwhile
            window.add(feat)
            if window.seen % self.every and window.seen != 1:
                return  # the gauges are recomputed on the first prompt and then on every `every`-th
            metrics.DRIFT_SCORE.labels(model).set(window.score())
            metrics.DRIFT_OOD_RATIO.labels(model).set(window.ood / len(window.prompts))
            metrics.DRIFT_WINDOW.labels(model).set(len(window.prompts))

    def _window(self, model: str, profile_loader: ProfileLoader) -> _Window | None:
        with self._lock:
            window = self._windows.get(model)
            if window is not None:
                self._windows.move_to_end(model)
                return window
            missing_since = self._missing.get(model)
            if missing_since is not None and time.monotonic() - missing_since < self.retry_missing_seconds:
                return None
        reference = self._load(model, profile_loader)
        with self._lock:
            if reference is None:
                self._missing[model] = time.monotonic()
                return None
            self._missing.pop(model, None)
            window = self._windows.setdefault(model, _Window(reference, self.window))
            self._windows.move_to_end(model)
            self._evict()
            return window

    def _load(self, model: str, profile_loader: ProfileLoader) -> Reference | None:
        profile = profile_loader()
        if profile is None:
            logger.info("no drift profile for model %s", model)
            return None
        try:
            return Reference.parse(profile)
        except (KeyError, TypeError, ValueError) as exc:
            logger.warning("unusable drift profile for model %s: %s", model, exc)
            return None

    def _evict(self) -> None:
        while len(self._windows) > self.max_models:
            name, _ = self._windows.popitem(last=False)
            _remove_series(name)
            logger.info("drift window of model %s evicted (more than %d models)", name, self.max_models)

    def forget(self, model: str) -> None:
        """Drop `model`'s window, cached profile and gauge series (call when the model is deleted)."""
        with self._lock:
            self._windows.pop(model, None)
            self._missing.pop(model, None)
            _remove_series(model)

    def models(self) -> list[str]:
        """Models with a live window, least recently observed first."""
        with self._lock:
            return list(self._windows)


def _remove_series(model: str) -> None:
    for gauge in (metrics.DRIFT_SCORE, metrics.DRIFT_OOD_RATIO, metrics.DRIFT_WINDOW):
        with contextlib.suppress(KeyError):
            gauge.remove(model)


# --- the process-wide monitor the gateway uses -------------------------------------------------------------

MONITOR = DriftMonitor()


def observe(store: ArtifactStore, model: str, job_id: str, prompt: str) -> None:
    """Record one prompt sent to fine-tuned `model` (trained by `job_id`) in the process-wide monitor.

    Cheap (about 2 ms for a 2 KB prompt, under 0.5 ms for a short one), thread-safe, and never raises; a model without a saved
    profile is a no-op (the store is checked again at most every 5 minutes).

    Args:
        store: the artifact store holding `jobs/<job_id>/drift_profile.json`.
        model: the fine-tuned model name the request used.
        job_id: the job that trained it.
        prompt: the request's text (`prompt_of_messages(messages)` for chat).
    """
    MONITOR.observe(model, prompt, lambda: load_profile(store, job_id))


def forget(model: str) -> None:
    """Drop a deleted model's drift window and its `ft_drift_*` series from the process-wide monitor."""
    MONITOR.forget(model)
