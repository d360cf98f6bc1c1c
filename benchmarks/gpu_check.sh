#!/usr/bin/env bash
# GPU check, one command (< 8 minutes on an H100/H200): training-step time and peak memory of ETHER,
# ETHER+ (n = 1, 4, 32), LoRA r=4 and OFT n=4 on the real SD-1.5 UNet architecture (random weights) at 512 px,
# fp16 and bf16, printed as one table and written to $OUT/gpu_check.md (+ .json, nvidia-smi.txt, the log).
# Record the card and the table in docs/benchmarks.md.
#
#   bash benchmarks/gpu_check.sh
#   GPU_CHECK_ARGS="--device cpu --unet tiny --resolution 32 --steps 2" bash benchmarks/gpu_check.sh   # dry run
#
# Packages: uses the machine's torch as it is. diffusers (and peft, safetensors) are installed only when
# missing: from wheels in .whl/ if there are any (a GPU machine without a registry; fetch them beforehand
# with `python3 -m pip download --no-deps -d .whl diffusers==0.42.1 importlib_metadata`: both pure Python),
# else from PyPI with constraints.txt's pins. Always --no-deps: pip must not swap the machine's torch.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

missing=()
for module in diffusers peft safetensors importlib_metadata; do
    "$PY" -c "import $module" 2>/dev/null || missing+=("${module//_/-}")
done
if (( ${#missing[@]} )); then
    echo "installing: ${missing[*]}"
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-check-site .whl/*.whl
        export PYTHONPATH="/tmp/gpu-check-site:$PYTHONPATH"
    else
        "$PY" -m pip install -q --no-deps -c constraints.txt "${missing[@]}"
    fi
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt" || true
read -r -a step_args <<< "${GPU_CHECK_ARGS:---device cuda --unet sd15 --resolution 512 --dtypes fp16,bf16}"
timeout 420 "$PY" benchmarks/gpu_step.py "${step_args[@]}" --out "$OUT/gpu_check.md" 2>&1 \
    | grep -v "should be kept in float32" | tee "$OUT/gpu_check.log"
