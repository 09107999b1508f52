"""Training data: JSONL examples -> token ids with loss labels, and length-bucketed batches.

Chat examples go through the base model's chat template. Labels (the token the model must predict) are kept only
on the tokens of assistant messages with `weight` 1 (the default), their end-of-turn token included, so the
model learns to stop; every other position is -100. Legacy prompt/completion examples train on the completion and
an end-of-sequence token. Examples longer than `max_seq_len` are cut at the end and counted.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from core import drift_profile

logger = logging.getLogger(__name__)

IGNORE = -100  # label of a position that carries no loss
DEFAULT_MAX_SEQ_LEN = 1024
MEGA_BATCH = 16  # batches per shuffled mega-batch that are sorted by length together


@dataclass
class Example:
    """One tokenized example. `labels[i]` is the target for `input_ids[i]` itself (shifted at loss time)."""

    input_ids: list[int]
    labels: list[int]
    prompt_messages: list[dict] | None = None  # chat: the messages before the last assistant answer
    prompt_text: str | None = None  # completion: the prompt
    reference: str = ""  # the last trained answer, for generation metrics
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_labels(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


@dataclass
class Dataset:
    """Tokenized examples of one file and what tokenizing them found."""

    examples: list[Example]
    format: str  # chat | completion
    truncated: int = 0  # examples cut to `max_seq_len`
    no_labels: int = 0  # examples left without any trained token (all weights 0, or cut away)
    prompts: list[str] = field(default_factory=list)  # user text of each example (drift profile)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def n_tokens(self) -> int:
        return sum(len(e) for e in self.examples)


class Tokenization:
    """Turns example dicts into `Example`s with one tokenizer and context length."""

    def __init__(self, tokenizer: Any, *, max_seq_len: int = DEFAULT_MAX_SEQ_LEN) -> None:
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len

    def encode(self, example: dict) -> Example:
        """Tokenize one example (chat or prompt/completion) without truncation.

        Raises:
            ValueError: the example is in a format this trainer does not train on (preference data).
        """
        if "messages" in example:
            return self._encode_chat(example["messages"])
        if "prompt" in example and "completion" in example:
            return self._encode_completion(str(example["prompt"]), str(example["completion"]))
        raise ValueError("only chat (`messages`) and prompt/completion examples can be trained on")

    def count_tokens(self, example: dict) -> int:
        """Tokens of one example as it is trained (before truncation); the validator's token counter."""
        return len(self.encode(example))

    def _encode_chat(self, messages: list[dict]) -> Example:
        messages = [_plain(m) for m in messages]
        full = self._render(messages, generation_prompt=False)
        found = self._answer_spans(messages, full)
        if found is None:
            spans, last_answer = self._answer_spans_by_prefixes(messages)
            inside = _inside
        else:
            spans, last_answer = found
            inside = _sorted_inside
        encoded = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        labels = [
            tok if inside(offset, spans) else IGNORE
            for tok, offset in zip(ids, encoded["offset_mapping"], strict=True)
        ]
        for message in messages:
            message.pop("_weight", None)
        answer = last_answer if last_answer is not None else _last_assistant(messages)
        prompt = messages[:answer] if answer is not None else messages
        reference = messages[answer]["content"] if answer is not None else ""
        return Example(ids, labels, prompt_messages=prompt, reference=reference)

    def _answer_spans(
        self, messages: list[dict], full: str
    ) -> tuple[list[tuple[int, int]], int | None] | None:
        """Character spans of the trained answers in `full`, found in one pass (linear in the messages).

        Each answer is found after the previous one as the template's assistant header, its content and the
        template's end-of-turn text; the span is the one `_answer_spans_by_prefixes` computes from the rendered
        prefix (the content through the end of turn, trailing whitespace dropped). None when an answer is not
        found that way (a template that changes the content): the caller then renders the prefixes.
        """
        marks = self._template_marks
        if marks is None:
            return None
        header, end_of_turn = marks
        spans: list[tuple[int, int]] = []
        last_answer, cursor = None, 0
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            content = message["content"]
            found = full.find(header + content + end_of_turn, cursor)
            if found < 0:
                return None
            start = found + len(header)
            end = cursor = start + len(content) + len(end_of_turn)
            while end > start and full[end - 1].isspace():  # only when the end of turn is empty
                end -= 1
            if message.get("_weight", 1):
                if content:  # an empty answer trains nothing, as a rendered prefix gives it
                    spans.append((start, end))
                last_answer = index
        return spans, last_answer

    @cached_property
    def _template_marks(self) -> tuple[str, str] | None:
        """What the chat template writes before and after an assistant message's content (trailing whitespace
        dropped): `<|im_start|>assistant` + newline and `<|im_end|>` for SmolLM2. None when probe messages do
        not appear verbatim, or a conversation's rendering does not start with that of its first message."""
        question = {"role": "user", "content": "\ue000probe question\ue001"}
        answer = "\ue000probe answer\ue001"
        before = self._render([question], generation_prompt=False)
        text = self._render([question, {"role": "assistant", "content": answer}], generation_prompt=False)
        at = text.rfind(answer)
        if at < len(before) or not text.startswith(before):
            return None
        return text[len(before) : at], text[at + len(answer) :].rstrip()

    def _answer_spans_by_prefixes(self, messages: list[dict]) -> tuple[list[tuple[int, int]], int | None]:
        """The spans from rendering the conversation up to each answer (one render per answer: quadratic)."""
        spans: list[tuple[int, int]] = []
        last_answer = None
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            # The answer's text through its end-of-turn token; the header before it stays a prompt.
            text = self._render(messages[: index + 1], generation_prompt=False)
            start, end = text.rfind(message["content"]), len(text.rstrip())
            if message.get("_weight", 1):
                spans.append((start, end))
                last_answer = index
        return spans, last_answer

    def _encode_completion(self, prompt: str, completion: str) -> Example:
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = self.tokenizer(completion, add_special_tokens=False)["input_ids"]
        answer_ids = [*answer_ids, self.tokenizer.eos_token_id]
        ids = [*prompt_ids, *answer_ids]
        labels = [IGNORE] * len(prompt_ids) + answer_ids
        return Example(ids, labels, prompt_text=prompt, reference=completion)

    def _render(self, messages: list[dict], *, generation_prompt: bool) -> str:
        messages_for_template = [{k: v for k, v in m.items() if not k.startswith("_")} for m in messages]
        return str(
            self.tokenizer.apply_chat_template(
                messages_for_template, tokenize=False, add_generation_prompt=generation_prompt
            )
        )

    def truncate(self, example: Example) -> Example:
        """`example` cut to `max_seq_len` tokens (the end is dropped), marked when it was cut."""
        if len(example) <= self.max_seq_len:
            return example
        example.input_ids = example.input_ids[: self.max_seq_len]
        example.labels = example.labels[: self.max_seq_len]
        example.truncated = True
        return example


