#!/usr/bin/env bash
# The GPU benchmarks of docs/benchmarks.md in one go, from the repository root on a CUDA machine:
#   RES=docs/results PYTHON=python3 bash tools/gpu_bench.sh
# 1. batched regeneration against diffusers' per-image img2img pipeline, full-size SD-Turbo and SDXL-Turbo
#    architectures (random weights) at 512 px in float16, 1/2/4 denoiser steps, micro-batches 8-64, with a
#    ResNet-18 student at 224 px for the regeneration : training ratio;
# 2. LD3M step time and peak GPU memory against T: the default prior at IPC 10 (the tables' setting) and the
#    full-size SD-Turbo architecture at 256 px (LD3M's own resolution class), IPC 1.
# Each command writes a JSON to $RES; a failed one is logged and the rest still run.
set -uo pipefail
RES=${RES:-docs/results}
PY=${PYTHON:-python}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
"$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
status=0
run() { echo "+ $*"; "$@" || { echo "FAILED ($?): $*"; status=1; }; }
for prior in sd-turbo sdxl-turbo; do
  for steps in 1 2 4; do
    run "$PY" tools/bench_regen.py --generator "builtin:random-$prior" --device cuda --dtype float16 --latent-size 64 \
      --items 64 --steps "$steps" --strength 1.0 --guidance 1 --micro-batch 8 16 32 64 --repeats 3 \
      --student resnet18 --student-size 224 --json "$RES/bench-regen-gpu-$prior-$steps.json"
  done
done
run "$PY" tools/bench_ld3m.py --generator builtin:default --device cuda --ipc 10 --steps 5 10 20 40 --loss dm \
  --batch-real 64 --iterations 1 --json "$RES/bench-ld3m-gpu-default.json"
run "$PY" tools/bench_ld3m.py --generator builtin:default --device cuda --ipc 10 --steps 10 --loss dc \
  --batch-real 64 --iterations 2 --json "$RES/bench-ld3m-gpu-default-dc.json"
run "$PY" tools/bench_ld3m.py --generator builtin:random-sd-turbo --device cuda --image-size 256 --ipc 1 \
  --steps 2 5 10 20 --loss dm --batch-real 64 --iterations 1 --micro-batch 10 --json "$RES/bench-ld3m-gpu-sd-turbo.json"
# batched against naive images, micro-batch 1 and 16, in float16 and float32
for dtype in float16 float32; do
  run "$PY" tools/bench_regen.py --generator builtin:random-sd-turbo --device cuda --dtype "$dtype" --latent-size 64 \
    --items 16 --steps 1 --strength 1.0 --guidance 1 --micro-batch 1 16 --repeats 1 \
    --json "$RES/bench-regen-gpu-sd-turbo-1-match-$dtype.json"
done
# float16 images of both sides against diffusers' pipeline in float32
for prior in sd-turbo sdxl-turbo; do
  run "$PY" tools/bench_regen.py --generator "builtin:random-$prior" --device cuda --dtype float16 --latent-size 64 \
    --items 8 --steps 1 --strength 1.0 --guidance 1 --micro-batch 1 8 --repeats 1 --reference-dtype float32 \
    --json "$RES/bench-regen-gpu-$prior-1-vs-float32.json"
done
exit $status
