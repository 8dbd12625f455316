#!/usr/bin/env bash
# The GPU check, one command for a CUDA machine (under 8 minutes on one GPU), from the bundle root:
#
#     bash scripts/gpu_check.sh [OUT_DIR]          # default gpu_check_out; relative paths from the bundle root
#     PYTHON=/path/to/python bash scripts/gpu_check.sh
#     GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh  # no GPU needed: print the training commands, check overrides
#
# It runs the tests marked `cuda`, trains both stages for a few epochs with amp "auto", with fp16, in a 1-GPU
# torchrun DDP run and compiled, times inference and naive vs fast sampling, and writes OUT_DIR/gpu_check.json
# (each step's result, the device name and the versions; logs in OUT_DIR/logs). See scripts/gpu_check.py.
# Exit status: 0 all passed, 1 a step failed, 2 no CUDA GPU here.
set -euo pipefail
cd "$(dirname "$0")/.."

# ---- Everything this check assumes about the configs: change it here when they are renamed. ----------------
TRAIN_CONFIGS="configs/inference.json,configs/train_vqvae.json,configs/train_prior.json"   # layered, in order
MULTI_GPU_CONFIG="configs/multi_gpu_train.json"                  # layered on top for the torchrun run
INFERENCE_CONFIG="configs/inference.json"
TRAIN_RUN_ID="training"                                          # both stages
SHORT_RUN="--resume False --max_epochs 3 --prior_max_epochs 2"   # added to every training run
AMP_AUTO="--amp True --amp_dtype auto --compile False"
AMP_FP16="--amp True --amp_dtype float16 --compile False"
COMPILED="--amp True --amp_dtype auto --compile True"
BUDGET_S=450                                                     # steps that no longer fit are recorded as skipped
# -------------------------------------------------------------------------------------------------------------

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT_DIR="${1:-gpu_check_out}"
ARGS=(--out_dir "$OUT_DIR" --python "$PYTHON" --train_configs "$TRAIN_CONFIGS" --multi_gpu_config "$MULTI_GPU_CONFIG"
      --inference_config "$INFERENCE_CONFIG" --run_id "$TRAIN_RUN_ID" --short_run "$SHORT_RUN" --amp_auto "$AMP_AUTO"
      --amp_fp16 "$AMP_FP16" --compiled "$COMPILED" --budget_s "$BUDGET_S")

if [ -n "${GPU_CHECK_DRY_RUN:-}" ]; then
    exec "$PYTHON" scripts/gpu_check.py "${ARGS[@]}" --dry_run
fi
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"; then
    echo "gpu_check: NO CUDA GPU is available to $PYTHON (torch.cuda.is_available() is False, or torch is missing):" \
         "nothing was checked. Run this on a CUDA machine." >&2
    exit 2
fi
exec "$PYTHON" scripts/gpu_check.py "${ARGS[@]}"
