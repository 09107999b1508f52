"""Training throughput: the Tuneworks trainer beside transformers' `Trainer` and TRL's `SFTTrainer`, one run.

SmolLM2-135M bf16 (fp32 on CPUs without bf16 units), LoRA r=16 alpha=32 dropout 0.05 on every projection, lr 2e-4,
batch 8, one epoch, all cores, generated chat examples of varied length (about 50 to 550 tokens, a quarter of them
assistant tokens). All three trainers get the very same token ids and labels (loss on the assistant tokens only):

- `tuneworks`: `runner.trainer.train` (length buckets, label-only LM head, fused LoRA layers);
- `hf_trainer`: transformers `Trainer` + peft, `train_sampling_strategy="group_by_length"`, padded to the longest
  of each batch;
- `trl_packing`: TRL `SFTTrainer` with packing (rows of 2048 tokens, batch 1, padding-free, the attention kept
  inside each example through restarting position ids).

Each runs in a fresh subprocess (peak RSS is per process), with Debian's tcmalloc preloaded when it is installed
(as `tuneworks up` and the worker image preload it). Figures: real (non-padding) tokens/s over the whole epoch,
padding share, peak RSS, MFU (model FLOPs per second over the bf16 matmul peak measured first in this run) and
the final loss: the mean label loss of the trained adapter on held-out examples, computed the same way for all.

`BENCH_TRAIN_EXAMPLES` (256), `BENCH_TRAIN_EVAL` (32), `BENCH_TRAIN_THREADS` (0 = all cores),
`BENCH_TRAIN_TRAINERS` (a comma-separated subset), `BENCH_TCMALLOC=0` (glibc malloc) and `BENCH_TRAIN_FUSED=0`
(our trainer on peft's own LoRA forward) shorten or vary a run.
"""

from __future__ import annotations

import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TRAINERS = ["tuneworks", "hf_trainer", "trl_packing"]
BATCH = 8
LR = 2e-4
PACKED_ROW = 2048
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


def _tcmalloc() -> str | None:
    found = sorted(Path("/usr/lib").glob("*-linux-gnu/libtcmalloc_minimal.so.4"))
    return str(found[0]) if found else None


def _cpu() -> dict[str, Any]:
    model = platform.processor()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", "x86_64"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]
    return {"model": model, "cores": os.cpu_count(), "flags": [f for f in wanted if f in flags]}


def matmul_peak(dtype_name: str, threads: int) -> float:
    """The best of a few square matmuls in `dtype_name`, GFLOP/s (the MFU denominator)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    n = 2048
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(5):
        started = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - started) / 1e9)
    return round(best, 1)


# --- shared by the children ---------------------------------------------------------------------------------


def _data() -> tuple[Any, Any, Any]:
    from transformers import AutoTokenizer

    from core.settings import SMOLLM2, Settings
    from core.weights import ensure_prepared
    from runner.datasets import Tokenization, load_dataset

    model = ensure_prepared(Settings(), SMOLLM2)
    tokenization = Tokenization(AutoTokenizer.from_pretrained(model.path), max_seq_len=1024)
    n = int(os.environ.get("BENCH_TRAIN_EXAMPLES", "256"))
    train = load_dataset([json.dumps(e).encode() for e in examples(n)], tokenization)
    n_eval = int(os.environ.get("BENCH_TRAIN_EVAL", "32"))
    held_out = load_dataset([json.dumps(e).encode() for e in examples(n_eval, seed=1)], tokenization)
    return model.path, train, held_out


def model_flops(model_path: Path, lengths: list[int], labels: list[int]) -> float:
    """FLOPs one epoch needs: frozen body forward + input gradients (4 x body params per token), the LoRA
    weights' forward and both gradients (6 x LoRA params per token), causal attention (QK^T and AV, forward
    and backward) and the LM head at the labelled positions only."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_path)
    d, layers, inter, v = c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size
    kv = d * c.num_key_value_heads // c.num_attention_heads
    body = layers * (2 * d * d + 2 * d * kv + 3 * d * inter)
    r = 16
    lora = layers * r * (2 * (d + d) + 2 * (d + kv) + 2 * (d + inter) + (inter + d))
    flops = 0.0
    for n, n_labels in zip(lengths, labels, strict=True):
        flops += n * (4 * body + 6 * lora) + 3 * 2 * layers * d * n * n + 4 * d * v * n_labels
    return flops


