#!/usr/bin/env bash
# Everything that needs a GPU, in one call, most important first; each stage has its own time limit
# and a failing stage does not stop the rest. Logs and the benchmark markdown go to $RESULTS (default
# ./gpu-results) and, on the device tool, are packed into $OUT after every stage.
#
#   bash scripts/gpu_session.sh prep            # HERE, before the device call: copy the tokenizer into .gpu/tok
#   bash scripts/gpu_session.sh                 # on the GPU: all default stages
#   bash scripts/gpu_session.sh ext newtests    # some of: env ext newtests train pipeline offload context plan
#                                               #   check kernels tests sanitize sweep finetune
#   STAGES_CPU=1 bash scripts/gpu_session.sh smoke   # HERE: the stages' scripts on tiny CPU shapes (a dry run)
#
# Stages (the issue's order of importance):
#   newtests  the GPU tests of the weight pipeline, the flash varlen path and the offload placer (correctness first)
#   train     bench_train, Llama-3.1-8B shapes ($BENCH_LAYERS layers), seq 2048 x batch 2 (and 8192 x 1): ours (kernels on/off) and
#             transformers + PEFT + bitsandbytes (paged AdamW 8-bit, their checkpointing), then ours with the pipeline
#   pipeline  bench_pipeline: one block forward + backward at 2048 and 4096 tokens, bf16 vs NF4 vs NF4 + pipeline
#   offload   bench_pipeline --offload: Llama-2-70B shapes under a 24 GiB cap, against the planner's PCIe prediction
#   context   bench_pipeline --context: the planner's longest Llama-3.1-8B sequence under 24 GiB, run
#   plan      validate_plan --gpu on the configurations not yet run (2,3,6,8,9)
#   check kernels tests sanitize   the kernel table, every GPU test, compute-sanitizer (all four tools)
#   sweep     (not default) bench_train at batch 1 and 4
#
# Expects: python3 with torch (CUDA), transformers, peft, accelerate; bitsandbytes and datasets (with
# dill, multiprocess) either installed or as wheels in .whl/, installed into /tmp/site at the start;
# the SmolLM2 tokenizer files in .gpu/tok (`prep`; the models are generated: random weights, real shapes).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RESULTS=${RESULTS:-$ROOT/gpu-results}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ "${1:-}" = prep ]; then  # on the dev machine: the tokenizer the random models use, from the default model
  PY=${PYTHON:-$ROOT/.venv/bin/python}
  src=$($PY -c 'from qlora_engine.models import default_model; print(default_model.ensure())') || exit 1
  mkdir -p .gpu/tok
  for f in tokenizer.json tokenizer_config.json chat_template.jinja special_tokens_map.json; do
    [ -f "$src/$f" ] && cp "$src/$f" .gpu/tok/
  done
  ls .gpu/tok
  exit 0
fi

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "wheel install failed"
  export PYTHONPATH=/tmp/site:$ROOT
else
  export PYTHONPATH=$ROOT
fi
stages=("${@:-env ext newtests train pipeline offload context plan check kernels tests sanitize}")
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
  summary+=("$(printf '%-16s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - t0))")")
  pack
  return 0
}

want() { [[ " ${stages[*]} " == *" $1 "* ]]; }

if want smoke; then  # the stages' Python on tiny CPU shapes: catches a broken script before device time is spent
  stage smoke-pipeline 300 $PY scripts/bench_pipeline.py --device cpu --steps 1 --warmup 1 --write "$RESULTS/pipeline-smoke.md"
  stage smoke-offload 300 $PY scripts/bench_pipeline.py --device cpu --offload --layers 6 --steps 1 --warmup 1 \
    --write "$RESULTS/offload-smoke.md"
  stage smoke-context 300 $PY scripts/bench_pipeline.py --device cpu --context --cap-gib 1 --steps 1 --warmup 0 \
    --write "$RESULTS/context-smoke.md"
  stage smoke-plan 300 $PY -m qlora_engine plan --model llama-2-70b --gpu 4090 --seq-len 1024 --batch-size 1 \
    --gradient-checkpointing true --offload-base auto
