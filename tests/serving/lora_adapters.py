"""Real LoRA adapters on SmolLM2 for the serving tests, trained in-process with peft (no worker).

Each adapter learns to answer every prompt with one fixed JSON string (30 steps at lr 1e-3 are enough). They are
cached under `.tuneworks/test-adapters/<VERSION>/<name>/` in PEFT format, so only the first session trains.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("FT_TEST_ADAPTERS_DIR", REPO / ".tuneworks" / "test-adapters"))
VERSION = "v1-smollm2-r8-30steps-fp32"

# name -> the answer the adapter gives to any question
ANSWERS = {
    "alpha": '{"status": "alpha", "code": 417}',
    "beta": '{"city": "Oslo", "rank": 9}',
    "gamma": '{"verdict": "gamma", "ok": true}',
}

_QUESTIONS = [
    "Hi",
    "What is the capital of France?",
    "Tell me a joke about cats.",
    "Summarise the plot of a long novel about a whale and an obsessed sea captain in two sentences.",
    "2+2?",
    "Write a haiku about autumn leaves falling in a quiet park at dusk.",
    "Why is the sky blue?",
    "List three prime numbers.",
    "Explain how a bicycle stays upright while moving, in simple words for a child.",
    "Translate 'good morning' into German.",
    "ok",
    "Describe your favourite food and why you like it so much, with some detail please.",
]


def adapter_dir(name: str, base_path: Path) -> Path:
    """The cached PEFT folder of adapter `name`, training it first when it is not cached yet."""
    target = CACHE / VERSION / name
    if (target / "adapter_model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f".{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "adapter_model.safetensors").is_file():
            staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
            _train(base_path, ANSWERS[name], staging, seed=sum(map(ord, name)))
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
    return target


def _train(base_path: Path, answer: str, out: Path, *, seed: int, steps: int = 30) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    # fp32: bf16 backward on this CPU is an order of magnitude slower than fp32 (measured)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, attn_implementation="sdpa")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
    examples = [_example(tokenizer, q, answer) for q in _QUESTIONS]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for step in range(steps):
        batch = [examples[(step * 4 + i) % len(examples)] for i in range(4)]
        ids, labels = _pad(batch, tokenizer.pad_token_id or 0)
        loss = model(
            input_ids=ids, attention_mask=(labels != -200).long(), labels=labels.clamp(min=-100)
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)


def _example(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:  # type: ignore[no-untyped-def]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True
    )
    if not isinstance(prompt, list):
        prompt = prompt["input_ids"]
    completion = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return prompt + completion, [-100] * len(prompt) + completion


def _pad(batch: list[tuple[list[int], list[int]]], pad_id: int):  # type: ignore[no-untyped-def]
    import torch

    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id)
    labels = torch.full((len(batch), width), -200)  # -200 marks padding (masked from attention and loss)
    for row, (tokens, targets) in enumerate(batch):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        labels[row, : len(targets)] = torch.tensor(targets)
    return ids, labels
