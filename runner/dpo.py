"""DPO training: the trainer's run (model, optimizer, schedule, resume, callbacks, early stopping) with the
preference loss instead of next-token cross-entropy.

The loss is the standard sigmoid DPO loss (Rafailov et al. 2023), per pair:
`-log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))`, where each
log-probability is the sum over the answer's tokens (labels only on the answer, see `runner.preference`).
The reference policy is the model the job starts from: the base model (the fresh adapter disabled) or, for a
continued job, the adapter it starts from. Its log-probabilities are computed once, before the first step, for
every training and validation pair. Dropout is off (as TRL's `disable_dropout` default), so that the policy
equals the reference at the first step. A resumed run recomputes them from the same starting weights (the resume
state is loaded afterwards), so resuming is exact at batch granularity.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from core.hyperparameters import resolve_beta
from core.train_config import TrainConfig
from runner.batching import collate
from runner.datasets import IGNORE
from runner.preference import Pair, PreferenceDataset
from runner.trainer import TrainCallbacks, TrainResult, _Run, _set_threads, execute

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class DpoResult(TrainResult):
    valid_reference: torch.Tensor | None = None  # reference log-probs of the validation pairs, [n, 2]
    beta: float = 0.1


def sequence_logps(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Per row, the summed log-probability of the labelled tokens (the LM head runs only at those positions).

    Returns:
        A float32 tensor with one value per row.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = inner.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:]
    selected = targets != IGNORE
    logits = inner.lm_head(hidden[:, :-1][selected]).float()
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, targets[selected].unsqueeze(-1)).squeeze(-1)
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(targets)[selected]
    return torch.zeros(labels.shape[0], device=labels.device).index_add(0, rows, token_logps)


def dpo_terms(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, ...]:
    """Per-pair losses, chosen rewards and rejected rewards.

    Args:
        policy: [n, 2] log-probs of (chosen, rejected) under the policy.
        reference: the same under the reference policy.
        beta: the DPO temperature.
    """
    chosen = beta * (policy[:, 0] - reference[:, 0])
    rejected = beta * (policy[:, 1] - reference[:, 1])
    return -F.logsigmoid(chosen - rejected), chosen, rejected


def pair_logps(model: Any, pairs: list[Pair], pad_id: int, device: torch.device) -> torch.Tensor:
    """[n, 2] summed answer log-probs of (chosen, rejected) of each pair, in one padded forward pass."""
    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, device)
    logps = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.labels)
    return torch.stack([logps[: len(pairs)], logps[len(pairs) :]], dim=1)


def pair_groups(pairs: list[Pair], indexes: list[int], token_limit: int) -> list[list[int]]:
    """Split `indexes` into groups whose padded size (both answers: 2 rows per pair) stays within the limit;
    shortest first, so similar lengths share a forward pass."""
    groups: list[list[int]] = []
    current: list[int] = []
    for index in sorted(indexes, key=lambda i: len(pairs[i])):
        longest = max([len(pairs[index]), *(len(pairs[i]) for i in current)])
        if current and 2 * longest * (len(current) + 1) > token_limit:
            groups.append(current)
            current = []
        current.append(index)
    if current:
        groups.append(current)
    return groups


@torch.no_grad()
def reference_logps(model: Any, pairs: list[Pair], *, pad_id: int, device: torch.device, token_limit: int,
                    adapter_off: bool) -> torch.Tensor:  # fmt: skip
    """[n, 2] log-probs of every pair under the reference policy (eval mode; `adapter_off`: LoRA disabled)."""
    model.eval()
    out = torch.zeros((len(pairs), 2))
    context = model.disable_adapter() if adapter_off else contextlib.nullcontext()
    with context:
        for group in pair_groups(pairs, list(range(len(pairs))), token_limit):
            out[group] = pair_logps(model, [pairs[i] for i in group], pad_id, device).cpu()
    return out


@torch.no_grad()
def preference_metrics(model: Any, pairs: list[Pair], reference: torch.Tensor, *, beta: float, pad_id: int,
                       device: torch.device, token_limit: int) -> dict[str, float]:  # fmt: skip
    """Mean DPO loss, preference accuracy (chosen reward > rejected reward), reward margin and rewards."""
    model.eval()
    sums = {"loss": 0.0, "preference_accuracy": 0.0, "reward_margin": 0.0, "chosen_reward": 0.0,
            "rejected_reward": 0.0}  # fmt: skip
    for group in pair_groups(pairs, list(range(len(pairs))), token_limit):
        policy = pair_logps(model, [pairs[i] for i in group], pad_id, device).cpu()
        _add(sums, *dpo_terms(policy, reference[group], beta))
    return {key: value / max(1, len(pairs)) for key, value in sums.items()}


def _add(sums: dict[str, float], losses: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    sums["loss"] += float(losses.sum())
    sums["preference_accuracy"] += float((chosen > rejected).float().sum())
    sums["reward_margin"] += float((chosen - rejected).sum())
    sums["chosen_reward"] += float(chosen.sum())
    sums["rejected_reward"] += float(rejected.sum())


class _DpoRun(_Run):
    """A training run whose step and validation use the DPO loss against precomputed reference log-probs."""

    train_set: PreferenceDataset  # type: ignore[assignment]
    valid_set: PreferenceDataset | None  # type: ignore[assignment]

    def __init__(self, config: TrainConfig, train_set: PreferenceDataset, valid_set: PreferenceDataset | None,
                 callbacks: TrainCallbacks) -> None:  # fmt: skip
        super().__init__(config, train_set, valid_set, callbacks)  # type: ignore[arg-type]
        for (
            module
        ) in self.model.modules():  # as TRL does by default: the policy starts equal to the reference
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        self.hp = dataclasses.replace(self.hp, beta=resolve_beta(config.beta))
        self.beta = float(self.hp.beta or 0.1)
        started = time.perf_counter()
        self.ref_train = self._reference(train_set.examples)
        self.ref_valid = self._reference(valid_set.examples if valid_set else [])
        logger.info("dpo: reference log-probs of %d + %d pairs in %.1fs", len(train_set),
                    len(valid_set or []), time.perf_counter() - started)  # fmt: skip

    def _reference(self, pairs: list[Pair]) -> torch.Tensor:
        return reference_logps(self.model, pairs, pad_id=self.pad_id, device=self.device,
                               token_limit=self.config.micro_batch_tokens,
                               adapter_off=self.config.init_adapter is None)  # fmt: skip

    def _valid_batches(self) -> list[list[Any]]:  # indexes of pairs (their reference log-probs are by index)
        if not self.valid_set or not len(self.valid_set):
            return []
        size, n = self.hp.batch_size, len(self.valid_set)
        return [list(range(i, min(n, i + size))) for i in range(0, n, size)]

    def train_step(self, indexes: list[int]) -> dict[str, Any]:
        started = time.perf_counter()
        pairs = self.train_set.examples
        sums = dict.fromkeys(
            ("loss", "preference_accuracy", "reward_margin", "chosen_reward", "rejected_reward"), 0.0
        )
        tokens = 0
        self.model.train()
        for group in pair_groups(pairs, indexes, self.config.micro_batch_tokens):
            policy = pair_logps(self.model, [pairs[i] for i in group], self.pad_id, self.device)
            losses, chosen, rejected = dpo_terms(policy, self.ref_train[group].to(self.device), self.beta)
            (losses.sum() / len(indexes)).backward()
            _add(sums, losses.detach(), chosen.detach(), rejected.detach())
            tokens += sum(pairs[i].n_tokens for i in group)
        learning_rate = self._optimizer_step()
        metrics = {f"train_{key}": value / len(indexes) for key, value in sums.items()}
        return {"step": self.step, **metrics, "tokens": tokens, "learning_rate": learning_rate,
                "seconds": time.perf_counter() - started}  # fmt: skip

    def _optimizer_step(self) -> float:
        torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.requires_grad], self.config.max_grad_norm
        )
        learning_rate = float(self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return learning_rate

    def _metrics(self, indexes: list[int]) -> dict[str, float]:
        assert self.valid_set is not None
        return preference_metrics(self.model, [self.valid_set.examples[i] for i in indexes],
                                  self.ref_valid[indexes], beta=self.beta, pad_id=self.pad_id, device=self.device,
                                  token_limit=self.config.micro_batch_tokens)  # fmt: skip

    def maybe_validate(self, metrics: dict[str, Any], epoch_end: bool) -> None:
        if not self.valid_batches or not self.valid_set:
            return
        if self.step % self.eval_interval == 0 or epoch_end or self.step == self.total_steps:
            batch: list[Any] = self.valid_batches[(self.step // self.eval_interval) % len(self.valid_batches)]
            metrics.update({f"valid_{k}": v for k, v in self._metrics(batch).items()})
        if epoch_end or (self.stopping and "valid_loss" in metrics):
            limit = min(len(self.valid_set), self.config.full_valid_max_examples)
            metrics.update({f"full_valid_{k}": v for k, v in self._metrics(list(range(limit))).items()})
            if self.stopping:
                self.stopping.update(self.step, metrics["full_valid_loss"], self.model)

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "method": "dpo"}


def train_dpo(
    config: TrainConfig,
    train_set: PreferenceDataset,
    valid_set: PreferenceDataset | None = None,
    *,
    callbacks: TrainCallbacks | None = None,
    resume: Path | None = None,
) -> DpoResult:
    """Train a LoRA adapter with DPO on preference pairs (the DPO counterpart of `runner.trainer.train`).

    Args:
        config: model, hyperparameters (`beta` included), LoRA settings, seed, device, initial adapter.
        train_set: tokenized training pairs.
        valid_set: tokenized validation pairs, or None.
        callbacks: progress, checkpoint and resume-state hooks, and the stop signal.
        resume: a folder written by an earlier run's resume state, to continue from.

    Returns:
        The result, with the validation pairs' reference log-probs for the final evaluation.

    Raises:
        ValueError: a bad setting, a resume state of another run, an empty data set.
    """
    if not len(train_set):
        raise ValueError("the training set has no examples")
    _set_threads(config.threads)
    config.output_dir.mkdir(parents=True, exist_ok=True)
    run = _DpoRun(config, train_set, valid_set, callbacks or TrainCallbacks())
    result = execute(run, resume)
    fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(TrainResult)}
    return DpoResult(**fields, valid_reference=run.ref_valid, beta=run.beta)
