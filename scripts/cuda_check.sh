#!/usr/bin/env bash
# The CUDA checks in one call, for a GPU machine (CI has none): the CUDA tests, test2016
# decoding on the GPU when a checkpoint is given, and the training benchmark on the GPU
# (recipe shapes; the paper's base model in fp32 and bf16, ours against HF Marian; ours in
# base bf16 under torch.compile). Logs and JSON go to OUT_DIR; a failing part does not stop the rest.
#
#   bash scripts/cuda_check.sh [OUT_DIR]      # env: MULTI30K_DIR, CHECKPOINT, PYTHON
set -u
out=${1:-runs/cuda_check}
py=${PYTHON:-python3}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
status=0
step() { echo "== $*"; "$@" || { echo "!! failed: $*"; status=1; }; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
$py -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version())'
step $py -m pytest tests/test_cuda.py tests/test_decode.py -q -p no:cacheprovider -rs
if [ -n "${CHECKPOINT:-}" ]; then
  for beam in 1 5; do
    TIMEFORMAT="beam $beam: %R s wall, process start and model load included"
    time step $py scripts/evaluate.py checkpoint="$CHECKPOINT" data=multi30k split=test device=cuda \
      decode.beam_size=$beam output="$out/test.beam$beam.txt"
  done
fi
step $py scripts/bench_train.py --device cuda --model small --max-tokens 4096 --json "$out/bench_small.json"
step $py scripts/bench_train.py --device cuda --model base --max-tokens 16384 --json "$out/bench_base.json"
step $py scripts/bench_train.py --device cuda --model base --max-tokens 16384 --precision bf16 --impl ours --compile --warmup 10 \
  --json "$out/bench_base_compiled.json"
exit $status
