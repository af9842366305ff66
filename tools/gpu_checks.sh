#!/usr/bin/env bash
# The checks that need a real CUDA GPU, in steps that each fit in about ten minutes:
#
#   tools/gpu_checks.sh tests     the GPU test suite on the device (MINIBATCH_GPU_TESTS=device)
#   tools/gpu_checks.sh decode    batch-1 decode against the HBM roofline (benchmarks/decode.py)
#   tools/gpu_checks.sh attention paged decode attention against the HBM roofline (benchmarks/attention.py)
#   tools/gpu_checks.sh quant     decode with float32 against int4 weights (benchmarks/quant_speed.py)
#   tools/gpu_checks.sh serving   the serving systems and decode scaling (benchmarks/serving.py)
#
# With no step, all five in turn. Runs from the checkout, without installing it (the
# machine needs numpy, CuPy, numba-cuda, pytest and hypothesis; transformers and torch
# for decode.py's Hugging Face column, which is skipped without them). Results land in
# benchmarks/results/ (serving's in benchmarks/results/gpu/, so the CPU run's files stay),
# each step's log beside them as gpu_<step>.log; when OUT is set, the step's files are
# copied there too.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
results=benchmarks/results
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests decode attention quant serving)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$python" -c "import cupy, numba; print('cupy', cupy.__version__, '| numba', numba.__version__)" ||
    echo "CuPy or Numba cannot be imported: the GPU steps below will fail" >&2

run_step() {  # name, then the files it writes (copied to $OUT), then -- and the command
    local name=$1 files=() ; shift
    while [ "$1" != "--" ]; do files+=("$1"); shift; done
    shift
    echo "== $name: $*"
    local start=$SECONDS status=0
    "$@" 2>&1 | tee "$results/gpu_$name.log" || status=$?
    echo "== $name: exit $status after $((SECONDS - start)) s"
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT" && cp "$results/gpu_$name.log" "$OUT/"
        for f in "${files[@]}"; do [ -e "$f" ] && cp -r "$f" "$OUT/"; done
    fi
    return $status
}

failed=0
for step in "${steps[@]}"; do
    case $step in
        tests) run_step tests -- env MINIBATCH_GPU_TESTS=device \
                   "$python" -m pytest -o addopts=-ra -p no:cacheprovider -m gpu tests/gpu -q || failed=1 ;;
        decode) run_step decode "$results/decode_gpu.json" -- \
                    "$python" benchmarks/decode.py --backend gpu || failed=1 ;;
        attention) run_step attention "$results/attention_gpu.json" "$results/attention_gpu.png" -- \
                       "$python" benchmarks/attention.py --backend gpu || failed=1 ;;
        quant) run_step quant "$results/quant_speed_gpu.json" "$results/quant_speed_gpu.png" -- \
                   "$python" benchmarks/quant_speed.py --backend gpu || failed=1 ;;
        serving) run_step serving "$results/gpu" -- \
                     "$python" benchmarks/serving.py --backend gpu --out "$results/gpu" || failed=1 ;;
        *) echo "unknown step '$step': choose tests, decode, attention, quant or serving" >&2; exit 2 ;;
    esac
done
exit $failed
