"""The LoRA training loop: a plain function of (config, data, callbacks), with no database or Redis inside.

This module holds the loop itself: loading the base model with fresh LoRA layers (`load_model`), device and
dtype choice, the optimizer and learning-rate schedule, one optimizer step, periodic validation, adapter
checkpoints at epoch ends and the stop/pause handling; `train()` is the entry point and `TrainCallbacks` the
hooks it calls. Padding, micro-batches and the loss live in `runner.batching`; writing and reading resume
state in `runner.resume`.

Where the time goes on a CPU, and what this loop does about it:
- padding: batches are length-bucketed (`datasets.bucketed_batches`) and split into micro-batches of at most
  `micro_batch_tokens` padded tokens (gradient accumulation; `batch_size` stays the effective batch);
- the LM head (hidden x vocabulary per token): hidden states come from the base model's body and the (frozen,
  tied) head runs only at the positions that carry a label (`batching.label_loss`);
- precision: the base weights in bf16 where the CPU has bf16 matrix units (else fp32), LoRA weights and
  optimizer in fp32;
- activation memory and casts: the LoRA layers and RMSNorms run through `batching.fuse_lora` (products in the
  base dtype, a one-byte dropout mask, no fp32 copies of activations kept for backward): about half the peak
  memory of peft's forward, the same loss curve (tests/runner/test_fast_path.py).

Resume state is written at every epoch end, at least every `resume_state_seconds`, and when stopping for a
pause; a run resumed from it takes the same batches with the same dropout masks as the uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from core import hyperparameters
from core.hardware import cpu_has_bf16
from core.train_config import TrainConfig
from runner.batching import collate, fuse_lora, label_loss, micro_batches
from runner.datasets import Dataset, Example, bucketed_batches
from runner.resume import read_state, write_state

logger = logging.getLogger(__name__)

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
StopReason = Literal["pause", "cancel"]


class TrainCallbacks:
    """Hooks the trainer calls from its own thread; the default does nothing. The worker subclasses it."""

    def on_start(
        self, *, total_steps: int, hyperparameters: hyperparameters.Hyperparameters, step: int
    ) -> None:
        """Training is about to start at `step` (0, or the resumed step) of `total_steps`."""

    def on_step(self, step: int, total_steps: int, metrics: dict[str, Any]) -> None:
        """Optimizer step `step` (1-based) finished; `metrics` has train_loss, train_mean_token_accuracy,
        tokens, and valid_* / full_valid_* when they were computed at this step."""

    def on_checkpoint(self, step: int, epoch: int, adapter_dir: Path) -> None:
        """Epoch `epoch` (1-based) ended at `step`; `adapter_dir` holds the adapter in PEFT format."""

    def on_resume_state(self, step: int, state_dir: Path) -> None:
        """Resume state for continuing after `step` was written to `state_dir`."""

    def should_stop(self) -> StopReason | None:
        """Checked between steps: "pause" (save resume state, then stop), "cancel" (stop) or None."""
        return None


@dataclass
class TrainResult:
    hyperparameters: hyperparameters.Hyperparameters
    step: int
    total_steps: int
    stopped: StopReason | None  # None when every step ran
    adapter_dir: Path | None  # the final adapter (None when stopped)
    history: list[dict[str, Any]] = field(
        default_factory=list
    )  # metrics of every step, resumed ones included
    trained_tokens: int = 0  # tokens of the training data x epochs (the billing count)
    model: Any = None  # the trained PEFT model (eval mode) for evaluation; None when stopped
    early_stopping: dict[str, Any] | None = (
        None  # with early stopping on: best_step, best_valid_loss, stopped_at
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("`device` is cuda but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 where the hardware multiplies it fast, else fp32.

    CPUs without AVX-512 BF16 or AMX emulate bf16 matrix products about 50 times slower than fp32 (measured on
    an AVX2-only EPYC: 1.2 against 46 GFLOP/s), so "auto" picks fp32 there.
    """
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def load_model(config: TrainConfig, device: torch.device) -> Any:
    """The base model with fresh LoRA layers (seeded), frozen except the adapter.

    Raises:
        ValueError: `qlora` was asked for without a CUDA device.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": resolve_dtype(config.dtype, device), "attn_implementation": "sdpa"}
    if config.qlora:
        kwargs["quantization_config"] = _qlora_config(device)
    model = AutoModelForCausalLM.from_pretrained(config.model_path, **kwargs)
    if config.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model.to(device)  # type: ignore[arg-type]
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,  # type: ignore[arg-type]  # declared int; peft and vLLM use alpha / r, floats work
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules or ALL_PROJECTIONS,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(config.seed)
    peft_model = get_peft_model(model, lora)
    if config.base_model_name:
        peft_model.peft_config["default"].base_model_name_or_path = config.base_model_name
    if config.init_adapter is not None:
        _load_adapter_weights(peft_model, config.init_adapter, device)
    if config.fused_lora:
        fuse_lora(peft_model)
    return peft_model


def _load_adapter_weights(model: Any, folder: Path, device: torch.device) -> None:
    """Continued training: start from the weights of the adapter in `folder` (same rank and targets).

    Raises:
        ValueError: the adapter's weights do not fit the new LoRA layers.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(folder / "adapter_model.safetensors"), device=str(device))
    loaded: Any = set_peft_model_state_dict(model, weights)
    if loaded.unexpected_keys:
        raise ValueError(
            f"the adapter in {folder} does not fit the new LoRA layers: {loaded.unexpected_keys[:3]}"
        )


