"""What one training run needs: the trainer's input, built from a job by `core.job_spec.JobSpec.train_config`.

A plain dataclass (no torch), so that the job spec in the core can build it and the trainer in the runner can
read it without either importing the other's process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class TrainConfig:
    """Everything one training run needs, with the defaults used when a job leaves a value out."""

    model_path: Path  # folder of the base model (config.json, safetensors, tokenizer)
    output_dir: Path  # scratch folder for adapters and resume state of this run
    base_model_name: str | None = None  # written as `base_model_name_or_path` in adapter_config.json
    n_epochs: int | str = "auto"  # see core.hyperparameters for how "auto" resolves
    batch_size: int | str = "auto"  # effective batch in examples (micro-batches accumulate into it)
    learning_rate_multiplier: float | str = "auto"
    method: str = "supervised"  # supervised | dpo
    beta: float | str = "auto"  # DPO only: strength of the pull towards the reference policy
    base_learning_rate: float = 1e-3  # x multiplier; LoRA on small models learns a 10-example task with it
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    target_modules: list[str] | None = None  # None: every attention and MLP projection
    seed: int = 0
    warmup_ratio: float = 0.03  # share of the steps with linear warm-up (at least one step)
    schedule: str = "linear"  # "linear" or "cosine" decay to 0 after warm-up
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    micro_batch_tokens: int = 2048  # padded tokens per forward pass (memory: ~0.7 MB per token on SmolLM2)
    device: str = "auto"  # auto (cuda when available), cpu, cuda
    dtype: str = (
        "auto"  # base weights: auto (bf16 on CUDA and on CPUs with bf16 units, else fp32), bfloat16, float32
    )
    threads: int = 0  # torch CPU threads; 0 = every core
    qlora: bool = False  # 4-bit base weights (bitsandbytes; CUDA only)
    fused_lora: bool = True  # LoRA layers through runner.batching.fuse_lora (False: peft's own forward)
    eval_interval: int = 0  # steps between validation batches; 0 = about ten times per run
    full_valid_max_examples: int = 256  # cap of the epoch-end validation pass
    init_adapter: Path | None = None  # continued training: a PEFT adapter folder the new adapter starts from
    early_stopping_patience: int = 0  # evaluations without improvement before stopping; 0 = off
    early_stopping_min_delta: float = 0.0  # a validation loss must drop by more than this to count
    resume_state_seconds: float = (
        15.0  # FT_RESUME_STATE_SECONDS; often enough that a worker killed every 30 s progresses
    )

    def __post_init__(self) -> None:
        if self.schedule not in {"linear", "cosine"}:
            raise ValueError(f"`schedule` must be linear or cosine, got {self.schedule!r}")
        if self.lora_rank < 1 or self.lora_alpha <= 0:
            raise ValueError("`lora_rank` must be >= 1 and `lora_alpha` > 0")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout}")
        if self.dtype not in {"auto", "bfloat16", "float32"}:
            raise ValueError(f"`dtype` must be auto, bfloat16 or float32, got {self.dtype!r}")
        if self.method not in {"supervised", "dpo"}:
            raise ValueError(f"`method` must be supervised or dpo, got {self.method!r}")
        if self.early_stopping_patience < 0 or self.early_stopping_min_delta < 0:
            raise ValueError("`early_stopping_patience` and `early_stopping_min_delta` must be >= 0")
        if self.device not in {"auto", "cpu", "cuda"}:
            raise ValueError(f"`device` must be auto, cpu or cuda, got {self.device!r}")
