"""Every Prometheus metric Tuneworks exports, declared together. Documented in README "Metrics".

Labels are bounded: base model, status, route template, endpoint, kind. Never a job id or a request id.
`model` (a fine-tuned model name) appears only on the drift gauges, one series per live fine-tuned model.
Each process (API, worker, serve) exposes the ones it updates on its own `/metrics`.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# --- API ---------------------------------------------------------------------------------------------------
HTTP_REQUESTS = Counter(
    "ft_http_requests_total", "HTTP requests answered by the API.", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "ft_http_request_duration_seconds",
    "Time to answer an HTTP request (for streams: until the headers).",
    ["method", "route"],
    buckets=_LATENCY_BUCKETS,
)
FILES_UPLOADED = Counter(
    "ft_files_uploaded_total", "Files uploaded, by purpose and status.", ["purpose", "status"]
)
UPLOAD_BYTES = Counter("ft_upload_bytes_total", "Bytes received in file uploads.")
HTTP_IN_FLIGHT = Gauge(
    "ft_http_requests_in_flight", "HTTP requests the API is answering right now.", multiprocess_mode="livesum"
)

# --- jobs and queue ----------------------------------------------------------------------------------------
JOBS_CREATED = Counter("ft_jobs_created_total", "Fine-tuning jobs created.", ["base_model"])
JOB_TRANSITIONS = Counter(
    "ft_job_transitions_total", "Job status changes, by the status moved to.", ["base_model", "status"]
)
JOBS_BY_STATUS = Gauge(
    "ft_jobs", "Jobs currently in each status (read from the database at scrape).", ["status"]
)
QUEUE_DEPTH = Gauge("ft_queue_depth", "arq jobs waiting in the Redis queue (read at scrape).")
JOBS_REQUEUED = Counter(
    "ft_jobs_requeued_total", "Jobs the reconciler put back on the queue.", ["reason"]
)  # reason: lost (queued but not in Redis) | lease_expired
_JOB_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)
JOB_QUEUE_WAIT = Histogram(
    "ft_job_queue_wait_seconds",
    "Time a job waited in the queue before a worker started it (since its latest event before the start).",
    ["base_model"],
    buckets=_JOB_BUCKETS,
)
JOB_DURATION = Histogram(
    "ft_job_duration_seconds",
    "Time from a job's creation to its terminal status.",
    ["base_model", "status"],
    buckets=_JOB_BUCKETS,
)  # status: succeeded | failed | cancelled
JOB_FAILURES = Counter("ft_job_failures_total", "Jobs that failed, by error code.", ["base_model", "code"])

# --- training (worker) -------------------------------------------------------------------------------------
TRAIN_STEPS = Counter("ft_training_steps_total", "Optimizer steps completed.", ["base_model"])
TRAIN_TOKENS = Counter("ft_training_tokens_total", "Non-padding tokens trained on.", ["base_model"])
TRAIN_STEP_SECONDS = Histogram(
    "ft_training_step_seconds",
    "Wall time of one optimizer step.",
    ["base_model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
)
TRAIN_LOSS = Gauge("ft_training_loss", "Train loss of the latest step on this worker.", ["base_model"])
TRAIN_TOKENS_PER_SECOND = Gauge(
    "ft_training_tokens_per_second", "Non-padding tokens per second of the latest step.", ["base_model"]
)
TRAIN_RUNS = Counter(
    "ft_training_runs_total", "Training attempts that ended, by outcome.", ["base_model", "outcome"]
)  # outcome: succeeded | failed | cancelled | paused | crashed
CHECKPOINTS_WRITTEN = Counter(
    "ft_checkpoints_written_total", "Checkpoints saved by training.", ["base_model"]
)
WORKER_HEARTBEATS = Counter(
    "ft_worker_heartbeats_total",
    "Lease renewals of jobs training on this worker (one every lease/3 seconds).",
)
WORKERS_BUSY = Gauge("ft_workers_busy", "Jobs training now on this worker.")

# --- serving (serve process and gateway) -------------------------------------------------------------------
ADAPTER_LOADS = Counter(
    "ft_adapter_loads_total", "Adapter loads into vLLM, by result.", ["base_model", "trigger", "result"]
)  # trigger: ready | sweep | on_demand | restart ; result: ok | error
ADAPTER_LOAD_SECONDS = Histogram(
    "ft_adapter_load_seconds", "Time to load an adapter into vLLM.", ["base_model"], buckets=_LATENCY_BUCKETS
)
ADAPTERS_LOADED = Gauge("ft_adapters_loaded", "Adapters loaded in each vLLM server.", ["base_model"])
VLLM_UP = Gauge("ft_vllm_up", "1 when the vLLM server of a base model answers /health.", ["base_model"])
VLLM_RESTARTS = Counter("ft_vllm_restarts_total", "vLLM server restarts after a crash.", ["base_model"])

INFERENCE_REQUESTS = Counter(
    "ft_inference_requests_total",
    "Completion requests through the gateway.",
    ["base_model", "kind", "endpoint", "status"],
)  # kind: base | adapter ; endpoint: chat | completions
INFERENCE_TTFT = Histogram(
    "ft_inference_time_to_first_token_seconds",
    "Gateway time to first streamed token.",
    ["base_model", "kind", "endpoint"],
    buckets=_LATENCY_BUCKETS,
)
INFERENCE_LATENCY = Histogram(
    "ft_inference_request_duration_seconds",
    "Gateway time for a whole completion request.",
    ["base_model", "kind", "endpoint"],
    buckets=_LATENCY_BUCKETS,
)
INFERENCE_TOKENS = Counter(
    "ft_inference_tokens_total", "Tokens in and out of completions.", ["base_model", "kind", "direction"]
)  # direction: prompt | completion
INFERENCE_OUTPUT_TPS = Histogram(
    "ft_inference_output_tokens_per_second",
    "Completion tokens per second of a whole gateway request (from the start of the request).",
    ["base_model", "kind", "endpoint"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)

# --- drift of live traffic against the training data -------------------------------------------------------
DRIFT_SCORE = Gauge(
    "ft_drift_score",
    "Jensen-Shannon divergence (base 2, 0..1) between recent prompts and the model's training prompts.",
    ["model"],
    multiprocess_mode="livemostrecent",
)
DRIFT_OOD_RATIO = Gauge(
    "ft_drift_out_of_distribution_ratio",
    "Share of recent prompts whose length or vocabulary lies outside the training data's range.",
    ["model"],
    multiprocess_mode="livemostrecent",
)
DRIFT_WINDOW = Gauge(
    "ft_drift_window_prompts", "Prompts in the drift window.", ["model"], multiprocess_mode="livemostrecent"
)
