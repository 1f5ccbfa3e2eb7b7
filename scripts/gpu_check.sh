#!/usr/bin/env bash
# Issue 39's GPU measurement in one call, within 8 minutes on one GPU (docs/gpu.md):
#   1. the CUDA tests (tests/test_cuda.py);
#   2. bench_train.py on the `base` model, synthetic WMT-length batches (20-60 subwords a side,
#      32k vocabulary, 25k tokens), bf16: ours (the trainer's step) and Hugging Face Marian;
#   3. the same for ours under torch.compile (trainer.compile);
#   4. 200 updates of the WMT14 base recipe (configs/experiment/wmt14_en_de_base.yaml) on a
#      synthetic WMT-shaped corpus, through the real trainer;
#   5. bench_decode.py, beam 5 on the GPU: ours (fp32, bf16), HF generate() and CTranslate2's
#      CUDA build where it loads;
# then one table (tokens/s, MFU, memory, sentences/s). Every step has its own timeout, so a
# hang costs that step only; a failed step leaves its row empty and the script goes on.
#
#   bash scripts/gpu_check.sh [OUT_DIR]          # on the GPU machine
#   CPU=1 bash scripts/gpu_check.sh [OUT_DIR]    # every step at tiny sizes on a CPU (tests/test_gpu_paths.py)
#   bash scripts/gpu_check.sh --fetch-wheels     # beforehand, on a machine with PyPI: the wheels to carry
#
# Nothing is installed from the network at run time: the GPU machine reaches no network. Its
# image brings Python 3.12 with a CUDA torch, transformers, sentencepiece, sacrebleu, numpy;
# the rest of what this project imports travels as wheels in $WHEELS (default .whl/, ignored
# through .git/info/exclude and carried with the working tree: the device tool's `carry`),
# installed offline into /tmp/site. A local .venv cannot travel (a CPU torch, 2 GB); to use a
# prepared environment instead, carry it and set PYTHON to its interpreter.
# Env: PYTHON, WHEELS, CPU=1, STEP_TIMEOUT_SCALE (multiplies every timeout), CHECKPOINT (a Multi30k run:
# test2016 decoded at beam 1 and 5 too, MULTI30K_DIR).
set -u
cd "$(dirname "$0")/.."
wheels=${WHEELS:-.whl}
if [ "${1:-}" = "--fetch-wheels" ]; then  # here, not on the GPU machine
  # hydra-core's antlr4 runtime is an sdist only: built into a wheel here
  python3 -m pip wheel -q --no-deps -w "$wheels" antlr4-python3-runtime==4.9.3 &&
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$wheels" "hydra-core>=1.3,<1.4" "omegaconf>=2.3,<2.4" "ctranslate2>=4.0"
  exit $?
fi
out=${1:-runs/gpu_check}
py=${PYTHON:-python3}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="src:scripts:tests:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
scale=${STEP_TIMEOUT_SCALE:-1}
step() {  # step NAME SECONDS COMMAND...: one part, its own time limit and log
  local name=$1 limit=$(($2 * scale)); shift 2
  echo "== $name (at most ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$out/$name.log"
  [ $rc -eq 0 ] || echo "!! $name: exit $rc$([ $rc -eq 124 ] && echo ' (timed out)')"
  echo "$name $rc" >>"$out/status.txt"
}
: >"$out/status.txt"
if [ -d "$wheels" ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl ||
    echo "!! offline install of $wheels failed"
fi

if [ -n "${CPU:-}" ]; then  # the same steps, sized for a CPU (a check of the script, not a measurement)
  device=cpu precision=fp32 model=tiny vocab=500 tokens=512 steps=2 warmup=1 pairs=400 beam=2 limit=8
  recipe=(model.d_model=32 model.n_heads=2 model.n_encoder_layers=1 model.n_decoder_layers=1 model.d_ff=64
    data.vocab_size=300 data.max_tokens=512 trainer.max_steps=3 trainer.log_every=1 trainer.eval_every=3
    trainer.precision=fp32 trainer.compile=false trainer.device=cpu trainer.threads=1 data.encode_workers=1)
  decode_systems=(ours hf)
else
  device=cuda precision=bf16 model=base vocab=32000 tokens=25000 steps=20 warmup=3 pairs=20000 beam=5 limit=300
  recipe=(trainer.max_steps=200 trainer.log_every=25 trainer.eval_every=200 data.tokenizer_sample=20000)
  decode_systems=(ours ours-bf16 hf hf-bf16)
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
  if $py -c 'import ctranslate2, sys; sys.exit(ctranslate2.get_cuda_device_count() == 0)' 2>/dev/null; then
    decode_systems+=(ct2-fp32)
  else
    echo "!! CTranslate2's CUDA build does not load here: decoding runs without it" | tee "$out/ct2.txt"
  fi
fi
$py -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee "$out/torch.txt"

step cuda_tests 75 $py -m pytest tests/test_cuda.py tests/decode/test_decode.py -k "cuda or test_cuda" -q -p no:cacheprovider -rs
bench=(scripts/bench_train.py --synthetic --model $model --vocab $vocab --max-tokens $tokens --precision $precision
  --device $device --steps $steps --warmup $warmup --cache "$out/bench")
step bench_train 85 $py "${bench[@]}" --impl ours hf --json "$out/bench_train.json"
step bench_compiled 85 $py "${bench[@]}" --impl ours --compile --warmup $((warmup + 2)) --json "$out/bench_compiled.json"
step corpus 15 $py -c "from bench_data import write_corpus; write_corpus(__import__('pathlib').Path('$out/corpus'), $pairs, n_eval=$limit)"
data=(data.source=files data.format=text data.cache=false data.valid_max_sentences=$limit
  "data.train_src=$out/corpus/train.en" "data.train_tgt=$out/corpus/train.de"
  "data.valid_src=$out/corpus/valid.en" "data.valid_tgt=$out/corpus/valid.de")
step recipe 120 $py scripts/train.py experiment=wmt14_en_de_base "${data[@]}" "${recipe[@]}" trainer.save_every=0 \
  trainer.average_last=0 trainer.progress=false evaluate_test=false "run_dir=$out/wmt" "hydra.run.dir=$out/wmt"
step bench_decode 95 $py scripts/bench_decode.py --checkpoint "$out/wmt" --device $device --beam $beam \
  --systems "${decode_systems[@]}" --src "$out/corpus/test.en" --ref "$out/corpus/test.de" --limit $limit \
  --max-len 60 --json "$out/bench_decode.json"
if [ -n "${CHECKPOINT:-}" ]; then  # a trained Multi30k checkpoint: test2016 on the GPU, process start and load included
  for beam in 1 5; do
    step "test2016_beam$beam" 60 $py scripts/evaluate.py checkpoint="$CHECKPOINT" data=multi30k split=test \
      device=$device decode.beam_size=$beam output="$out/test.beam$beam.txt"
  done
fi
$py scripts/gpu_table.py "$out"
! grep -qv ' 0$' "$out/status.txt"
