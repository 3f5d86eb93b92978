#!/usr/bin/env bash
# Everything that needs a GPU, in one call, in priority order; each stage has its own time limit and
# a failing stage does not stop the rest. Logs and the benchmark markdown go to $RESULTS (default
# ./gpu-results) and, on the device tool, are packed into $OUT.
#
#   bash scripts/gpu_session.sh                 # all stages
#   bash scripts/gpu_session.sh ext tests       # some: env ext check kernels tests sanitize train finetune plan
#
# Expects: python3 with torch (CUDA), transformers, peft, accelerate; bitsandbytes and datasets (with
# dill, multiprocess) either installed or as wheels in .whl/, installed into /tmp/site at the start;
# the SmolLM2 tokenizer files in .gpu/tok (the model itself is generated: random weights, real shapes).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RESULTS=${RESULTS:-$ROOT/gpu-results}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "wheel install failed"
  export PYTHONPATH=/tmp/site:$ROOT
else
  export PYTHONPATH=$ROOT
fi
stages=("${@:-env ext check kernels tests sanitize train finetune plan}")
stages=(${stages[@]})
summary=()

pack() {  # after every stage, so that a call cut off at its limit still returns what ran
  printf '%s\n' "${summary[@]}" > "$RESULTS/summary.txt"
  cp benchmarks/kernels-*.md "$RESULTS/" 2>/dev/null
  if [ -n "${OUT:-}" ]; then
    tar -C "$(dirname "$RESULTS")" -czf "$OUT/results.tar.gz" "$(basename "$RESULTS")"
  fi
}

stage() {  # stage NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  echo; echo "=============== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"
  local rc=${PIPESTATUS[0]}
  summary+=("$(printf '%-10s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - t0))")")
  pack
  return 0
}

want() { [[ " ${stages[*]} " == *" $1 "* ]]; }

if want env; then
  stage env 60 bash -c "nvidia-smi; $PY -c 'import torch, transformers, peft, bitsandbytes as b; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), transformers.__version__, peft.__version__, b.__version__)'; nvcc --version | tail -2; compute-sanitizer --version | head -2"
fi
if want ext; then
  # The carried library (built on the dev machine) first; rebuild here for sm_90 when it does not load.
  if ! $PY -c 'from qlora_engine.quant import cuda; import sys; sys.exit(0 if cuda.load() else 1)'; then
    stage build 300 $PY csrc/build.py --arch 90
  fi
  stage ext 120 $PY -m qlora_engine.ext --check
fi
want check && stage check 300 $PY scripts/bench_kernels.py --check
want kernels && stage kernels 540 $PY scripts/bench_kernels.py ${KERNEL_ARGS:-}
want tests && stage tests 420 $PY -m pytest -m gpu -q -p no:cacheprovider -x --durations=10
want sanitize && stage sanitize 420 bash scripts/sanitize_kernels.sh ${SANITIZE_TOOLS:-memcheck racecheck synccheck initcheck}

MODEL=${BENCH_MODEL:-/tmp/bench-llama2-7b-8l}
if want train || want finetune; then
  [ -f "$MODEL/config.json" ] || stage model 120 $PY scripts/make_random_model.py --preset llama-2-7b \
    --layers "${BENCH_LAYERS:-8}" --tokenizer .gpu/tok --out "$MODEL"
fi
want train && stage train ${TRAIN_LIMIT:-540} $PY scripts/bench_train.py --device cuda --model "$MODEL" --seq "${BENCH_SEQ:-2048}" \
  --batch "${BENCH_BATCH:-2}" --rank 16 --steps "${BENCH_STEPS:-10}" --warmup 3 --checkpointing \
  --systems ours,ours-nokernels,peft --write "$RESULTS/train-cuda.md"
want finetune && stage finetune ${FINETUNE_LIMIT:-300} $PY scripts/finetune.py --model "$MODEL" --device cuda --max-steps 6 \
  --seq-len 1024 --batch-size 2 --eval-every 3 --save-every 3 --output-dir /tmp/ft-run --sample-max-new-tokens 8
want plan && stage plan ${PLAN_LIMIT:-540} $PY scripts/validate_plan.py --gpu --cases "${PLAN_CASES:-0,1,4}" --workdir /tmp/plan-ckpts \
  --out "$RESULTS/plan-validation.md"

echo; echo "=============== summary"; printf '%s\n' "${summary[@]}"
pack
