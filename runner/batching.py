"""Batching for training and evaluation: examples -> padded tensors, micro-batches, and the loss at labels.

- `micro_batches` splits one batch of examples into groups whose padded size stays within a token limit
  (gradient accumulation: the trainer's `batch_size` stays the effective batch);
- `collate` right-pads a group into a `Batch` of tensors (labels -100 on padding);
- `label_loss` runs the model's body and applies the (frozen, tied) LM head only at the positions that
  carry a label, since the head (hidden x vocabulary per token) is where much of the time goes on a CPU;
- `fuse_lora` routes peft's LoRA linear layers and the frozen RMSNorm layers through hand-written autograd
  functions that compute in the base dtype and keep no fp32 copies of bf16 activations for backward (the
  trainer's fast path; `TrainConfig.fused_lora=False` keeps peft's own forward).
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


# --- fused LoRA ------------------------------------------------------------------------------------------------


class _LoraLinear(torch.autograd.Function):
    """`x W^T + b + s * (dropout(x) A^T) B^T` in the activations' dtype, with a hand-written backward.

    peft's own forward casts each projection's input to the LoRA weights' fp32, draws the dropout mask and the
    dropped input in fp32 and adds the update in fp32: three fp32 copies of every projection's input kept for
    backward, and a cast per op. Here the product runs in the base dtype (bf16) with fp32 LoRA weights cast
    once per call; backward keeps the (shared) input, a one-byte dropout mask and the rank-r product only.
    Gradients of A and B come back in fp32.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        keep: float,
    ) -> torch.Tensor:
        dtype = x.dtype
        a = (lora_a / keep).to(dtype) if keep < 1 else lora_a.to(dtype)
        b = (lora_b * scaling).to(dtype)
        mask = torch.empty_like(x, dtype=torch.bool).bernoulli_(keep) if keep < 1 else None
        dropped = x * mask if mask is not None else x
        h = dropped @ a.t()
        out = torch.nn.functional.linear(x, weight, bias)
        out = out.add_(h @ b.t())  # in place: `out` is no input of any saved product
        ctx.save_for_backward(x, weight, a, b, h, mask)
        ctx.scaling, ctx.keep, ctx.lora_dtype = scaling, keep, lora_a.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, weight, a, b, h, mask = ctx.saved_tensors
        grad2 = grad.reshape(-1, grad.shape[-1])
        h2 = h.reshape(-1, h.shape[-1])
        grad_h = grad2 @ b  # [tokens, r], the scaling included
        grad_b = (grad2.t() @ h2).to(ctx.lora_dtype).mul_(ctx.scaling)
        dropped = (x * mask if mask is not None else x).reshape(-1, x.shape[-1])
        # forward used A / keep: d/dA of dropped (A / keep)^T is grad_h^T dropped / keep.
        grad_a = (grad_h.t() @ dropped).to(ctx.lora_dtype).div_(ctx.keep)
        grad_x = None
        if ctx.needs_input_grad[0]:
            lora_x = grad_h @ a
            if mask is not None:
                lora_x = lora_x * mask.reshape(-1, mask.shape[-1])
            grad_x = (grad2 @ weight).add_(lora_x).reshape(x.shape)
        return grad_x, None, None, grad_a, grad_b, None, None


def fuse_lora(model: Any) -> int:
    """Route every plain LoRA linear layer of `model` through `_LoraLinear`; returns how many were routed.

    Only the simple case is taken over: an unmerged `nn.Linear` base with one active vanilla adapter (no DoRA
    or other variant); anything else (adapters disabled, as a DPO reference pass does, merged weights, 4-bit
    QLoRA bases, mixed-adapter batches) goes through peft's own forward. The parameters stay peft's, so saving,
    loading and the optimizer see no difference. The frozen RMSNorm layers go through `lean_norms` too.
    """
    from peft.tuners.lora import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLinear) and type(module.get_base_layer()) is torch.nn.Linear:
            module.forward = _fused_forward.__get__(module)  # type: ignore[method-assign]
            count += 1
    lean_norms(model)
    return count


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    adapters = [a for a in self.active_adapters if a in self.lora_A]
    if (
        args
        or kwargs
        or self.disable_adapters
        or self.merged
        or len(adapters) != 1
        or adapters[0] in self.lora_variant
    ):
        return type(self).forward(self, x, *args, **kwargs)
    name = adapters[0]
    dropout = self.lora_dropout[name]
    p = float(getattr(dropout, "p", 0.0)) if dropout.training else 0.0
    base = self.get_base_layer()
    return _LoraLinear.apply(  # type: ignore[no-any-return]
        x,
        base.weight,
        base.bias,
        self.lora_A[name].weight,
        self.lora_B[name].weight,
        float(self.scaling[name]),
        1.0 - p,
    )


class _RMSNorm(torch.autograd.Function):
    """Llama's RMSNorm with a frozen weight, keeping only the (bf16) input and one fp32 scale per token for
    backward: the module's own forward keeps fp32 copies of its input and of the normalized input."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(rstd.dtype) * rstd
        grad_normed = grad.to(rstd.dtype) * weight.to(rstd.dtype)
        mean = (grad_normed * normed).mean(-1, keepdim=True)
        return (rstd * (grad_normed - normed * mean)).to(x.dtype), None, None


_RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}


def lean_norms(model: Any) -> int:
    """Route the frozen RMSNorm layers of Llama-like models through `_RMSNorm`; returns how many."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in _RMS_NORMS and not module.weight.requires_grad:
            module.forward = _norm_forward.__get__(module)
            count += 1
    return count


def _norm_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return type(self).forward(self, hidden_states)  # type: ignore[no-any-return]
    return _RMSNorm.apply(hidden_states, self.weight, float(self.variance_epsilon))  # type: ignore[no-any-return]
