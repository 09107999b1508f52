"""Resume state of a training run: what is written to continue it later, and reading it back.

One folder per state: `adapter/` (the LoRA weights in PEFT format) and `STATE_FILE` with the step, the data
position (epoch, batch index), the optimizer and scheduler state, the torch RNG state, the metric history and a
fingerprint of the run (hyperparameters, data size, seed). Reading checks the fingerprint and restores all of
it, so the resumed run takes the same batches with the same dropout masks as the uninterrupted one.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

STATE_FILE = "trainer_state.pt"
ADAPTER_DIR = "adapter"


@dataclass
class ResumePoint:
    """Where a restored run continues: after optimizer step `step`, at batch `batch_index` of epoch `epoch`."""

    step: int
    epoch: int  # 0-based
    batch_index: int
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics of the steps already run


def write_state(
    folder: Path,
    *,
    model: Any,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    step: int,
    epoch: int,
    batch_index: int,
    fingerprint: dict[str, Any],
    history: list[dict[str, Any]],
) -> None:
    """Write resume state for continuing at (`epoch`, `batch_index`) after `step` into `folder`.

    Args:
        folder: the state folder (created; an adapter already in it is replaced).
        model: the PEFT model; its adapter is saved.
        optimizer: the optimizer.
        scheduler: the learning-rate scheduler.
        step: optimizer steps done.
        epoch: the 0-based epoch to continue in.
        batch_index: the batch of `epoch` to continue at.
        fingerprint: what identifies the run; `read_state` refuses state of another fingerprint.
        history: metrics of every step so far.
    """
    folder.mkdir(parents=True, exist_ok=True)
    adapter = folder / ADAPTER_DIR
    if adapter.exists():
        shutil.rmtree(adapter)
    model.save_pretrained(adapter, safe_serialization=True)
    state = {
        "step": step,
        "epoch": epoch,
        "batch_index": batch_index,
        "fingerprint": fingerprint,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "history": history,
    }
    torch.save(state, folder / STATE_FILE)


def read_state(
    folder: Path,
    *,
    model: Any,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    fingerprint: dict[str, Any],
    device: torch.device,
) -> ResumePoint:
    """Restore into `model`, `optimizer`, `scheduler` and the torch RNG what `write_state` saved in `folder`.

    Returns:
        The step, data position and metric history to continue from.

    Raises:
        ValueError: the state belongs to a run with another fingerprint (hyperparameters, data or seed).
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = torch.load(folder / STATE_FILE, weights_only=False)
    if state["fingerprint"] != fingerprint:
        raise ValueError(f"resume state of a different run: {state['fingerprint']} != {fingerprint}")
    weights = load_file(str(folder / ADAPTER_DIR / "adapter_model.safetensors"), device=str(device))
    set_peft_model_state_dict(model, weights)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return ResumePoint(
        step=int(state["step"]),
        epoch=int(state["epoch"]),
        batch_index=int(state["batch_index"]),
        history=list(state["history"]),
    )
