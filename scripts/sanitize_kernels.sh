#!/usr/bin/env bash
# Run compute-sanitizer (memcheck, racecheck, synccheck, initcheck) over one small call of each
# CUDA kernel path: dequantize (vector, tail, unaligned), GEMV forward/backward (one and two n8
# tiles, split and unsplit backward, generic odd shapes) and the fused kernels. Needs a GPU and
# compute-sanitizer (CUDA toolkit); builds the library for the local GPU when missing or stale.
#
#   scripts/sanitize_kernels.sh              # all four tools
#   scripts/sanitize_kernels.sh memcheck     # one tool
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SAN=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
[ -x "$SAN" ] || { echo "sanitize_kernels: compute-sanitizer not found (set COMPUTE_SANITIZER)"; exit 2; }
$PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
  || { echo "sanitize_kernels: no CUDA device; nothing to check"; exit 0; }

arch=$($PY -c 'import torch; a, b = torch.cuda.get_device_capability(); print(f"{a}{b}")')
$PY - "$arch" <<'PY'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("b", "csrc/build.py"); b = importlib.util.module_from_spec(spec)
spec.loader.exec_module(b)
if b.is_stale(b.DEFAULT_OUT, sys.argv[1]):
    ok, msg = b.build(b.DEFAULT_OUT, archs=(sys.argv[1],)); print(msg); sys.exit(0 if ok else 1)
PY

CASE=$(mktemp --suffix=.py)
trap 'rm -f "$CASE"' EXIT
cat > "$CASE" <<'PY'
import torch
from qlora_engine.quant import cuda, nf4, ops
assert cuda.load(retry=True), cuda.status()["reason"]

def weight(n, k, bs=64):
    p, st = nf4.quantize_4bit(torch.randn(n, k, device="cuda") * 0.05, blocksize=bs)
    return (p, st.absmax, st.code, st.nested_absmax, st.nested_code, st.offset, st.blocksize)

bf = torch.bfloat16
for n, k in ((96, 256), (33, 37), (130, 4096)):       # fast paths; odd (generic) shapes; split backward
    w = weight(n, k)
    cuda.dequantize(*w, [n, k], bf)
    cuda.dequantize(*w, [n, k], torch.float32)
    for m in (1, 12):                                  # one and two n8 tiles
        cuda.matmul(torch.randn(m, k, device="cuda", dtype=bf), *w, n, k, path="gemv")
        cuda.matmul_t(torch.randn(m, n, device="cuda", dtype=bf), *w, n, k, path="gemv")
    for m in (20, 130):                                # fused, partial tiles
        cuda.matmul(torch.randn(m, k, device="cuda", dtype=bf), *w, n, k, path="fused")
        cuda.matmul_t(torch.randn(m, n, device="cuda", dtype=bf), *w, n, k, path="fused")
w = weight(64, 64)
shifted = torch.empty(w[0].numel() + 1, dtype=torch.uint8, device="cuda")[1:]
shifted.copy_(w[0].view(-1))
cuda.dequantize(shifted, *w[1:], [64, 64], bf)        # unaligned: scalar kernel
torch.cuda.synchronize()
print("sanitize case done")
PY

# initcheck would also flag PyTorch's own kernels: restrict it to ours (all in namespace qe) when
# the option exists. The filter syntax is compute-sanitizer's documented "kns=<substring>"; not yet
# tried on a GPU here, so INITCHECK_ARGS overrides it (INITCHECK_ARGS= to check every kernel).
only_ours=()
if [ -n "${INITCHECK_ARGS+x}" ]; then read -r -a only_ours <<< "$INITCHECK_ARGS"
elif "$SAN" --help 2>/dev/null | grep -q -- "--kernel-name"; then only_ours=(--kernel-name kns=qe); fi

tools=("${@:-memcheck racecheck synccheck initcheck}")
status=0
for tool in ${tools[@]}; do
  extra=()
  [ "$tool" = initcheck ] && extra=("${only_ours[@]}")
  echo "== $tool"
  if ! PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} "$SAN" --tool "$tool" --error-exitcode 1 "${extra[@]}" $PY "$CASE"; then
    echo "== $tool: FAILED"; status=1
  fi
done
exit $status
