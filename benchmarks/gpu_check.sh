#!/usr/bin/env bash
# The GPU checks of this project in one run of under 9 minutes, for a machine with a CUDA GPU, torch,
# transformers and pytest (captum too: tests/test_attribution.py imports it; pip install it or its wheel first):
#   1. python -m pytest -k cuda: CUDA gives the CPU's numbers, fast and reference paths, every architecture;
#   2. benchmarks/bench_attribution.py --device cuda: real-shaped GPT-2-small and Mamba-130M, one prompt and
#      --batch prompts at once, prompts/s and the hours for 250,000 prompts.
# Everything printed is also written under $OUT (default: gpu_check/), with the GPU's name and the versions.
#
#     bash benchmarks/gpu_check.sh [BATCH]        # BATCH: prompts per attribute_many call (default 64)
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
out=${OUT:-gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$out/gpu.txt"
timeout 150 "$python" -m pytest -q -p no:cacheprovider -k cuda tests/test_attribution.py 2>&1 | tee "$out/pytest_cuda.txt"
tests=$?
timeout 360 "$python" benchmarks/bench_attribution.py --device cuda --lengths 11 --batch "${1:-64}" --repeats 3 \
    --no-eleuther 2>&1 | tee "$out/bench_cuda.txt"
bench=$?
echo "pytest exit $tests, benchmark exit $bench" | tee -a "$out/gpu.txt"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