def _plain(message: dict) -> dict:
    """A message as the chat template sees it: role and text content; `weight` kept aside as `_weight`."""
    role = "system" if message.get("role") == "developer" else str(message.get("role"))
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    if not content and (message.get("tool_calls") or message.get("function_call")):
        content = json.dumps(message.get("tool_calls") or message.get("function_call"))
    plain = {"role": role, "content": content or ""}
    if role == "assistant":
        plain["_weight"] = message.get("weight", 1)
    return plain


def _inside(offset: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    start, end = offset
    return any(lo <= start and end <= hi and end > start for lo, hi in spans)


def _sorted_inside(offset: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    """`_inside` for spans that are sorted and disjoint: only the last span starting at or before the token
    can hold it (a binary search instead of a scan of every span)."""
    start, end = offset
    index = bisect.bisect_right(spans, (start, math.inf)) - 1
    return index >= 0 and end <= spans[index][1] and end > start


def _last_assistant(messages: list[dict]) -> int | None:
    indexes = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return indexes[-1] if indexes else None


def user_prompt(example: dict) -> str:
    """The user text of one example dict (chat: user messages joined; completion: the prompt)."""
    if "prompt" in example:
        return str(example["prompt"])
    # The same text the gateway's drift monitor takes from live chat requests.
    return drift_profile.prompt_of_messages(example.get("messages", []))


def parse_lines(lines: Iterable[bytes]) -> Iterator[dict]:
    """The example dicts of a JSONL file (blank lines skipped; a BOM on the first line tolerated)."""
    for number, raw in enumerate(lines, start=1):
        data = raw.rstrip(b"\r\n")
        if number == 1 and data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        if data.strip():
            yield json.loads(data)


def load_dataset(lines: Iterable[bytes], tokenization: Tokenization) -> Dataset:
    """Parse and tokenize a JSONL file, truncating long examples.

    Args:
        lines: the file's lines (a binary file object works).
        tokenization: tokenizer and `max_seq_len`.

    Returns:
        The dataset with its truncation and no-label counts.

    Raises:
        ValueError: an example is preference (DPO) data or malformed (the validator catches this earlier).
    """
    examples: list[Example] = []
    prompts: list[str] = []
    kinds: set[str] = set()
    for raw in parse_lines(lines):
        kinds.add("chat" if "messages" in raw else "completion")
        examples.append(tokenization.truncate(tokenization.encode(raw)))
        prompts.append(user_prompt(raw))
    dataset = Dataset(examples, format=next(iter(kinds)) if len(kinds) == 1 else "chat", prompts=prompts)
    dataset.truncated = sum(1 for e in examples if e.truncated)
    dataset.no_labels = sum(1 for e in examples if e.n_labels == 0)
    return dataset


def token_counter(tokenization: Tokenization) -> Callable[[dict], int]:
    """`count_tokens(example_dict) -> int` for `core.training_files.validate_jsonl`."""
    return tokenization.count_tokens


def bucketed_batches(lengths: list[int], batch_size: int, *, seed: int, epoch: int) -> list[list[int]]:
    """Indexes of one epoch's batches: shuffled, then sorted by length inside mega-batches, batch order shuffled.

    Examples of similar length share a batch, so little compute goes to padding, while the order still changes
    every epoch. The same (seed, epoch) always gives the same batches, which resuming relies on.

    Args:
        lengths: token count of each example.
        batch_size: examples per batch (the last batch may be smaller).
        seed: the job's seed.
        epoch: 0-based epoch number.

    Returns:
        A list of batches, each a list of example indexes.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = batch_size * MEGA_BATCH
    batches: list[list[int]] = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def padding_share(lengths: list[int], batches: list[list[int]]) -> float:
    """Share of padded positions when each batch is padded to its longest example."""
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
    return 1.0 - sum(lengths) / padded if padded else 0.0
