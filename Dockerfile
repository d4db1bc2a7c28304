# syntax=docker/dockerfile:1.7
# spo-diffusion images, one file, two targets:
#   docker build --target api    -t spo-diffusion-api .     # HTTP API: slim Python, no torch (scale horizontally)
#   docker build --target worker -t spo-diffusion-worker .  # GPU worker: CUDA runtime, torch, diffusers,
#                                                           # onnxruntime-gpu, TensorRT (one pod/container per GPU)
# Volumes: /models (your model folders and manifests), /cache (compiled UNet engines under /cache/engines, hub
# downloads under /cache/huggingface). The committed tiny models are baked in at /app/models, so both images serve
# spo-tiny out of the box (SPO_MANIFEST=/app/models/models.yaml); production sets SPO_MANIFEST to
# /app/deploy/manifests/spo-published.yaml or to a manifest under /models.

# Base images are build arguments so a site can pin a digest or pick its CUDA version; the defaults carry exact tags.
# checkov:skip=CKV_DOCKER_7: the FROM lines use these ARGs, whose defaults are exact version tags (never latest)
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------------------------
# api-build: the package with the `serve` extra only (FastAPI, Redis client, tokenizer), in a venv we copy out.
FROM ${PYTHON_IMAGE} AS api-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY training ./training
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install ".[serve]"

# ---------------------------------------------------------------------------------------------------------------
# api: no compiler, no torch; runs as an unprivileged user.
FROM ${PYTHON_IMAGE} AS api
LABEL org.opencontainers.image.title="spo-diffusion-api" \
      org.opencontainers.image.description="spo-diffusion HTTP API (queues jobs in Redis; no torch)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/cache/huggingface \
    SPO_MANIFEST=/app/models/models.yaml
# tini as PID 1: forwards SIGTERM to spo (which drains) and reaps children.
# Not version-pinned (hadolint DL3008): the base image's exact tag pins the distribution release, and the archive
# drops a package's old version at its next security update, so a pinned version would break a rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 spo \
    && useradd --system --uid 10001 --gid spo --home-dir /app --shell /usr/sbin/nologin spo \
    && mkdir -p /models /cache/huggingface \
    && chown -R spo:spo /cache
COPY --from=api-build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=root:root models ./models
COPY --chown=root:root deploy/manifests ./deploy/manifests
USER 10001:10001
VOLUME ["/models", "/cache"]
EXPOSE 8000
# /healthz: the process answers. (/readyz, Redis + a live worker per model, is for monitors: see k8s/spo-diffusion.)
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
ENTRYPOINT ["tini", "--", "spo"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------------------------------------------
# worker-build: CUDA userland + Python; torch from PyPI (its CUDA wheels bring their own CUDA libraries), the
# inference and serving extras, onnxruntime-gpu (instead of the CPU onnxruntime of the `onnx` extra: both install
# the same module) and TensorRT 10 from PyPI (the `tensorrt` extra).
FROM ${CUDA_IMAGE} AS worker-build
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# Not version-pinned (hadolint DL3008): the base image's exact tag pins the distribution release, and the archive
# drops a package's old version at its next security update, so a pinned version would break a rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY training ./training
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install "torch==${TORCH_VERSION}" \
    && /opt/venv/bin/pip install ".[infer,serve,tensorrt]" "onnxruntime-gpu>=1.18"

# ---------------------------------------------------------------------------------------------------------------
# worker: the runtime CUDA image, the venv, the tiny models; engines are built into the /cache volume per GPU type
# (the cache key holds the GPU name, so one volume can serve several GPU types without mixing engines). Other caches
# (torch.compile's Triton kernels) go to /tmp, so the root filesystem can be read-only.
FROM ${CUDA_IMAGE} AS worker
LABEL org.opencontainers.image.title="spo-diffusion-worker" \
      org.opencontainers.image.description="spo-diffusion GPU worker (diffusers + torch | onnxruntime | TensorRT)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive
# Not version-pinned (hadolint DL3008): the base image's exact tag pins the distribution release, and the archive
# drops a package's old version at its next security update, so a pinned version would break a rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 tini \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/cache/huggingface \
    SPO_ENGINE_CACHE=/cache/engines \
    SPO_MANIFEST=/app/models/models.yaml \
    XDG_CACHE_HOME=/tmp/.cache \
    TRITON_CACHE_DIR=/tmp/.triton \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN groupadd --system --gid 10001 spo \
    && useradd --system --uid 10001 --gid spo --home-dir /app --shell /usr/sbin/nologin spo \
    && mkdir -p /models /cache/engines /cache/huggingface \
    && chown -R spo:spo /cache
COPY --from=worker-build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=root:root models ./models
COPY --chown=root:root deploy/manifests ./deploy/manifests
USER 10001:10001
VOLUME ["/models", "/cache"]
EXPOSE 9100
# The metrics port opens only after the model is loaded, warmed up and any engine is built, so this also tells a
# loading worker from a serving one (give engine builds a long start period).
HEALTHCHECK --interval=30s --timeout=5s --start-period=1800s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/metrics', timeout=4)"]
ENTRYPOINT ["tini", "--", "spo"]
# The model comes from SPO_MODELS (first entry) or --model; SIGTERM drains the claimed batch before exiting.
CMD ["worker", "--metrics-port", "9100"]