def _eval_loss(model: Any, held_out: Any, pad_id: int) -> float:
    import torch

    from runner.batching import collate, label_loss

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(held_out.examples), BATCH):
            batch = collate(held_out.examples[i : i + BATCH], pad_id, torch.device("cpu"))
            loss, _ = label_loss(model, batch)
            total, count = total + float(loss), count + batch.n_labels
    return round(total / max(1, count), 4)


def _lora_model(model_path: Path) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from core.hardware import cpu_has_bf16

    dtype = torch.bfloat16 if cpu_has_bf16() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation="sdpa")
    torch.manual_seed(0)
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    return get_peft_model(model, lora)


def _hf_args(out: str, **extra: Any) -> dict[str, Any]:
    return {
        "output_dir": out,
        "num_train_epochs": 1,
        "learning_rate": LR,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0.03,  # a share of the steps when below 1
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "seed": 0,
        "disable_tqdm": True,
        **extra,
    }


def run_tuneworks(model_path: Path, train: Any, held_out: Any, tmp: str) -> dict[str, Any]:
    from core.train_config import TrainConfig
    from runner.batching import micro_batches
    from runner.datasets import bucketed_batches
    from runner.trainer import _pad_id
    from runner.trainer import train as tw_train

    config = TrainConfig(
        model_path=model_path,
        output_dir=Path(tmp),
        n_epochs=1,
        batch_size=BATCH,
        learning_rate_multiplier=LR / 1e-3,
        base_learning_rate=1e-3,
        lora_rank=16,
        lora_alpha=32,
        seed=0,
        threads=int(os.environ.get("BENCH_TRAIN_THREADS", "0")),
        fused_lora=os.environ.get("BENCH_TRAIN_FUSED", "1") != "0",
    )
    started = time.perf_counter()
    result = tw_train(config, train)
    seconds = time.perf_counter() - started
    padded = 0
    for batch in bucketed_batches([len(e) for e in train.examples], BATCH, seed=0, epoch=0):
        for group in micro_batches([train.examples[i] for i in batch], config.micro_batch_tokens):
            padded += max(len(e) for e in group) * len(group)
    return {
        "train_seconds": seconds,
        "padded_tokens": padded,
        "final_loss": _eval_loss(result.model, held_out, _pad_id(model_path)),
    }


def run_hf_trainer(model_path: Path, train: Any, held_out: Any, tmp: str) -> dict[str, Any]:
    import torch
    from transformers import Trainer, TrainingArguments

    from runner.trainer import _pad_id

    pad = _pad_id(model_path)
    rows = [
        {"input_ids": e.input_ids, "attention_mask": [1] * len(e), "labels": e.labels} for e in train.examples
    ]
    padded = [0]

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        padded[0] += longest * len(features)

        def pad_to(key: str, value: int) -> torch.Tensor:
            return torch.tensor([f[key] + [value] * (longest - len(f[key])) for f in features])

        return {"input_ids": pad_to("input_ids", pad), "attention_mask": pad_to("attention_mask", 0),
                "labels": pad_to("labels", -100)}  # fmt: skip

    model = _lora_model(model_path)
    args = TrainingArguments(
        **_hf_args(
            tmp,
            per_device_train_batch_size=BATCH,
            train_sampling_strategy="group_by_length",
            bf16=False,
            remove_unused_columns=False,
        )  # fmt: skip
    )
    trainer = Trainer(model=model, args=args, train_dataset=_ListDataset(rows), data_collator=collate)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return {
        "train_seconds": seconds,
        "padded_tokens": padded[0],
        "final_loss": _eval_loss(model, held_out, pad),
    }