fi

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
want newtests && stage newtests ${NEWTESTS_LIMIT:-180} $PY -m pytest -m gpu -q -p no:cacheprovider \
  tests/quant/test_pipeline.py tests/train/test_attention.py tests/train/test_weights.py

MODEL=${BENCH_MODEL:-/tmp/bench-llama3.1-8b-${BENCH_LAYERS:-8}l}
if want train || want sweep || want finetune; then
  [ -f "$MODEL/config.json" ] || stage model 180 $PY scripts/make_random_model.py --preset llama-3.1-8b \
    --layers "${BENCH_LAYERS:-8}" --tokenizer .gpu/tok --out "$MODEL"
fi
bench_train() {  # bench_train NAME SEQ BATCH PIPELINE SYSTEMS
  stage "$1" ${TRAIN_LIMIT:-300} $PY scripts/bench_train.py --device cuda --model "$MODEL" --seq "$2" --batch "$3" \
    --rank 16 --steps "${BENCH_STEPS:-6}" --warmup 2 --checkpointing --pipeline "$4" --systems "$5" \
    --write "$RESULTS/$1.md"
}
if want train; then
  bench_train train-s2048-b2 2048 2 false ours,ours-nokernels,peft
  bench_train train-s2048-b2-pipe 2048 2 true ours,ours-nokernels
  bench_train train-s8192-b1 8192 1 true ours,peft
fi
if want pipeline; then
  stage pipeline-2048 ${PIPELINE_LIMIT:-240} $PY scripts/bench_pipeline.py --device cuda --preset llama-3.1-8b \
    --tokens 2048 --layers 4 --write "$RESULTS/pipeline-2048.md"
  stage pipeline-4096 ${PIPELINE_LIMIT:-240} $PY scripts/bench_pipeline.py --device cuda --preset llama-3.1-8b \
    --tokens 4096 --layers 4 --write "$RESULTS/pipeline-4096.md"
fi
want offload && stage offload ${OFFLOAD_LIMIT:-420} $PY scripts/bench_pipeline.py --device cuda --offload \
  --preset llama-2-70b --tokens 1024 --cap-gib 24 --steps 2 --warmup 1 --write "$RESULTS/offload-70b.md"
want context && stage context ${CONTEXT_LIMIT:-300} $PY scripts/bench_pipeline.py --device cuda --context \
  --preset llama-3.1-8b --cap-gib 24 --steps 1 --warmup 1 --write "$RESULTS/context-8b.md"
want plan && stage plan ${PLAN_LIMIT:-540} $PY scripts/validate_plan.py --gpu --cases "${PLAN_CASES:-2,3,6,8,9}" \
  --workdir /tmp/plan-ckpts --out "$RESULTS/plan-validation.md"
want check && stage check 300 $PY scripts/bench_kernels.py --check
want kernels && stage kernels 540 $PY scripts/bench_kernels.py ${KERNEL_ARGS:-}
want tests && stage tests 420 $PY -m pytest -m gpu -q -p no:cacheprovider --durations=10
want sanitize && stage sanitize 420 bash scripts/sanitize_kernels.sh ${SANITIZE_TOOLS:-memcheck racecheck synccheck initcheck}
if want sweep; then
  for b in 1 4; do
    bench_train train-s2048-b$b 2048 $b false ours,ours-nokernels,peft
    bench_train train-s2048-b$b-pipe 2048 $b true ours
  done
fi
want finetune && stage finetune ${FINETUNE_LIMIT:-300} $PY scripts/finetune.py --model "$MODEL" --device cuda --max-steps 6 \
  --seq-len 1024 --batch-size 2 --eval-every 3 --save-every 3 --output-dir /tmp/ft-run --sample-max-new-tokens 8

echo; echo "=============== summary"; printf '%s\n' "${summary[@]}"
pack
