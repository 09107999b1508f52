"""Real LoRA adapters on SmolLM2 for the serving tests, trained in-process with the runner's trainer (no worker).

Each adapter learns to answer every prompt with one fixed JSON string (18 steps at lr 1e-3 are enough). They are
cached under `.tuneworks/test-adapters/<VERSION>/<name>/` in PEFT format, so only the first session trains.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("FT_TEST_ADAPTERS_DIR", REPO / ".tuneworks" / "test-adapters"))
VERSION = "v2-smollm2-r8-18steps-runner"

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


def _train(base_path: Path, answer: str, out: Path, *, seed: int) -> None:
    """Train with our own trainer (fp32 on CPUs without bf16 units, LM head only at label positions):
    12 questions x 6 epochs at batch 4 = 18 steps, about a minute on one core."""
    from transformers import AutoTokenizer

    from core.settings import SMOLLM2
    from core.train_config import TrainConfig
    from runner.datasets import Tokenization, load_dataset
    from runner.trainer import train

    lines = [
        json.dumps(
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]}
        ).encode()
        for q in _QUESTIONS
    ]
    data = load_dataset(lines, Tokenization(AutoTokenizer.from_pretrained(base_path)))
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(
            model_path=base_path, output_dir=Path(tmp), base_model_name=SMOLLM2, n_epochs=6, batch_size=4,
            learning_rate_multiplier=1.0, lora_rank=8, lora_alpha=16, lora_dropout=0.0, threads=1, seed=seed,
        )  # fmt: skip
        result = train(config, data)
        assert result.adapter_dir is not None
        shutil.copytree(result.adapter_dir, out, dirs_exist_ok=True)
