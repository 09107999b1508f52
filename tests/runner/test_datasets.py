from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.datasets import IGNORE, Tokenization, bucketed_batches, load_dataset, padding_share
from tests.runner.data import chat_lines


@pytest.fixture(scope="module")
def tokenizer(models_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models_dir / "tuneworks--tiny-random-llama")


def trained_text(tokenizer, example) -> str:  # type: ignore[no-untyped-def]
    return tokenizer.decode([t for t in example.labels if t != IGNORE])


def test_chat_labels_only_assistant_tokens_with_weight_one(tokenizer) -> None:  # type: ignore[no-untyped-def]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": "IGNORED ANSWER", "weight": 0},
        {"role": "user", "content": "Second question"},
        {"role": "assistant", "content": "KEPT ANSWER"},
    ]
    example = Tokenization(tokenizer).encode({"messages": messages})
    assert trained_text(tokenizer, example) == "KEPT ANSWER<|im_end|>"
    assert len(example.labels) == len(example.input_ids)
    assert example.reference == "KEPT ANSWER"
    assert [m["content"] for m in example.prompt_messages or []][-1] == "Second question"
    full = tokenizer.decode(example.input_ids)
    assert full == tokenizer.apply_chat_template(messages, tokenize=False)


def test_chat_without_system_gets_template_default_and_it_is_masked(tokenizer) -> None:  # type: ignore[no-untyped-def]
    example = Tokenization(tokenizer).encode(
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]}
    )
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(example.input_ids)
    assert trained_text(tokenizer, example) == "Hello there<|im_end|>"


def test_every_assistant_message_is_trained_by_default(tokenizer) -> None:  # type: ignore[no-untyped-def]
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "ONE"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "TWO"},
    ]
    example = Tokenization(tokenizer).encode({"messages": messages})
    assert trained_text(tokenizer, example) == "ONE<|im_end|>TWO<|im_end|>"


def test_prompt_completion_trains_completion_and_eos(tokenizer) -> None:  # type: ignore[no-untyped-def]
    example = Tokenization(tokenizer).encode({"prompt": "The capital of France is", "completion": " Paris"})
    assert trained_text(tokenizer, example) == " Paris" + tokenizer.eos_token
    assert tokenizer.decode(example.input_ids).startswith("The capital of France is")
    assert example.prompt_text == "The capital of France is"


def test_long_examples_are_truncated_and_counted(tokenizer) -> None:  # type: ignore[no-untyped-def]
    long = json.dumps(
        {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "x"}]}
    )
    lines = [long.encode(), *chat_lines(3)]
    dataset = load_dataset(lines, Tokenization(tokenizer, max_seq_len=120))
    assert dataset.truncated == 1
    assert max(len(e) for e in dataset.examples) == 120
    assert dataset.no_labels == 1  # the answer of the long example was cut away
    assert len(dataset.prompts) == 4 and dataset.prompts[1].endswith("question number 0?")


def test_count_tokens_matches_training_length(tokenizer) -> None:  # type: ignore[no-untyped-def]
    tokenization = Tokenization(tokenizer)
    example = json.loads(chat_lines(1)[0])
    assert tokenization.count_tokens(example) == len(tokenization.encode(example).input_ids)


def test_bucketing_reduces_padding_and_is_seeded() -> None:
    import random

    rng = random.Random(1)
    lengths = [rng.randint(20, 600) for _ in range(512)]
    bucketed = bucketed_batches(lengths, 8, seed=3, epoch=0)
    order = list(range(len(lengths)))
    random.Random(3).shuffle(order)
    plain = [order[i : i + 8] for i in range(0, len(order), 8)]
    assert sorted(i for b in bucketed for i in b) == list(range(512))
    assert padding_share(lengths, bucketed) < 0.15 < 0.3 < padding_share(lengths, plain)
    assert bucketed == bucketed_batches(lengths, 8, seed=3, epoch=0)
    assert bucketed != bucketed_batches(lengths, 8, seed=3, epoch=1)


def long_conversation(n: int) -> list[dict]:
    return [{"role": ("user", "assistant")[i % 2], "content": f"message {i}"} for i in range(n)]


def test_a_conversation_of_50000_messages_renders_the_template_once(tokenizer, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    renders = 0
    real = tokenizer.apply_chat_template

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal renders
        renders += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(tokenizer, "apply_chat_template", counting)
    example = Tokenization(tokenizer).encode({"messages": long_conversation(50_000)})
    assert renders == 3  # the conversation once, and twice probes of the template's assistant turn
    trained = tokenizer.decode([t for t in example.labels if t != IGNORE])
    assert trained.count("<|im_end|>") == 25_000 and trained.startswith(
        "message 1<|im_end|>message 3<|im_end|>"
    )
    assert example.reference == "message 49999"


EQUIVALENCE_CASES = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "assistant"},  # text that is also in the template's headers
        {"role": "assistant", "content": "assistant"},
        {"role": "user", "content": "user"},
        {"role": "assistant", "content": "user", "weight": 0},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "assistant"},  # the same answer twice
    ],
    [
        {"role": "developer", "content": "Answer in JSON."},
        {"role": "user", "content": "Ünïcödé? 🙂"},
        {"role": "assistant", "content": '{"status": "ok"}\n'},  # trailing whitespace in the answer
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "  spaced  "},
        {"role": "user", "content": [{"type": "text", "text": "parts"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "answer in parts"}]},
    ],
    [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": ""},  # an empty answer
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "A"},
    ],  # fmt: skip
    long_conversation(40),
    [{"role": "user", "content": "no answer at all"}],
]


@pytest.mark.parametrize("messages", EQUIVALENCE_CASES, ids=range(len(EQUIVALENCE_CASES)))
def test_one_render_gives_the_labels_of_rendering_every_prefix(tokenizer, monkeypatch, messages) -> None:  # type: ignore[no-untyped-def]
    fast = Tokenization(tokenizer).encode({"messages": messages})
    monkeypatch.setattr(Tokenization, "_answer_spans", lambda self, messages, full: None)
    by_prefixes = Tokenization(tokenizer).encode({"messages": messages})
    assert (fast.input_ids, fast.labels) == (by_prefixes.input_ids, by_prefixes.labels)
    assert (fast.prompt_messages, fast.reference) == (by_prefixes.prompt_messages, by_prefixes.reference)


def test_an_answer_that_also_occurs_in_the_end_of_turn_is_trained(tokenizer) -> None:  # type: ignore[no-untyped-def]
    # Found by its position, not by its last occurrence in the rendered text (which for "d" is in `<|im_end|>`).
    for answer in ["d", "e", "end"]:
        messages = [
            {"role": "user", "content": "Pick a, b, c or d"},
            {"role": "assistant", "content": answer},
        ]
        example = Tokenization(tokenizer).encode({"messages": messages})
        assert trained_text(tokenizer, example) == f"{answer}<|im_end|>"