def _qlora_config(device: torch.device) -> Any:
    if device.type != "cuda":
        raise ValueError(
            "`qlora` (4-bit base weights with bitsandbytes) needs a CUDA device; this worker trains on the CPU. "
            "Train without qlora, or run the job on a GPU worker."
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )


def _schedule(config: TrainConfig, total_steps: int) -> Any:
    warmup = max(1, round(config.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if config.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return max(0.0, 1 - progress)

    return factor


class _Run:
    """The state of one training run: model, optimizer, data order and position."""

    def __init__(
        self, config: TrainConfig, train_set: Dataset, valid_set: Dataset | None, callbacks: TrainCallbacks
    ) -> None:
        self.config = config
        self.train_set = train_set
        self.valid_set = valid_set
        self.callbacks = callbacks
        self.hp = hyperparameters.resolve(
            n_epochs=config.n_epochs,
            batch_size=config.batch_size,
            learning_rate_multiplier=config.learning_rate_multiplier,
            n_examples=len(train_set),
            method=config.method,
        )
        self.lengths = [len(e) for e in train_set.examples]
        self.steps_per_epoch = math.ceil(len(train_set) / self.hp.batch_size)
        self.total_steps = self.steps_per_epoch * self.hp.n_epochs
        self.device = resolve_device(config.device)
        self.model = load_model(config, self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        lr = config.base_learning_rate * self.hp.learning_rate_multiplier
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _schedule(config, self.total_steps)
        )
        self.pad_id = _pad_id(config.model_path)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.last_state_save = time.monotonic()
        self.eval_interval = config.eval_interval or max(1, self.total_steps // 10)
        self.valid_batches = self._valid_batches()
        self.state_dir: Path | None = None
        self.stopping = _EarlyStopping(config) if config.early_stopping_patience and valid_set else None

    def _valid_batches(self) -> list[list[Example]]:
        if not self.valid_set or not len(self.valid_set):
            return []
        examples = self.valid_set.examples
        size = self.hp.batch_size
        return [examples[i : i + size] for i in range(0, len(examples), size)]

    # --- one step ------------------------------------------------------------------------------------------

    def train_step(self, indexes: list[int]) -> dict[str, Any]:
        started = time.perf_counter()
        examples = [self.train_set.examples[i] for i in indexes]
        groups = micro_batches(examples, self.config.micro_batch_tokens)
        batches = [collate(group, self.pad_id, self.device) for group in groups]
        n_labels = max(1, sum(b.n_labels for b in batches))
        total_loss, total_correct = 0.0, 0
        self.model.train()
        for batch in batches:
            loss, correct = label_loss(self.model, batch)
            (loss / n_labels).backward()
            total_loss += float(loss.detach())
            total_correct += correct
        torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.requires_grad], self.config.max_grad_norm
        )
        learning_rate = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {
            "step": self.step,
            "train_loss": total_loss / n_labels,
            "train_mean_token_accuracy": total_correct / n_labels,
            "tokens": sum(b.n_tokens for b in batches),
            "learning_rate": learning_rate,
            "seconds": time.perf_counter() - started,
        }

    @torch.no_grad()
    def evaluate(self, groups: list[list[Example]]) -> tuple[float, float]:
        """Mean loss and token accuracy over `groups` of examples (eval mode: no dropout, no RNG use)."""
        self.model.eval()
        loss_sum, correct, labels = 0.0, 0, 0
        for group in groups:
            for part in micro_batches(group, self.config.micro_batch_tokens):
                batch = collate(part, self.pad_id, self.device)
                loss, right = label_loss(self.model, batch)
                loss_sum, correct, labels = loss_sum + float(loss), correct + right, labels + batch.n_labels
        return loss_sum / max(1, labels), correct / max(1, labels)

    def maybe_validate(self, metrics: dict[str, Any], epoch_end: bool) -> None:
        if not self.valid_batches:
            return
        if self.step % self.eval_interval == 0 or epoch_end or self.step == self.total_steps:
            batch = self.valid_batches[(self.step // self.eval_interval) % len(self.valid_batches)]
            metrics["valid_loss"], metrics["valid_mean_token_accuracy"] = self.evaluate([batch])
        if epoch_end or (self.stopping and "valid_loss" in metrics):
            limit = self.config.full_valid_max_examples
            examples = self.valid_set.examples[:limit] if self.valid_set else []
            size = self.hp.batch_size
            groups = [examples[i : i + size] for i in range(0, len(examples), size)]
            metrics["full_valid_loss"], metrics["full_valid_mean_token_accuracy"] = self.evaluate(groups)
            if self.stopping:
                self.stopping.update(self.step, metrics["full_valid_loss"], self.model)

    # --- saving --------------------------------------------------------------------------------------------

    def save_adapter(self, folder: Path) -> Path:
        if folder.exists():
            shutil.rmtree(folder)
        self.model.save_pretrained(folder, safe_serialization=True)
        return folder

    def save_state(self, epoch: int, batch_index: int) -> Path:
        """Write resume state for continuing at (`epoch`, `batch_index`) into a fresh folder."""
        folder = self.config.output_dir / f"state-{self.step}"
        write_state(
            folder,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            step=self.step,
            epoch=epoch,
            batch_index=batch_index,
            fingerprint=self.fingerprint(),
            history=self.history,
        )
        if self.stopping:
            self.stopping.save(folder)
        self.last_state_save = time.monotonic()
        self.callbacks.on_resume_state(self.step, folder)
        if self.state_dir and self.state_dir != folder:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        self.state_dir = folder
        return folder

    def fingerprint(self) -> dict[str, Any]:
        return {**self.hp.as_dict(), "n_examples": len(self.train_set), "seed": self.config.seed}

    def load_state(self, folder: Path) -> tuple[int, int]:
        """Restore everything saved by `save_state`; returns the (epoch, batch index) to continue at.

        Raises:
            ValueError: the state belongs to a run with other hyperparameters or data.
        """
        point = read_state(
            folder,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            fingerprint=self.fingerprint(),
            device=self.device,
        )
        self.step = point.step
        self.history = point.history
        if self.stopping:
            self.stopping.load(folder, self.device)
        return point.epoch, point.batch_index


class _EarlyStopping:
    """Early stopping: the best full validation loss so far, its step and LoRA weights, and how many
    evaluations in a row did not improve on it by more than `min_delta`."""

    FILE = "early_stopping.safetensors"

    def __init__(self, config: TrainConfig) -> None:
        self.patience, self.min_delta = config.early_stopping_patience, config.early_stopping_min_delta
        self.best_loss, self.best_step, self.bad = math.inf, 0, 0
        self.best: dict[str, torch.Tensor] = {}
        self.stopped_at: int | None = None

    def update(self, step: int, loss: float, model: Any) -> None:
        if loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_step, self.bad = loss, step, 0
            self.best = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        else:
            self.bad += 1
            if self.bad >= self.patience:
                self.stopped_at = step

    def restore(self, model: Any) -> None:
        """Put the best weights back into `model` (when some evaluation improved)."""
        if not self.best:
            return
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in self.best:
                    param.copy_(self.best[name])

    def report(self) -> dict[str, Any]:
        return {
            "best_step": self.best_step,
            "best_valid_loss": self.best_loss,
            "stopped_at_step": self.stopped_at,
        }

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        meta = {"best_loss": repr(self.best_loss), "best_step": str(self.best_step), "bad": str(self.bad)}
        save_file({n: t.contiguous() for n, t in self.best.items()}, str(folder / self.FILE), metadata=meta)

    def load(self, folder: Path, device: torch.device) -> None:
        from safetensors import safe_open

        path = folder / self.FILE
        if not path.exists():
            return
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            meta = handle.metadata()
            self.best = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        self.best_loss, self.best_step, self.bad = (
            float(meta["best_loss"]),
            int(meta["best_step"]),
            int(meta["bad"]),
        )


def _pad_id(model_path: Path) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad or 0)


def train(
    config: TrainConfig,
    train_set: Dataset,
    valid_set: Dataset | None = None,
    *,
    callbacks: TrainCallbacks | None = None,
    resume: Path | None = None,
) -> TrainResult:
    """Train a LoRA adapter on `train_set`.

    Args:
        config: model, hyperparameters, LoRA settings, seed, device.
        train_set: tokenized training examples.
        valid_set: tokenized validation examples, or None.
        callbacks: progress, checkpoint and resume-state hooks, and the stop signal.
        resume: a folder written by an earlier run's resume state, to continue from.

    Returns:
        The result: final adapter (unless stopped), steps, metric history, trained tokens.

    Raises:
        ValueError: a bad setting (qlora on the CPU, a resume state of another run, an empty data set).
    """
    if not len(train_set):
        raise ValueError("the training set has no examples")
    _set_threads(config.threads)
    config.output_dir.mkdir(parents=True, exist_ok=True)
    return execute(_Run(config, train_set, valid_set, callbacks or TrainCallbacks()), resume)


def execute(run: _Run, resume: Path | None) -> TrainResult:
    """Run `run` (from `resume` when given) to its end or a stop; shared by supervised and DPO training."""
    config, callbacks, train_set = run.config, run.callbacks, run.train_set
    epoch, batch_index = run.load_state(resume) if resume else (0, 0)
    callbacks.on_start(total_steps=run.total_steps, hyperparameters=run.hp, step=run.step)
    logger.info(
        "training %s: %d steps from step %d, %s", config.model_path.name, run.total_steps, run.step, run.hp
    )
    stopped = _loop(run, epoch, batch_index)
    trained_tokens = train_set.n_tokens * run.hp.n_epochs
    if run.stopping and run.stopping.stopped_at is not None:  # what was trained: the steps that ran
        trained_tokens = sum(int(m.get("tokens", 0)) for m in run.history)
    if stopped:
        return TrainResult(run.hp, run.step, run.total_steps, stopped, None, run.history, trained_tokens)
    if run.stopping:
        run.stopping.restore(run.model)
    adapter = run.save_adapter(config.output_dir / "adapter")
    run.model.eval()
    report = run.stopping.report() if run.stopping else None
    return TrainResult(
        run.hp, run.step, run.total_steps, None, adapter, run.history, trained_tokens, run.model, report
    )


def _loop(run: _Run, epoch: int, batch_index: int) -> StopReason | None:
    while epoch < run.hp.n_epochs:
        reason = _run_epoch(run, epoch, batch_index)
        if reason or (run.stopping and run.stopping.stopped_at is not None):
            return reason
        epoch, batch_index = epoch + 1, 0
    return None


def _run_epoch(run: _Run, epoch: int, batch_index: int) -> StopReason | None:
    """Train epoch `epoch` from batch `batch_index`; a stop reason when the callbacks asked to stop."""
    config = run.config
    batches = bucketed_batches(run.lengths, run.hp.batch_size, seed=config.seed, epoch=epoch)
    while batch_index < len(batches):
        reason = run.callbacks.should_stop()
        if reason:
            if reason == "pause":
                run.save_state(epoch, batch_index)
            return reason
        metrics = run.train_step(batches[batch_index])
        batch_index += 1
        epoch_end = batch_index == len(batches)
        run.maybe_validate(metrics, epoch_end)
        run.history.append(metrics)
        run.callbacks.on_step(run.step, run.total_steps, metrics)
        if epoch_end:
            adapter = run.save_adapter(config.output_dir / f"ckpt-{run.step}")
            run.callbacks.on_checkpoint(run.step, epoch + 1, adapter)
            if epoch + 1 < run.hp.n_epochs:
                run.save_state(epoch + 1, 0)
        if run.stopping and run.stopping.stopped_at is not None:
            return None
        if not epoch_end and time.monotonic() - run.last_state_save >= config.resume_state_seconds:
            run.save_state(epoch, batch_index)
    return None


def _set_threads(threads: int) -> None:
    count = threads or os.cpu_count() or 1
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
