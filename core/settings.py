"""Settings of every Tuneworks process, read from `FT_*` environment variables.

One class for the whole stack, because the API, the worker and the inference supervisor share most of them
(database, Redis, artifact store, base models). It is built once at each entry point and passed down, so tests
construct their own.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


class Settings(BaseSettings):
    """Every setting, its env var name (`FT_` + upper-case field name) and what it does."""

    model_config = SettingsConfigDict(env_prefix="FT_", extra="ignore")

    home: Path = Field(
        default=Path("~/.tuneworks"),
        description="State folder: SQLite database, artifacts, prepared models, vLLM caches, Redis data.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL. Default: SQLite file FT_HOME/tuneworks.db. PostgreSQL: postgresql+psycopg://...",
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis for the arq queue and pub/sub. `tuneworks up` starts its own when unset; "
        "other commands default to redis://127.0.0.1:6379/0.",
    )
    artifacts_url: str | None = Field(
        default=None,
        description="Artifact store (uploaded files, adapters, checkpoints). Default: file://FT_HOME/artifacts. "
        "Only file:// (a local or shared volume) is implemented.",
    )
    api_host: str = Field(default="127.0.0.1", description="Address the API listens on.")
    api_port: int = Field(default=8000, description="Port the API listens on.")
    api_metrics_port: int = Field(
        default=9100,
        description="Port of the API's Prometheus /metrics (0 = off); not served on the API port.",
    )
    api_workers: int = Field(default=1, description="uvicorn worker processes (use >1 only with PostgreSQL).")
    auth_cache_seconds: float = Field(
        default=2.0,
        description="How long the API trusts a key it has checked; a revoked key stops working within this many "
        "seconds (0 = look every key up on every request).",
    )
    api_threads: int = Field(
        default=40,
        description="Threads of each API process for blocking work (database, validation); its connection pool "
        "is sized to match.",
    )
    public_url: str | None = Field(
        default=None, description="URL clients use to reach the API (printed by `tuneworks up`)."
    )
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, description="Largest file upload accepted.")
    max_request_bytes: int = Field(
        default=8 * 1024 * 1024,
        description="Largest request body other than a file upload (JSON bodies, completions included); "
        "a larger body is a 413, refused while it is read.",
    )
    max_active_jobs_per_project: int = Field(
        default=0,
        description="Fine-tuning jobs of one project that may be unfinished at once; one more is a 429 "
        "(0 = no limit).",
    )
    rate_limit_per_minute: int = Field(
        default=0,
        description="Requests per minute one project may make to /v1 (a token bucket per API process, bursts "
        "up to the same number); beyond it a 429 with retry-after (0 = no limit).",
    )
    queue_name: str = Field(default="tuneworks:queue", description="arq queue name in Redis.")
    base_models: str = Field(
        default=SMOLLM2,
        description="Comma-separated base model ids that can be fine-tuned and are served by `tuneworks serve`.",
    )
    extra_models: str = Field(
        default="{}",
        description='JSON map of extra base models, id -> local folder of HF weights: {"org/name": "/models/x"}.',
    )
    min_examples: int = Field(default=10, description="Fewest examples a training file may have.")
    job_max_attempts: int = Field(
        default=3,
        description="Consecutive interrupted attempts without progress (a worker crash before new resume state "
        "was saved, or a validation that did not finish) a job survives before it fails with "
        "`too_many_attempts`. Attempts that made progress do not count.",
    )
    job_timeout_seconds: int = Field(default=7 * 24 * 3600, description="Longest a training run may take.")
    lease_seconds: int = Field(
        default=30,
        description="A running job whose worker has not renewed its lease for this long is requeued.",
    )
    reconcile_seconds: int = Field(
        default=10, description="How often the worker's reconciler re-enqueues lost jobs and expired leases."
    )
    checkpoints_keep: int = Field(
        default=3, description="Epoch checkpoints kept per job (older ones deleted)."
    )
    resume_state_seconds: float = Field(
        default=15.0,
        description="Resume state (adapter, optimizer, RNG, data position) is saved at least this often; a "
        "crashed worker loses at most this much training. Measured on 2 CPU cores, a save takes about 0.04 s for "
        "the tiny test model (a step: 0.05 s) and 0.4-0.6 s for SmolLM2-135M (59 MB; a step: 1.2-2.5 s).",
    )
    train_threads: int = Field(default=0, description="torch threads for CPU training; 0 = all cores.")
    train_device: str = Field(default="auto", description="auto, cpu or cuda.")
    worker_concurrency: int = Field(default=1, description="Jobs one worker trains at once.")
    worker_metrics_port: int = Field(
        default=9101, description="Port of the worker's Prometheus /metrics (0 = off)."
    )
    serve_metrics_port: int = Field(
        default=9102, description="Port of `tuneworks serve`'s Prometheus /metrics (0 = off)."
    )
    metrics_host: str = Field(
        default="127.0.0.1", description="Address every metrics server (API, worker, serve) binds."
    )
    vllm_host: str = Field(default="127.0.0.1", description="Address the vLLM servers listen on.")
    vllm_api_key: str | None = Field(
        default=None,
        description="Key the vLLM servers require (vLLM's --api-key); the gateway and the serve process send it. "
        "`tuneworks up` generates one into FT_HOME; the Helm chart generates one into its Secret.",
    )
    vllm_base_port: int = Field(
        default=8100, description="Port of the first vLLM server; the next model gets +1."
    )
    vllm_urls: str = Field(
        default="{}",
        description='JSON map base model -> vLLM URL, for servers run elsewhere (Kubernetes): {"org/m": "http://vllm-m:8000"}.',
    )
    vllm_max_loras: int = Field(
        default=4, description="Adapters batched at once per vLLM server (--max-loras)."
    )
    vllm_max_cpu_loras: int = Field(
        default=16, description="Adapters cached in CPU memory (--max-cpu-loras)."
    )
    vllm_max_lora_rank: int = Field(default=64, description="Largest LoRA rank served (--max-lora-rank).")
    vllm_max_model_len: int = Field(default=2048, description="Context length of the vLLM servers.")
    vllm_kv_cache_gib: int = Field(
        default=1, description="KV cache size on the CPU (VLLM_CPU_KVCACHE_SPACE)."
    )
    vllm_gpu_memory_utilization: float = Field(default=0.85, description="GPU memory share for vLLM on CUDA.")
    vllm_dtype: str = Field(
        default="auto",
        description="vLLM --dtype; auto = bfloat16 on GPUs and on CPUs with bf16 units, else float32.",
    )
    vllm_extra_args: str = Field(
        default="", description="Extra vLLM command-line arguments, space-separated."
    )
    vllm_start_timeout: float = Field(
        default=300.0, description="Seconds to wait for a vLLM server to be healthy."
    )
    inference_timeout: float = Field(default=600.0, description="Gateway timeout for one inference request.")
    inference_extra_params: str = Field(
        default="top_k,min_p,repetition_penalty",
        description="Comma-separated vLLM request fields beyond OpenAI's that callers may send (others are a 400).",
    )
    max_prompts_per_request: int = Field(
        default=32, description="Most prompts one /v1/completions request may carry (an array of prompts)."
    )
    on_demand_load_timeout: float = Field(
        default=60.0,
        description="Seconds the gateway waits for the serve process to load an adapter vLLM did not hold "
        "(then a 503 with retry-after; the load goes on).",
    )
    python_graders: bool = Field(
        default=False,
        description="Allow `python` graders (user code, run in a sandboxed process: see the README's Graders "
        "section); off, a python grader is a 400.",
    )
    python_grader_timeout_seconds: float = Field(
        default=30.0, description="Wall-clock limit of one python grader process (one sample or a batch)."
    )
    python_grader_cpu_seconds: int = Field(
        default=20, description="CPU-time limit of one python grader process."
    )
    python_grader_memory_mb: int = Field(
        default=1024, description="Address-space limit (RLIMIT_AS) of one python grader process, in MiB."
    )
    log_level: str = Field(default="INFO", description="Python logging level.")

    @cached_property
    def home_dir(self) -> Path:
        path = self.home.expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home_dir / 'tuneworks.db'}"

    @property
    def resolved_redis_url(self) -> str:
        return self.redis_url or "redis://127.0.0.1:6379/0"

    @property
    def artifacts_dir(self) -> Path:
        url = self.artifacts_url or f"file://{self.home_dir / 'artifacts'}"
        if not url.startswith("file://"):
            raise ValueError(f"`FT_ARTIFACTS_URL` must be a file:// URL, got {url!r}")
        path = Path(url.removeprefix("file://")).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def models_dir(self) -> Path:
        path = self.home_dir / "models"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def base_model_ids(self) -> list[str]:
        ids = [m.strip() for m in self.base_models.split(",") if m.strip()]
        return ids + [m for m in self.extra_model_paths if m not in ids]

    @property
    def extra_model_paths(self) -> dict[str, str]:
        value = json.loads(self.extra_models or "{}")
        if not isinstance(value, dict):
            raise ValueError("`FT_EXTRA_MODELS` must be a JSON object of model id -> path")
        return {str(k): str(v) for k, v in value.items()}

    @property
    def inference_extra_param_names(self) -> frozenset[str]:
        return frozenset(p.strip() for p in self.inference_extra_params.split(",") if p.strip())

    def vllm_headers(self) -> dict[str, str]:
        """The headers every request to a vLLM server carries: its key, when one is set."""
        return {"Authorization": f"Bearer {self.vllm_api_key}"} if self.vllm_api_key else {}

    def vllm_url(self, base_model: str) -> str | None:
        """URL of the vLLM server that serves `base_model`, or None when it is not served."""
        explicit = json.loads(self.vllm_urls or "{}")
        if base_model in explicit:
            return str(explicit[base_model]).rstrip("/")
        served = [m.strip() for m in self.base_models.split(",") if m.strip()]
        if base_model not in served:
            return None
        return f"http://{self.vllm_host}:{self.vllm_base_port + served.index(base_model)}"


def env_table() -> str:
    """The `FT_*` settings as the Markdown table of the README (a test keeps the two equal)."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        if field.default is None:
            default = "(unset)"
        elif field.default == "":
            default = "(empty)"
        else:
            default = f"`{field.default}`"
        lines.append(f"| `FT_{name.upper()}` | {default} | {field.description} |")
    return "\n".join(lines)


def env_help() -> str:
    """The `FT_*` settings as text, for `--help`."""
    lines = ["settings (environment variables):"]
    for name, field in Settings.model_fields.items():
        default = field.default if field.default is not None else "(unset)"
        lines.append(f"  FT_{name.upper():<28} {field.description} [default: {default}]")
    return "\n".join(lines)


if __name__ == "__main__":  # `python -m core.settings`: print the README's settings table
    print(env_table())
