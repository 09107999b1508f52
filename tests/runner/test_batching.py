from __future__ import annotations

import pytest
import torch

from runner.batching import collate, micro_batches
from runner.datasets import IGNORE, Example

CPU = torch.device("cpu")


def example(length: int, tag: int = 0, *, prompt: int = 0) -> Example:
    """`length` tokens (ids start at 100 * tag + 1, so examples can be told apart); the first `prompt` untrained."""
    ids = [100 * tag + i + 1 for i in range(length)]
    return Example(ids, [IGNORE] * prompt + ids[prompt:])


def padded(group: list[Example]) -> int:
    return max(len(e) for e in group) * len(group)


@pytest.mark.parametrize("limit", [1, 8, 10, 16, 24, 40, 1000])
def test_micro_batches_respect_the_limit_and_take_every_example_once(limit: int) -> None:
    examples = [example(n, tag) for tag, n in enumerate([5, 3, 8, 3, 1, 7, 5, 2])]
    groups = micro_batches(examples, limit)
    flat = [e for group in groups for e in group]
    assert sorted(map(id, flat)) == sorted(map(id, examples))  # each example exactly once
    assert all(group for group in groups)
    # Within the limit, except a group that is a single example longer than the limit by itself.
    assert all(padded(g) <= limit or len(g) == 1 for g in groups)


def test_micro_batches_keep_length_order_and_the_order_of_equal_lengths() -> None:
    examples = [example(n, tag) for tag, n in enumerate([4, 2, 4, 1, 2, 4])]
    groups = micro_batches(examples, 8)
    flat = [e for group in groups for e in group]
    # Shortest first; equal lengths in the order they came in (tags 1 before 4, and 0, 2, 5).
    assert [e.input_ids[0] // 100 for e in flat] == [3, 1, 4, 0, 2, 5]
    assert [[len(e) for e in g] for g in groups] == [[1, 2, 2], [4, 4], [4]]


def test_micro_batches_fill_groups_greedily() -> None:
    groups = micro_batches([example(2, t) for t in range(7)], 6)
    assert [len(g) for g in groups] == [3, 3, 1]
    assert micro_batches([example(3)], 1) == [[example(3)]]  # too long alone: still trained, on its own
    assert micro_batches([], 8) == []


def test_collate_pads_right_and_masks_labels() -> None:
    short, long = example(2, 1, prompt=1), example(4, 2, prompt=2)
    batch = collate([short, long], pad_id=0, device=CPU)
    assert batch.input_ids.tolist() == [[101, 102, 0, 0], [201, 202, 203, 204]]
    assert batch.attention_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch.labels.tolist() == [
        [IGNORE, 102, IGNORE, IGNORE],
        [IGNORE, IGNORE, 203, 204],
    ]
    assert batch.input_ids.dtype == batch.attention_mask.dtype == batch.labels.dtype == torch.long
    assert batch.n_tokens == 6
    assert batch.n_labels == 3  # 102, 203, 204 (a row's first position is never a target)


def test_collate_pads_with_the_given_id() -> None:
    batch = collate([example(1, 1), example(3, 2)], pad_id=7, device=CPU)
    assert batch.input_ids[0].tolist() == [101, 7, 7]
    assert batch.labels[0].tolist() == [101, IGNORE, IGNORE]
    assert batch.n_labels == 2  # the first row's only label sits at position 0, which nothing predicts
