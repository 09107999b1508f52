"""Training throughput of the Tuneworks trainer, on the setup of the platform notes' baselines.

SmolLM2-135M bf16, LoRA r=16 alpha=32 on every projection, lr 2e-4, batch 8, all cores, 256 generated chat
examples of varied length (about 50 to 550 tokens, a quarter of them assistant tokens). Reports real
(non-padding) tokens per second, the padding share and the peak RSS. Compare with the table in
PLATFORM_NOTES.md ("a plain loop ... 430 real tokens/s; with tcmalloc 595").

`BENCH_TRAIN_EXAMPLES` (256) and `BENCH_TRAIN_THREADS` (0 = all cores) shorten or pin a run.
Each configuration runs in a fresh subprocess (peak RSS is per process); `BENCH_TCMALLOC=0` skips the run with
Debian's tcmalloc preloaded.
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
_TEXT = (
    "the service returns an error when the request body is larger than the configured limit and the "
    "client retries with backoff until the queue drains while operators watch latency dashboards"
)
WORDS = _TEXT.split(" ")


def examples(n: int = 256, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        user = " ".join(rng.choices(WORDS, k=rng.randint(20, 330)))
        answer = " ".join(rng.choices(WORDS, k=rng.randint(8, 110)))
        out.append(
            {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
        )
    return out


def child(out: Path) -> None:
    """One measured run (in its own process)."""
    from transformers import AutoTokenizer

    from core.settings import SMOLLM2, Settings
    from core.train_config import TrainConfig
    from core.weights import ensure_prepared
    from runner.datasets import Tokenization, bucketed_batches, load_dataset, padding_share
    from runner.trainer import TrainCallbacks, train

    model = ensure_prepared(Settings(), SMOLLM2)
    tokenization = Tokenization(AutoTokenizer.from_pretrained(model.path), max_seq_len=1024)
    lines = [json.dumps(e).encode() for e in examples(int(os.environ.get("BENCH_TRAIN_EXAMPLES", "256")))]
    dataset = load_dataset(lines, tokenization)
    lengths = [len(e) for e in dataset.examples]
    steps: list[tuple[float, int]] = []

    class Clock(TrainCallbacks):
        def on_step(self, step: int, total_steps: int, metrics: dict) -> None:
            steps.append((time.perf_counter(), int(metrics.get("tokens", 0))))

    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(
            model_path=model.path,
            output_dir=Path(tmp),
            n_epochs=1,
            batch_size=8,
            learning_rate_multiplier=0.2,
            lora_rank=16,
            lora_alpha=32,
            seed=0,
            threads=int(os.environ.get("BENCH_TRAIN_THREADS", "0")),
        )
        start = time.perf_counter()
        train(config, dataset, callbacks=Clock())
    # Skip the first two steps (allocator and kernel warm-up) in the steady-state figure.
    (t0, _), (t1, _) = steps[1], steps[-1]
    steady_tokens = sum(tokens for _, tokens in steps[2:])
    batches = bucketed_batches(lengths, 8, seed=0, epoch=0)
    out.write_text(
        json.dumps(
            {
                "steps": len(steps),
                "examples": len(lengths),
                "tokens_min_median_max": [min(lengths), sorted(lengths)[len(lengths) // 2], max(lengths)],
                "padding_share": round(padding_share(lengths, batches), 3),
                "real_tokens_per_second": round(steady_tokens / (t1 - t0), 1),
                "wall_seconds": round(time.perf_counter() - start, 1),
                "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
            }
        )
    )


def _measure(preload: str | None) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        if preload:
            env["LD_PRELOAD"] = preload
        subprocess.run([sys.executable, __file__, "--child", out.name], env=env, check=True, cwd=REPO)
        return json.loads(Path(out.name).read_text())


def main() -> dict:
    result = {"glibc_malloc": _measure(None)}
    if os.environ.get("BENCH_TCMALLOC", "1") != "0" and Path(TCMALLOC).exists():
        result["tcmalloc"] = _measure(TCMALLOC)
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.path.insert(0, str(REPO))
        child(Path(sys.argv[2]))
    else:
        print(json.dumps(main(), indent=2))
