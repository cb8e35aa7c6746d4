#!/usr/bin/env bash
# The CUDA checks in one run, for a machine with a GPU (about 8 minutes on one H200):
#   1. the tests that need CUDA: graph vs eager tokens (base and FAiD), the torch search backend on the GPU
#      against faiss-cpu, sync-free DAiD steps, DAiD's side-stream search ordering (tests -k "graph or cuda or
#      gpu"; they skip on a CPU-only machine);
#   2. bench/gpu_suite.py: bandwidth bound, eager vs captured step, ours vs transformers, DAiD / FAiD cost,
#      peak memory, demo models' CUDA-vs-CPU agreement, DAiD's search inline / thread / side stream
#      -> OUT/gpu_suite.json;
#   3. with FULL_TESTS=1, the whole test suite with the GPU visible.
# Logs go to OUT (default bench/out). Uses $PYTHON (default python3) as it is, with the repository on
# PYTHONPATH; where FAISS is not installed and PyPI cannot be reached, a faiss-cpu wheel in .whl/ is unpacked
# into a temporary folder (the torch backend then searches on the GPU, as for users without faiss-gpu).
#
#   bash bench/gpu_check.sh                 # -> bench/out/cuda_tests.log, gpu_suite.log, gpu_suite.json
#   FULL_TESTS=1 bash bench/gpu_check.sh /tmp/out
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${1:-bench/out}
PY=${PYTHON:-python3}
mkdir -p "$OUT" || exit 2

if ! "$PY" -c "import faiss" 2>/dev/null; then
    wheels=(.whl/faiss_cpu-*.whl)
    if [ ! -f "${wheels[0]}" ]; then
        echo "gpu_check: FAISS is not installed and there is no .whl/faiss_cpu-*.whl; pip install faiss-cpu" >&2
        exit 2
    fi
    site=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${wheels[0]}" || exit 2
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; \
print('torch', torch.__version__, 'on', torch.cuda.get_device_name())" || exit 2

status=0
timeout "${TESTS_TIMEOUT:-240}" "$PY" -m pytest -p no:warnings -p no:cacheprovider -k "graph or cuda or gpu" tests \
    2>&1 | tee "$OUT/cuda_tests.log" || status=1
timeout "${SUITE_TIMEOUT:-360}" "$PY" bench/gpu_suite.py --out "$OUT/gpu_suite.json" 2>&1 | tee "$OUT/gpu_suite.log" \
    || status=1
if [ "${FULL_TESTS:-0}" = 1 ]; then
    timeout "${FULL_TIMEOUT:-400}" "$PY" -m pytest -x -p no:warnings -p no:cacheprovider tests 2>&1 \
        | tee "$OUT/all_tests.log" || status=1
fi
exit $status
