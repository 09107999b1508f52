"""Batching for training and evaluation: examples -> padded tensors, micro-batches, and the loss at labels.

- `micro_batches` splits one batch of examples into groups whose padded size stays within a token limit
  (gradient accumulation: the trainer's `batch_size` stays the effective batch);
- `collate` right-pads a group into a `Batch` of tensors (labels -100 on padding);
- `label_loss` runs the model's body and applies the (frozen, tied) LM head only at the positions that
  carry a label, since the head (hidden x vocabulary per token) is where much of the time goes on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from runner.datasets import IGNORE, Example


@dataclass
class Batch:
    """Right-padded tensors of one micro-batch; `labels` is -100 where no loss is taken (padding included)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def n_labels(self) -> int:
        """Positions that are predicted (the first token of a row is never a target)."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.attention_mask.sum())


def collate(examples: list[Example], pad_id: int, device: torch.device) -> Batch:
    """Right-pad `examples` to the longest one."""
    longest = max(len(e) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example)
        ids[row, :n] = torch.tensor(example.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels)
    return Batch(ids.to(device), mask.to(device), labels.to(device))


def label_loss(model: Any, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy and the number of correct argmax predictions, at labelled positions only.

    The LM head runs on the hidden states of the positions that predict a label, not on every position.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = inner.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    targets = batch.labels[:, 1:]
    selected = targets != IGNORE
    logits = inner.lm_head(hidden[:, :-1][selected]).float()
    wanted = targets[selected]
    loss = F.cross_entropy(logits, wanted, reduction="sum")
    correct = int((logits.argmax(-1) == wanted).sum())
    return loss, correct


def micro_batches(examples: list[Example], token_limit: int) -> list[list[Example]]:
    """Split one batch into consecutive groups whose padded size stays within `token_limit`.

    The examples are taken shortest first (a stable sort, so equal lengths keep their order); an example
    longer than `token_limit` still gets a group of its own.
    """
    groups: list[list[Example]] = []
    current: list[Example] = []
    for example in sorted(examples, key=len):
        longest = max([len(example), *(len(e) for e in current)])
        if current and longest * (len(current) + 1) > token_limit:
            groups.append(current)
            current = []
        current.append(example)
    if current:
        groups.append(current)
    return groups
