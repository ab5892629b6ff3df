#!/usr/bin/env bash
# Every GPU check and benchmark of the kernels in one go, for a session with a lent GPU (at most about 8 minutes):
#   1. the CUDA parity tests (pytest -m gpu tests/test_kernels_gpu.py),
#   2. the Triton kernel tests compiled on the GPU (pytest -m triton tests/test_kernels_triton.py
#      tests/test_kernel_cache.py, no TRITON_INTERPRET),
#   3. tools/bench_kernels.py --out bench/gpu/kernels.json (layers at FLUX shapes + a FLUX-width block stack
#      through dicompress.compress),
#   4. the MoE FFN's Triton grouped GEMM tests compiled on the GPU (pytest -m triton tests/test_kernels_moe.py),
#   5. tools/bench_moe_gpu.py --out bench/gpu/moe.json (the MoE FFN at FLUX width: dense vs torch loop vs grouped
#      GEMM).
# Everything lands in bench/gpu/; when $OUT is set (the device tool) the results are copied there as they come:
# status.txt env.txt kernels.json moe.json pytest_gpu.txt pytest_triton.txt pytest_moe.txt + bench_gpu.tar.gz
# (all of bench/gpu/, the .md tables and the logs too): 8 files, the most a device call brings back.
#
# On the lent nvidia-h200 machine (no network; its python3 has torch 2.11 + triton 3.6 but not diffusers nor
# pydantic). First, here, with network:   bash tools/gpu_wheels.sh      (fills .whl/, about 9 MiB)
# then the device call, run with carry [".whl"] and timeout_s 600:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && bash tools/gpu_check.sh
# (Without the pip step the script installs .whl/*.whl into /tmp/site itself when an import is missing.)
#
# Anywhere else:   bash tools/gpu_check.sh                  (python: $PYTHON, else .venv/bin/python when its torch
#                                                           sees CUDA, else python3; the repo root goes on PYTHONPATH)
# Without a GPU:   GPU_CHECK_DRY=1 bash tools/gpu_check.sh  (no CUDA needed: checks that every import the GPU phases
#   make works in this environment: dicompress, diffusers' FluxTransformer2DModel, pytest --collect-only of both
#   test files, tools/bench_kernels.py as a module, and bench_kernels' model path (synthetic calibration capture,
#   smooth -> ars -> tlq -> act_quant) on a tiny FLUX on the CPU; writes bench/gpu-dry/)
# Phase time limits in seconds (defaults): GPU_CHECK_T_GPU=150 GPU_CHECK_T_TRITON=100 GPU_CHECK_T_BENCH=220
# GPU_CHECK_T_MOE_TEST=60 GPU_CHECK_T_MOE_BENCH=60 (at most 590 s together, under a device call's 600); the
# test phases use GPU_CHECK_WORKERS=8 pytest-xdist workers where xdist imports (0: one process).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=${GPU_CHECK_DRY:-0}
[ "$DRY" = 0 ] && RES=bench/gpu || RES=bench/gpu-dry
DEST=${OUT:-}                     # the device tool's folder for files to bring back (unset elsewhere)
mkdir -p "$RES"
rm -f "$RES"/*.txt "$RES"/*.log "$RES"/kernels.json "$RES"/kernels.md "$RES"/moe.json "$RES"/moe.md
export PYTHONUNBUFFERED=1
case ":${PYTHONPATH:-}:" in *":$ROOT:"*) ;; *) export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" ;; esac

publish() {                       # copy what there is so far to $OUT (also after a phase that timed out)
    [ -n "$DEST" ] || return 0
    mkdir -p "$DEST"
    for f in status.txt env.txt kernels.json moe.json pytest_gpu.txt pytest_triton.txt pytest_moe.txt; do
        [ -f "$RES/$f" ] && cp "$RES/$f" "$DEST/$f"
    done
    tar -czf "$DEST/bench_gpu.tar.gz" -C "$(dirname "$RES")" "$(basename "$RES")" 2>/dev/null
    return 0
}
finish() {
    echo "gpu_check exit status: $1${2:+ ($2)}" | tee "$RES/status.txt"
    publish
    exit "$1"
}

# -- the interpreter ---------------------------------------------------------------------------------------
if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, sys; sys.exit(0 if '$DRY' != '0' or torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    PY=.venv/bin/python
else
    PY=python3
fi
if [ "$DRY" = 0 ]; then
    unset TRITON_INTERPRET        # compiled kernels on the GPU, not the interpreter
fi

# -- phase 0: the environment and every import the phases need --------------------------------------------
imports() {                       # prints one line per missing module; exit status 1 if any
    "$PY" - <<'EOF'
import importlib, sys
need = {"torch": "the python with torch (set PYTHON=...)", "triton": "triton",
        "diffusers": "diffusers", "pydantic": "pydantic", "pydantic_core": "pydantic-core",
        "safetensors": "safetensors", "yaml": "pyyaml", "scipy": "scipy", "tqdm": "tqdm",
        "accelerate": "accelerate", "pytest": "pytest", "pytest_timeout": "pytest-timeout"}
bad = 0
for mod, pkg in need.items():
    try:
        importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001
        bad = 1
        print(f"{mod} not importable ({type(e).__name__}: {e}): run tools/gpu_wheels.sh here and carry .whl "
              f"(package {pkg})", flush=True)
sys.exit(bad)
EOF
}
{
    echo "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0], sys.executable)' 2>&1))"
    echo "PYTHONPATH=$PYTHONPATH"
} | tee "$RES/env.txt"
if ! imports > "$RES/imports.txt" 2>&1; then
    if ls .whl/*.whl >/dev/null 2>&1 && ! grep -q "^torch not importable" "$RES/imports.txt"; then
        SITE=${GPU_CHECK_SITE:-/tmp/site}
        echo "installing .whl/*.whl into $SITE (no index)" | tee -a "$RES/env.txt"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
            2>&1 | tee -a "$RES/env.txt"
        export PYTHONPATH="$SITE:$PYTHONPATH"
    fi
    if ! imports > "$RES/imports.txt" 2>&1; then
        cat "$RES/imports.txt" | tee -a "$RES/env.txt"
        finish 3 "missing: $(cut -d' ' -f1 "$RES/imports.txt" | tr '\n' ' ')- run tools/gpu_wheels.sh here and carry .whl"
    fi
fi
"$PY" - <<'EOF' 2>&1 | tee -a "$RES/env.txt"
import importlib.metadata as md
import torch, triton
print("torch", torch.__version__, "| triton", triton.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
vers = []
for d in ("diffusers", "pydantic", "pydantic_core", "typing_extensions", "transformers", "huggingface_hub",
          "accelerate", "numpy", "safetensors", "scipy", "pytest"):
    try:
        vers.append(f"{d} {md.version(d)}")
    except md.PackageNotFoundError:
        vers.append(f"{d} -")
print(", ".join(vers))
import diffusers, dicompress
print("diffusers from", diffusers.__file__, "| dicompress from", dicompress.__file__)
EOF
[ "${PIPESTATUS[0]}" = 0 ] || finish 3 "importing torch/diffusers/dicompress failed (see above)"

if [ "$DRY" != 0 ]; then
    # -- dry run: everything the GPU phases import, without a GPU ----------------------------------------------
    status=0
    # collection only; the kernel test files then import dicompress.kernels.* and triton as on the GPU
    timeout -k 5 120 "$PY" -m pytest --collect-only -q -p no:cacheprovider -m gpu tests/test_kernels_gpu.py 2>&1 \
        | tee "$RES/pytest_gpu.txt" | tail -3
    status=$((status | PIPESTATUS[0]))
    timeout -k 5 120 "$PY" -m pytest --collect-only -q -p no:cacheprovider -m triton tests/test_kernels_triton.py tests/test_kernel_cache.py 2>&1 \
        | tee "$RES/pytest_triton.txt" | tail -3
    status=$((status | PIPESTATUS[0]))
    timeout -k 5 120 "$PY" -m pytest --collect-only -q -p no:cacheprovider -m triton tests/test_kernels_moe.py 2>&1 \
        | tee "$RES/pytest_moe.txt" | tail -3
    status=$((status | PIPESTATUS[0]))
    # bench_moe_gpu's whole path on the CPU through Triton's interpreter at toy sizes
    timeout -k 5 120 "$PY" tools/bench_moe_gpu.py --smoke --out "$RES/moe.json" > "$RES/bench_moe.log" 2>&1
    rc=$?; status=$((status | rc)); tail -3 "$RES/bench_moe.log"
    timeout -k 5 300 "$PY" - <<'EOF' 2>&1 | tee "$RES/bench_kernels.log"
import importlib.util, tempfile, time
from pathlib import Path
import torch
spec = importlib.util.spec_from_file_location("bench_kernels", "tools/bench_kernels.py")
bk = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bk)                    # bench_kernels' module-level imports
import dicompress.kernels.triton_act, dicompress.kernels.triton_gemm  # bench_layers' imports (triton kernels)
from diffusers import FluxTransformer2DModel   # bench_model's imports and its path, on a tiny FLUX on the CPU
from dicompress.arch import adapter_for
from dicompress.calib import capture
from dicompress.recipe import CalibrationConfig
t = time.perf_counter()
torch.manual_seed(0)
tiny = dict(bk.FLUX_WIDTH, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=64, pooled_projection_dim=32, in_channels=16, axes_dims_rope=(4, 6, 6))
model = FluxTransformer2DModel(**tiny).eval()
cal = CalibrationConfig(source="synthetic", seeds=[0], steps=2, batch_size=1)
with torch.no_grad():
    store = capture(model, adapter_for(model), cal, {"name": "tiny"}, Path(tempfile.mkdtemp(prefix="gpu-dry-")),
                    block_inputs=False, progress=False)
    bk.dicompress.compress(model, bk.W4A8, calibration=store, progress=False)
    side, text, c = 8, 16, model.config    # bench_kernels.flux_inputs' inputs, on the CPU and smaller
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    inputs = {"hidden_states": torch.randn(1, side * side, c.in_channels),
              "encoder_hidden_states": torch.randn(1, text, c.joint_attention_dim),
              "pooled_projections": torch.randn(1, c.pooled_projection_dim), "timestep": torch.full((1,), 0.5),
              "img_ids": ids.view(-1, 3), "txt_ids": torch.zeros(text, 3), "return_dict": False}
    y = model(**inputs)[0]
n_q = sum(type(m).__name__ == "QuantLinear" for m in model.modules())
assert n_q > 0 and torch.isfinite(y).all(), (n_q, y)
print(f"dry run: bench_kernels imports and its model path (capture + {len(bk.W4A8)} passes) ran on a tiny FLUX "
      f"on the CPU: {n_q} QuantLinear, output {tuple(y.shape)}, {time.perf_counter() - t:.1f} s")
EOF
    status=$((status | PIPESTATUS[0]))
    [ "$status" = 0 ] && echo "dry run: every import of the GPU phases works with $PY" | tee -a "$RES/env.txt"
    finish "$status" "dry run"
fi

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" 2>&1 | tee -a "$RES/env.txt"
[ "${PIPESTATUS[0]}" = 0 ] || finish 3 "no CUDA device (GPU_CHECK_DRY=1 checks the imports without one)"
nvidia-smi > "$RES/nvidia-smi.txt" 2>&1
"$PY" -m dicompress.cli kernels 2>&1 | tee -a "$RES/env.txt"   # which path each GPU runs, and why
publish

status=0
T_GPU=${GPU_CHECK_T_GPU:-150}; T_TRITON=${GPU_CHECK_T_TRITON:-100}; T_BENCH=${GPU_CHECK_T_BENCH:-220}
# the test phases are mostly Triton compiles (CPU-bound, one per kernel variant): spread over pytest-xdist
# workers when it is there (the nvidia-h200 image has it; 16 cores). GPU_CHECK_WORKERS=0: one process.
XDIST=()
WORKERS=${GPU_CHECK_WORKERS:-8}
if [ "$WORKERS" != 0 ] && "$PY" -c "import xdist" >/dev/null 2>&1; then
    XDIST=(-n "$WORKERS")
fi
echo "== 1. pytest -m gpu ${XDIST[*]} (limit ${T_GPU}s)"
timeout -k 10 "$T_GPU" "$PY" -m pytest -q -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} -m gpu tests/test_kernels_gpu.py 2>&1 \
    | tee "$RES/pytest_gpu.txt"
rc=${PIPESTATUS[0]}; status=$((status | rc)); [ "$rc" -ge 124 ] && echo "(phase 1 stopped at ${T_GPU}s, rc $rc)"
publish
echo "== 2. pytest -m triton, compiled ${XDIST[*]} (limit ${T_TRITON}s)"
timeout -k 10 "$T_TRITON" "$PY" -m pytest -q -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} -m triton tests/test_kernels_triton.py tests/test_kernel_cache.py 2>&1 \
    | tee "$RES/pytest_triton.txt"
rc=${PIPESTATUS[0]}; status=$((status | rc)); [ "$rc" -ge 124 ] && echo "(phase 2 stopped at ${T_TRITON}s, rc $rc)"
publish
echo "== 3. tools/bench_kernels.py (limit ${T_BENCH}s)"
timeout -k 10 "$T_BENCH" "$PY" tools/bench_kernels.py --out "$RES/kernels.json" 2>&1 | tee "$RES/bench_kernels.log"
rc=${PIPESTATUS[0]}; status=$((status | rc)); [ "$rc" -ge 124 ] && echo "(phase 3 stopped at ${T_BENCH}s, rc $rc)"
[ -f "$RES/kernels.json" ] && cp "$RES/kernels.json" bench/kernels.json && cp "$RES/kernels.md" bench/kernels.md
publish
T_MOE_TEST=${GPU_CHECK_T_MOE_TEST:-60}; T_MOE_BENCH=${GPU_CHECK_T_MOE_BENCH:-60}
echo "== 4. pytest -m triton tests/test_kernels_moe.py, compiled ${XDIST[*]} (limit ${T_MOE_TEST}s)"
timeout -k 10 "$T_MOE_TEST" "$PY" -m pytest -q -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} -m triton tests/test_kernels_moe.py 2>&1 \
    | tee "$RES/pytest_moe.txt"
rc=${PIPESTATUS[0]}; status=$((status | rc)); [ "$rc" -ge 124 ] && echo "(phase 4 stopped at ${T_MOE_TEST}s, rc $rc)"
publish
echo "== 5. tools/bench_moe_gpu.py (limit ${T_MOE_BENCH}s)"
timeout -k 10 "$T_MOE_BENCH" "$PY" tools/bench_moe_gpu.py --repeats 20 --out "$RES/moe.json" 2>&1 | tee "$RES/bench_moe.log"
rc=${PIPESTATUS[0]}; status=$((status | rc)); [ "$rc" -ge 124 ] && echo "(phase 5 stopped at ${T_MOE_BENCH}s, rc $rc)"
finish "$status" "${SECONDS}s"
