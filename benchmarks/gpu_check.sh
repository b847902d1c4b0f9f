#!/usr/bin/env bash
# The GPU checks of this project in one run of under 8 minutes, for a machine with a CUDA GPU, torch,
# transformers and pytest (captum too: tests/test_attribution.py imports it; pip install it or its wheel first):
#   1. python -m pytest -k cuda: CUDA gives the CPU's numbers, fast and reference paths, every architecture;
#   2. benchmarks/bench_batch_sizes.py --device cuda: real-shaped GPT-2-small and Mamba-130M, CUDA == CPU
#      agreement of their scores, then prompts/s at 8 to 256 prompts a batch and the hours for ParaRel's
#      253,448 prompts at each rate.
# Everything printed is also written under $OUT (default: gpu_check/), with the GPU's name and the versions;
# $OUT/figures.md is the table for the README's measured figures (date, GPU, versions in its first line) and
# $OUT/figures.json the same numbers.
#
#     bash benchmarks/gpu_check.sh            # on the GPU machine
#     bash benchmarks/gpu_check.sh --dry      # the same plumbing on the CPU with tiny shapes (about a minute)
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
out=${OUT:-gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
if [ "${1:-}" = "--dry" ]; then
    bench=(--device cpu --shape tiny --batches 2 4 --repeats 1 --agree 1)
    "$python" -c "import torch, transformers; print('dry run on the CPU; torch', torch.__version__, 'transformers', \
transformers.__version__)" 2>&1 | tee "$out/gpu.txt"
else
    bench=(--device cuda --shape real --batches 8 16 32 64 128 256 --repeats 2 --agree 2)
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
        "$python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', \
transformers.__version__)"
    } 2>&1 | tee "$out/gpu.txt"
fi
timeout 150 "$python" -m pytest -q -p no:cacheprovider -k cuda tests/test_attribution.py 2>&1 | tee "$out/pytest_cuda.txt"
tests=$?
timeout 330 "$python" benchmarks/bench_batch_sizes.py "${bench[@]}" --out "$out/figures.md" 2>&1 \
    | tee "$out/bench_batch_sizes.txt"
measured=$?
echo "pytest exit $tests, benchmark exit $measured" | tee -a "$out/gpu.txt"
[ "$tests" -eq 0 ] && [ "$measured" -eq 0 ]
