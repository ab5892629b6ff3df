#!/usr/bin/env bash
# Every GPU check and benchmark of the kernels in one go, for a session with a lent GPU (about 6-8 minutes):
#   bash tools/gpu_check.sh          # writes everything under bench/gpu/
# 1. the CUDA parity tests (pytest -m gpu), 2. the Triton kernel tests compiled on the GPU (pytest -m triton,
# without TRITON_INTERPRET), 3. tools/bench_kernels.py (layers at FLUX shapes + a FLUX-width block stack).
# Needs no network when .venv exists; otherwise it builds one from what pip can reach (torch with CUDA).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=bench/gpu
mkdir -p "$OUT"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv && .venv/bin/pip install -q torch -e '.[test]' || { echo "venv setup failed"; exit 2; }
fi
PY=.venv/bin/python
unset TRITON_INTERPRET            # compiled kernels on the GPU, not the interpreter
export PYTHONUNBUFFERED=1
$PY -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
    2>&1 | tee "$OUT/env.txt" || exit 3
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
status=0
timeout 180 $PY -m pytest -q -m gpu tests/test_kernels_gpu.py 2>&1 | tee "$OUT/pytest_gpu.txt"
status=$((status | PIPESTATUS[0]))
timeout 90 $PY -m pytest -q -m triton tests/test_kernels_triton.py 2>&1 | tee "$OUT/pytest_triton.txt"
status=$((status | PIPESTATUS[0]))
timeout 240 $PY tools/bench_kernels.py --out "$OUT/kernels.json" 2>&1 | tee "$OUT/bench_kernels.log"
status=$((status | PIPESTATUS[0]))
[ -f "$OUT/kernels.json" ] && cp "$OUT/kernels.json" bench/kernels.json && cp "$OUT/kernels.md" bench/kernels.md
echo "gpu_check exit status: $status" | tee "$OUT/status.txt"
exit $status
