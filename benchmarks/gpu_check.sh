#!/usr/bin/env bash
# The GPU checks in one run, for a machine with CUDA and a CUDA build of torch (plus
# safetensors, numpy, huggingface_hub, pytest, hypothesis) but no install of ladle:
#   bash benchmarks/gpu_check.sh [LOG_DIR] [benchmarks/gpu.py options]
# (PYTHON=/path/to/python to use another interpreter than python3).
# Runs tests/test_gpu.py (every method on CUDA against the CPU), then benchmarks/gpu.py (the
# bf16 soup against the pinned host-to-device bandwidth); both logs go to LOG_DIR.
set -uo pipefail
logs=$(realpath -m "${1:-/tmp/ladle-gpu-check}")  # relative to where it is run from
shift || true
cd "$(dirname "$0")/.."
mkdir -p "$logs"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
"$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" \
  2>&1 | tee "$logs/device.log"
"$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$logs/tests.log"
tests=${PIPESTATUS[0]}
"$py" benchmarks/gpu.py "$@" 2>&1 | tee "$logs/benchmark.log"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, benchmark exit $bench"
exit $((tests || bench))
