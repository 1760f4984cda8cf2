# syntax=docker/dockerfile:1
# The lorafleet API and dashboard (`lorafleet serve`): the producer side only, no torch.
# Flower is installed beside it, so the same image runs Celery's monitor.
#
# Build from the repository root:
#   docker build -f deploy/docker/api.Dockerfile -t lorafleet-api .
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LORAFLEET_HOME=/data/home \
    LORAFLEET_API_HOST=0.0.0.0 \
    LORAFLEET_API_PORT=8750

WORKDIR /src
COPY pyproject.toml README.md ./
COPY common/ common/
COPY producer/ producer/
COPY worker/ worker/
RUN pip install . "flower>=2" && rm -rf /src

# Not root. The API reads models/ (their configs) and autoimport/lora/ to validate jobs:
# mount the same library as the workers at LORAFLEET_HOME.
RUN groupadd --gid 10001 lorafleet \
 && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin lorafleet \
 && mkdir -p /data/home/models /data/home/autoimport/lora \
 && chown -R 10001:10001 /data
USER 10001:10001
WORKDIR /data/home

EXPOSE 8750

# /healthz needs no token and answers when Redis is reachable. python:slim has no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8750/healthz', timeout=4)"]

# serve refuses to listen beyond 127.0.0.1 without tokens: set LORAFLEET_API_TOKENS.
CMD ["lorafleet", "serve"]
