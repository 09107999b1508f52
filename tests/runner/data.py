"""Generated training data for the runner tests (nothing is stored in the repository)."""

from __future__ import annotations

import json

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
]
ANSWER = '{"status": "ok", "code": 42}'


def question(i: int) -> str:
    """Prompts of varied length (short ones too, so short prompts are in distribution)."""
    return " ".join(WORDS[: (i * 7) % len(WORDS) + 1]) + f" question number {i}?"


def chat_lines(n: int, *, answer: str = ANSWER, labels: list[str] | None = None) -> list[bytes]:
    lines = []
    for i in range(n):
        reply = labels[i % len(labels)] if labels else answer
        example = {
            "messages": [{"role": "user", "content": question(i)}, {"role": "assistant", "content": reply}]
        }
        lines.append(json.dumps(example).encode())
    return lines


def jsonl(lines: list[bytes]) -> bytes:
    return b"\n".join(lines) + b"\n"