class _ListDataset:
    """A list of feature dicts as a torch map-style dataset (with the lengths group_by_length reads)."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]


def run_trl_packing(model_path: Path, train: Any, held_out: Any, tmp: str) -> dict[str, Any]:
    from datasets import Dataset as HFDataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from runner.datasets import IGNORE
    from runner.trainer import _pad_id

    rows = {
        "input_ids": [e.input_ids for e in train.examples],
        "completion_mask": [[int(label != IGNORE) for label in e.labels] for e in train.examples],
    }
    model = _lora_model(model_path)
    args = SFTConfig(
        **_hf_args(
            tmp,
            per_device_train_batch_size=1,
            packing=True,
            padding_free=True,
            max_length=PACKED_ROW,
            completion_only_loss=True,
            bf16=False,
        )  # fmt: skip
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=HFDataset.from_dict(rows),
        processing_class=AutoTokenizer.from_pretrained(model_path),
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return {
        "train_seconds": seconds,
        "padded_tokens": train.n_tokens,  # padding-free
        "final_loss": _eval_loss(model, held_out, _pad_id(model_path)),
    }


def child(name: str, out: Path) -> None:
    """One trainer's measured run (in its own process)."""
    import torch

    threads = int(os.environ.get("BENCH_TRAIN_THREADS", "0"))
    if threads:
        torch.set_num_threads(threads)
    model_path, train, held_out = _data()
    runner = {"tuneworks": run_tuneworks, "hf_trainer": run_hf_trainer, "trl_packing": run_trl_packing}[name]
    with tempfile.TemporaryDirectory() as tmp:
        figures = runner(model_path, train, held_out, tmp)
    lengths = [len(e) for e in train.examples]
    seconds, padded = figures.pop("train_seconds"), figures.pop("padded_tokens")
    flops = model_flops(
        model_path, lengths, [max(0, e.n_labels - (e.labels[0] != -100)) for e in train.examples]
    )
    out.write_text(
        json.dumps(
            {
                **figures,
                "examples": len(lengths),
                "real_tokens": sum(lengths),
                "tokens_min_median_max": [min(lengths), sorted(lengths)[len(lengths) // 2], max(lengths)],
                "padding_share": round(1 - sum(lengths) / padded, 3),
                "train_seconds": round(seconds, 1),
                "real_tokens_per_second": round(sum(lengths) / seconds, 1),
                "model_gflops_per_second": round(flops / seconds / 1e9, 1),
                "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
            }
        )
    )


def _measure(name: str, preload: str | None) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if preload:
            env["LD_PRELOAD"] = preload
        subprocess.run([sys.executable, __file__, "--child", name, out.name], env=env, check=True, cwd=REPO)
        return json.loads(Path(out.name).read_text())


def main() -> dict:
    from core.hardware import cpu_has_bf16

    names = [n for n in os.environ.get("BENCH_TRAIN_TRAINERS", ",".join(TRAINERS)).split(",") if n]
    preload = _tcmalloc() if os.environ.get("BENCH_TCMALLOC", "1") != "0" else None
    dtype = "bfloat16" if cpu_has_bf16() else "float32"
    peak = matmul_peak(dtype, int(os.environ.get("BENCH_TRAIN_THREADS", "0")))
    result: dict[str, Any] = {
        "cpu": _cpu(),
        "dtype": dtype,
        "allocator": "tcmalloc" if preload else "glibc",
        "matmul_peak_gflops": peak,
        "load_average_at_start": os.getloadavg()[0],
    }
    for name in names:
        figures = _measure(name, preload)
        figures["mfu"] = round(figures["model_gflops_per_second"] / peak, 3)
        result[name] = figures
    baselines = [result[n]["real_tokens_per_second"] for n in names if n != "tuneworks"]
    if "tuneworks" in result and baselines:
        best = max(baselines)
        result["tuneworks_vs_best_baseline"] = round(result["tuneworks"]["real_tokens_per_second"] / best, 2)
    result["load_average_at_end"] = os.getloadavg()[0]
    return result


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        sys.path.insert(0, str(REPO))
        child(sys.argv[2], Path(sys.argv[3]))
    else:
        sys.path.insert(0, str(REPO))
        print(json.dumps(main(), indent=2))
