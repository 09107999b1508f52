"""DPO throughput: preference pairs per second of the Tuneworks DPO trainer and of TRL's `DPOTrainer`, side by side
on the same pairs, model, LoRA settings and batch (target: Tuneworks >= 1.5x TRL).

SmolLM2-135M (bf16 where the CPU has bf16 units), LoRA r=16 alpha=32 on every projection, beta 0.1, batch 8,
one epoch over `BENCH_DPO_PAIRS` (64) generated pairs of varied length (prompts of 20 to 200 words, answers of
8 to 80). Each trainer runs in a fresh subprocess; its time covers the reference log-probs and every optimizer
step (TRL: `trainer.train()` after its tokenization; ours: `train_dpo` including the model load).
`BENCH_DPO_THREADS` (0 = all cores) pins the threads.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.train_throughput import WORDS

REPO = Path(__file__).resolve().parents[1]
BATCH = 8


def pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(20, 200)))
        good, bad = (" ".join(rng.choices(WORDS, k=rng.randint(8, 80))) for _ in range(2))
        out.append({"input": {"messages": [{"role": "user", "content": prompt}]},
                    "preferred_output": [{"role": "assistant", "content": good}],
                    "non_preferred_output": [{"role": "assistant", "content": bad}]})  # fmt: skip
    return out


def _config(out: Path) -> object:
    from core.settings import SMOLLM2, Settings
    from core.train_config import TrainConfig
    from core.weights import ensure_prepared

    model = ensure_prepared(Settings(), SMOLLM2)
    threads = int(os.environ.get("BENCH_DPO_THREADS", "0"))
    return TrainConfig(model_path=model.path, output_dir=out, method="dpo", n_epochs=1, batch_size=BATCH,
                       threads=threads, seed=0, resume_state_seconds=1e9)  # fmt: skip


def ours(data: list[dict], out: Path) -> float:
    from transformers import AutoTokenizer

    from runner.datasets import Tokenization
    from runner.dpo import train_dpo
    from runner.preference import load_pairs

    config = _config(out)
    tokenization = Tokenization(AutoTokenizer.from_pretrained(config.model_path))  # type: ignore[attr-defined]
    dataset = load_pairs([json.dumps(e).encode() for e in data], tokenization)
    started = time.perf_counter()
    train_dpo(config, dataset)  # type: ignore[arg-type]
    return time.perf_counter() - started


def trl(data: list[dict], out: Path) -> float:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from runner.trainer import _set_threads, load_model

    config = _config(out)
    _set_threads(config.threads)  # type: ignore[attr-defined]
    model = load_model(config, torch.device("cpu"))  # type: ignore[arg-type]  # the same base, dtype and LoRA
    rows = [{"prompt": e["input"]["messages"], "chosen": e["preferred_output"],
             "rejected": e["non_preferred_output"]} for e in data]  # fmt: skip
    args = DPOConfig(output_dir=str(out / "trl"), report_to=[], per_device_train_batch_size=BATCH, num_train_epochs=1,
                     learning_rate=1e-3, beta=0.1, use_cpu=True, bf16=False, max_length=1024, save_strategy="no",
                     logging_steps=10_000, disable_tqdm=True)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(config.model_path)  # type: ignore[attr-defined]
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started


def child(which: str, out: Path) -> None:
    n = int(os.environ.get("BENCH_DPO_PAIRS", "64"))
    with tempfile.TemporaryDirectory() as scratch:
        seconds = (ours if which == "tuneworks" else trl)(pairs(n), Path(scratch))
    out.write_text(json.dumps({"pairs": n, "seconds": seconds}))


def main() -> dict:
    figures: dict = {}
    for which in ("tuneworks", "trl"):
        with tempfile.TemporaryDirectory() as scratch:
            out = Path(scratch) / "result.json"
            subprocess.run([sys.executable, "-m", "bench.dpo_throughput", which, str(out)], cwd=REPO, check=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
            result = json.loads(out.read_text())
        figures[f"{which}_pairs_per_second"] = round(result["pairs"] / result["seconds"], 2)
        figures[f"{which}_seconds"] = round(result["seconds"], 1)
    figures["speedup_vs_trl"] = round(
        figures["tuneworks_pairs_per_second"] / figures["trl_pairs_per_second"], 2
    )
    figures["target_speedup"] = 1.5
    return figures


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    if len(sys.argv) == 3:
        child(sys.argv[1], Path(sys.argv[2]))
    else:
        print(json.dumps(main(), indent=2))
