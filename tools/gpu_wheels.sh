#!/usr/bin/env bash
# Download into .whl/ the wheels that a lent GPU machine (nvidia-h200, no network) lacks for tools/gpu_check.sh.
# Run HERE, with network, from anywhere in the repo:   bash tools/gpu_wheels.sh
# then make the device call that tools/gpu_check.sh's header gives (carry: [".whl"]).
#
# The device's python3 (3.12, torch 2.11.0+cu130, triton 3.6.0) already has numpy, safetensors, tqdm, pyyaml,
# scipy, scikit-learn, pillow, matplotlib, click, accelerate, transformers, huggingface-hub 1.33, filelock,
# regex, requests, packaging, pytest, pytest-timeout (/work/.library/device/KINDS.md, "Python packages already
# there"). What `import dicompress`, the two kernel test files and tools/bench_kernels.py (FluxTransformer2DModel,
# synthetic calibration capture, dicompress.compress with smooth/ars/tlq/act_quant) need beyond that:
#   diffusers           dicompress/io/diffusers_plugin.py (imported by `import dicompress`), bench_kernels.py
#   pydantic            dicompress/recipe.py, dicompress/passes/*
#     pydantic-core       compiled: the cp312 manylinux wheel
#     annotated-types, typing-inspection
#     typing-extensions   pydantic-core 2.50.5 needs >=4.16.0; the device's version is not recorded, so it
#                         travels (a newer typing_extensions only adds names)
# Not carried: diffusers' importlib_metadata (imported only on Python < 3.8) and its lazy-importer; optimum-quanto,
# bitsandbytes, torch-pruning, sdnq (nothing that gpu_check runs imports them).
# Versions: those of .venv (pip freeze). Idempotent: a wheel already in .whl/ is not fetched again; a wheel of
# another version of one of these packages is removed (two versions stop the install there).
set -euo pipefail
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"

WHEELS=(
    diffusers==0.42.1
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0
)

exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
mkdir -p .whl

PIP=(python3 -m pip)
"${PIP[@]}" --version >/dev/null 2>&1 || PIP=(.venv/bin/pip)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done

for spec in "${WHEELS[@]}"; do
    name=${spec%%==*}; version=${spec##*==}
    dist=$(echo "$name" | tr '-' '_')                  # wheel file names spell the project with underscores
    # the regex tests the version field alone (a suffix match of the file name would take 0.42.11 for 0.42.1)
    if ls .whl 2>/dev/null | grep -qiE "^${dist}-${version//./\\.}-[^-]+(-[^-]+)?-[^-]+-[^-]+\.whl$"; then
        echo "have $spec"
        continue
    fi
    for old in .whl/*.whl; do                          # another version of the same package: drop it
        [ -e "$old" ] || continue
        base=$(basename "$old")
        if [ "$(echo "${base%%-*}" | tr 'A-Z-' 'a-z_')" = "$(echo "$dist" | tr 'A-Z' 'a-z')" ]; then
            echo "removing $base (want $spec)"; rm -f "$old"
        fi
    done
    echo "fetching $spec"
    "${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d .whl "$spec"
done

echo
ls -l .whl/*.whl | awk '{printf "%10d  %s\n", $5, $NF}'
du -cb .whl/*.whl | tail -1 | awk '{printf "total %.1f MiB in .whl/ (the device call carries at most 64 MiB with the tree)\n", $1/1048576}'
