"""End-of-training evaluation on the validation data.

Token-level: loss, perplexity and token accuracy over every validation example (teacher forcing, the same
labels as training). Sequence-level, on the first `max_generations` examples: the model answers each prompt
greedily and the answer is compared with the reference (exact match after trimming whitespace, character error
rate). When the references come from a small label set (at most 20 distinct answers, each seen at least twice),
as in classification, it also reports accuracy and macro-F1 over those labels.

DPO jobs are evaluated on their validation pairs instead (`evaluate_preferences`): the DPO loss against the
reference policy and the preference accuracy.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any

import torch

from runner.batching import collate, label_loss, micro_batches
from runner.datasets import Dataset, Example
from runner.dpo import preference_metrics

logger = logging.getLogger(__name__)

MAX_GENERATIONS = 64
GENERATION_BATCH = 8
MAX_LABELS = 20
MIN_PER_LABEL = 2
EXTRA_NEW_TOKENS = 8  # generated beyond the reference length, so a longer wrong answer shows as wrong


def evaluate(
    model: Any,
    tokenizer: Any,
    dataset: Dataset,
    *,
    max_generations: int = MAX_GENERATIONS,
    micro_batch_tokens: int = 4096,
) -> dict[str, Any]:
    """Metrics of `model` on `dataset` (see the module docstring).

    Args:
        model: the trained model (PEFT), on its device.
        tokenizer: the base model's tokenizer.
        dataset: tokenized validation examples.
        max_generations: examples answered by greedy generation.
        micro_batch_tokens: padded tokens per forward pass.

    Returns:
        A JSON-able dict: n_examples, loss, perplexity, token_accuracy, n_generated, exact_match,
        character_error_rate, and label_accuracy / macro_f1 / labels when the answers form a label set.
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loss, accuracy = token_metrics(model, dataset.examples, pad_id, device, micro_batch_tokens)
    sample = [e for e in dataset.examples if e.reference][:max_generations]
    predictions = generate_answers(model, tokenizer, sample)
    references = [e.reference.strip() for e in sample]
    result: dict[str, Any] = {
        "n_examples": len(dataset),
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "token_accuracy": accuracy,
        "n_generated": len(sample),
        "exact_match": _mean([p == r for p, r in zip(predictions, references, strict=True)]),
        "character_error_rate": _mean(
            [char_error_rate(p, r) for p, r in zip(predictions, references, strict=True)]
        ),
    }
    result.update(label_metrics(predictions, references))
    return result


@torch.no_grad()
def token_metrics(
    model: Any, examples: list[Example], pad_id: int, device: torch.device, token_limit: int
) -> tuple[float, float]:
    """Mean loss and token accuracy over `examples` at their labelled positions."""
    model.eval()
    loss_sum, correct, labels = 0.0, 0, 0
    for group in micro_batches(examples, token_limit):
        batch = collate(group, pad_id, device)
        loss, right = label_loss(model, batch)
        loss_sum, correct, labels = loss_sum + float(loss), correct + right, labels + batch.n_labels
    return loss_sum / max(1, labels), correct / max(1, labels)


@torch.no_grad()
def generate_answers(model: Any, tokenizer: Any, examples: list[Example]) -> list[str]:
    """Greedy answers to each example's prompt, decoded without special tokens and trimmed."""
    answers: list[str] = []
    for start in range(0, len(examples), GENERATION_BATCH):
        answers += _generate_batch(model, tokenizer, examples[start : start + GENERATION_BATCH])
    return answers


def _prompt_ids(tokenizer: Any, example: Example) -> list[int]:
    if example.prompt_messages is not None:
        messages = [{"role": m["role"], "content": m["content"]} for m in example.prompt_messages]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(example.prompt_text or "", add_special_tokens=False)["input_ids"])


def _generate_batch(model: Any, tokenizer: Any, examples: list[Example]) -> list[str]:
    device = next(model.parameters()).device
    prompts = [_prompt_ids(tokenizer, e) for e in examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding: every prompt ends where generation starts
        ids[row, longest - len(prompt) :] = torch.tensor(prompt)
        mask[row, longest - len(prompt) :] = 1
    new_tokens = max(len(tokenizer(e.reference, add_special_tokens=False)["input_ids"]) for e in examples)
    output = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=min(512, new_tokens + EXTRA_NEW_TOKENS),
        do_sample=False,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return [tokenizer.decode(row[longest:], skip_special_tokens=True).strip() for row in output]


def char_error_rate(prediction: str, reference: str) -> float:
    """Levenshtein distance between the strings divided by the reference length (0 = identical)."""
    if not reference:
        return 0.0 if not prediction else 1.0
    previous = list(range(len(reference) + 1))
    for i, char in enumerate(prediction, start=1):
        current = [i]
        for j, ref_char in enumerate(reference, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char != ref_char)))
        previous = current
    return previous[-1] / len(reference)


def label_metrics(predictions: list[str], references: list[str]) -> dict[str, Any]:
    """Accuracy and macro-F1 when `references` form a small label set; {} otherwise."""
    counts = Counter(references)
    if not 2 <= len(counts) <= MAX_LABELS or min(counts.values()) < MIN_PER_LABEL:
        return {}
    f1s = []
    for label in counts:
        tp = sum(1 for p, r in zip(predictions, references, strict=True) if p == r == label)
        fp = sum(1 for p, r in zip(predictions, references, strict=True) if p == label != r)
        fn = sum(1 for p, r in zip(predictions, references, strict=True) if r == label != p)
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {
        "labels": sorted(counts),
        "label_accuracy": _mean([p == r for p, r in zip(predictions, references, strict=True)]),
        "macro_f1": sum(f1s) / len(f1s),
    }


def _mean(values: list[Any]) -> float | None:
    return float(sum(values)) / len(values) if values else None


def evaluate_preferences(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    reference: torch.Tensor,
    *,
    beta: float,
    micro_batch_tokens: int = 4096,
) -> dict[str, Any]:
    """DPO metrics of `model` on preference pairs, against the reference policy's log-probs.

    Args:
        model: the trained model (PEFT), on its device.
        tokenizer: the base model's tokenizer.
        dataset: tokenized validation pairs (`runner.preference.PreferenceDataset`).
        reference: [n, 2] reference log-probs of (preferred, non-preferred) of each pair.
        beta: the job's DPO beta.
        micro_batch_tokens: padded tokens per forward pass.

    Returns:
        A JSON-able dict: n_examples, loss (DPO), preference_accuracy (share of pairs whose preferred answer
        gains more reward), reward_margin, chosen_reward, rejected_reward.
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    metrics = preference_metrics(model, dataset.examples, reference, beta=beta, pad_id=int(pad_id), device=device,
                                 token_limit=micro_batch_tokens)  # fmt: skip
    return {"n_examples": len(dataset), **metrics}
