"""Preference (DPO) data: JSONL pairs -> two tokenized answers after the same prompt.

Each line is OpenAI's shape, `{"input": {"messages": [...], "tools": [...]?}, "preferred_output": [{"role":
"assistant", ...}], "non_preferred_output": [...]}`. Both answers go through the base model's chat template after
the same prompt (`runner.datasets.Tokenization` renders them); labels are kept only on the answer's tokens, its
end-of-turn token included: assistant messages inside the prompt get weight 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from core.training_files import NON_PREFERRED_KEYS, PREFERRED_KEYS
from runner.datasets import Example, Tokenization, parse_lines, user_prompt


@dataclass
class Pair:
    """One preference pair: the preferred (`chosen`) and the non-preferred (`rejected`) answer, tokenized."""

    chosen: Example
    rejected: Example

    def __len__(self) -> int:
        """The longer of the two sequences (what a padded row costs)."""
        return max(len(self.chosen), len(self.rejected))

    @property
    def n_tokens(self) -> int:
        return len(self.chosen) + len(self.rejected)


@dataclass
class PreferenceDataset:
    """Tokenized pairs of one file and what tokenizing them found."""

    examples: list[Pair]
    format: str = "preference"
    truncated: int = 0  # pairs with at least one answer cut to `max_seq_len`
    no_labels: int = 0  # pairs with an answer left without any trained token
    prompts: list[str] = field(default_factory=list)  # user text of each pair (drift profile)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def n_tokens(self) -> int:
        return sum(p.n_tokens for p in self.examples)


def _answer(example: dict, keys: tuple[str, str]) -> dict:
    return dict(next(example[k] for k in keys if k in example)[0])


def _prompt(example: dict) -> list[dict]:
    """The prompt messages, with earlier assistant turns untrained (weight 0)."""
    messages = example["input"]["messages"]
    return [m | {"weight": 0} if m.get("role") == "assistant" else m for m in messages]


def encode_pair(tokenization: Tokenization, example: dict) -> Pair:
    """Tokenize one preference example, without truncation.

    Raises:
        KeyError: the example is not preference data (the validator catches this earlier).
    """
    prompt = _prompt(example)
    chosen = _answer(example, PREFERRED_KEYS) | {"weight": 1}
    rejected = _answer(example, NON_PREFERRED_KEYS) | {"weight": 1}
    return Pair(
        tokenization.encode({"messages": [*prompt, chosen]}),
        tokenization.encode({"messages": [*prompt, rejected]}),
    )


def count_tokens(tokenization: Tokenization, example: dict) -> int:
    """Tokens of the longer answer's sequence (the validator's token counter: each sequence must fit)."""
    return len(encode_pair(tokenization, example))


def load_pairs(lines: Iterable[bytes], tokenization: Tokenization) -> PreferenceDataset:
    """Parse and tokenize a preference JSONL file, truncating long sequences.

    Args:
        lines: the file's lines (a binary file object works).
        tokenization: tokenizer and `max_seq_len`.

    Returns:
        The pairs with their truncation and no-label counts.

    Raises:
        KeyError: a line is not preference data.
    """
    pairs: list[Pair] = []
    prompts: list[str] = []
    for raw in parse_lines(lines):
        pair = encode_pair(tokenization, raw)
        pairs.append(Pair(tokenization.truncate(pair.chosen), tokenization.truncate(pair.rejected)))
        prompts.append(user_prompt({"messages": raw["input"]["messages"]}))
    dataset = PreferenceDataset(pairs, prompts=prompts)
    dataset.truncated = sum(1 for p in pairs if p.chosen.truncated or p.rejected.truncated)
    dataset.no_labels = sum(1 for p in pairs if not p.chosen.n_labels or not p.rejected.n_labels)
    return dataset
