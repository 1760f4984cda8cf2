# syntax=docker/dockerfile:1
# A lorafleet worker: torch from PyTorch's CUDA wheel index, then lorafleet[worker].
#
# Build from the repository root (the context must hold pyproject.toml and the package folders):
#   docker build -f deploy/docker/worker.Dockerfile -t lorafleet-worker .
# A CPU-only image, for a laptop (what deploy/compose.cpu.yaml builds):
#   docker build -f deploy/docker/worker.Dockerfile -t lorafleet-worker:cpu \
#       --build-arg BASE_IMAGE=ubuntu:22.04 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#
# The torch wheels carry their own CUDA libraries; the CUDA base image brings the rest of the
# runtime and tells the NVIDIA container toolkit which driver it needs (12.8: driver 570 or newer,
# or 525+ with CUDA's minor-version compatibility). Keep BASE_IMAGE and TORCH_INDEX_URL on the
# same CUDA version.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu22.04
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/lorafleet/bin:$PATH \
    LORAFLEET_HOME=/data/home

# Ubuntu 22.04's Python is 3.10, the oldest lorafleet supports.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/lorafleet \
 && pip install --upgrade pip

# torch first, in its own layer: it is the big one and changes rarely. lorafleet[worker] then
# finds it installed instead of pulling the default build from PyPI.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch

WORKDIR /src
COPY pyproject.toml README.md ./
COPY common/ common/
COPY producer/ producer/
COPY worker/ worker/
RUN pip install ".[worker]" && rm -rf /src

# Not root. LORAFLEET_HOME holds models/ and autoimport/lora/: mount the model and LoRA library
# there (read-only is fine for a worker).
RUN groupadd --gid 10001 lorafleet \
 && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin lorafleet \
 && mkdir -p /data/home/models /data/home/autoimport/lora \
 && chown -R 10001:10001 /data
USER 10001:10001
WORKDIR /data/home

# Healthy while this container's worker sends heartbeats (every 2 s once it takes jobs; its
# pipelines load first with --preload, hence the long start period).
HEALTHCHECK --interval=30s --timeout=15s --start-period=10m --retries=3 \
    CMD ["lorafleet", "workers", "check"]

# SIGTERM is Celery's warm shutdown: the running job finishes, then the worker exits. Give the
# container as long to stop as the longest job (docker: --stop-timeout; compose: stop_grace_period).
STOPSIGNAL SIGTERM
CMD ["lorafleet", "worker", "--models", "sd15", "--preload"]
