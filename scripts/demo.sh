#!/usr/bin/env bash
# The quick start: set up, write the demo phantoms, train both stages, evaluate, sample and measure, timing each step.
# Extra arguments go to both training runs, e.g. `bash scripts/demo.sh --max_epochs 5 --prior_max_epochs 5`;
# `--max_train_seconds 0 --prior_max_train_seconds 0` lifts the time budgets.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
# On shared or busy CPUs, spinning OpenMP threads wait whole time slices for each other (measured 1.8x slower).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
STAGE1="['configs/inference.json','configs/train_vqvae.json']"
STAGES="['configs/inference.json','configs/train_vqvae.json','configs/train_prior.json']"
TIMES=()
step() {  # step NAME COMMAND...: runs the command and records its wall time
    local name=$1 start
    shift
    start=$(date +%s)
    "$@"
    LAST_STEP_S=$(($(date +%s) - start))
    TIMES+=("$(printf '%-34s %5d s' "$name" $LAST_STEP_S)")
    echo ">>> $name: $LAST_STEP_S s"
}
begin=$(date +%s)
step "demo phantoms" $PY scripts/make_phantoms.py
# Training-time budgets keep the demo within 15 minutes on the slowest 2-core machines seen (README, Results of the
# demo): a stage stops before an epoch that would end past its budget. Stage 1 gets at most STAGE1_BUDGET seconds,
# stage 2 what is left of TRAIN_BUDGET after stage 1's step; on the machine of the README's figures neither binds.
TRAIN_BUDGET=710
STAGE1_BUDGET=380
step "stage 1: train VQ-VAE-2" $PY -m monai.bundle run training --config_file "$STAGE1" \
    --max_train_seconds $STAGE1_BUDGET "$@"
step "stage 2: encode codes, train priors" $PY -m monai.bundle run training_prior --config_file "$STAGES" \
    --prior_max_train_seconds $((TRAIN_BUDGET - LAST_STEP_S > 60 ? TRAIN_BUDGET - LAST_STEP_S : 60)) "$@"
step "evaluate reconstruction" $PY -m monai.bundle run evaluating \
    --config_file "['configs/inference.json','configs/evaluate.json']"
step "sample 16 slices" $PY -m monai.bundle run sampling \
    --config_file "['configs/inference.json','configs/sample.json']" --num_samples 16
step "generation metrics" $PY -m monai.bundle run evaluating \
    --config_file "['configs/inference.json','configs/evaluate_generation.json']"
cat <<SUMMARY

Demo finished in $(($(date +%s) - begin)) s:
$(printf '  %s\n' "${TIMES[@]}")
  weights              $(pwd)/models/model.pt (VQ-VAE-2), $(pwd)/models/prior/prior.pt (two-level prior)
  resumable checkpoints $(pwd)/outputs/checkpoints/
  TensorBoard logs     $(pwd)/outputs/tensorboard/   (view: .venv/bin/tensorboard --logdir outputs/tensorboard)
  metrics              $(pwd)/outputs/reconstruction_metrics.json, $(pwd)/outputs/generation_metrics.json
  pictures             $(pwd)/outputs/reconstruction_grid.png, $(pwd)/outputs/samples/samples.png, $(pwd)/outputs/samples_vs_real.png
SUMMARY
$PY scripts/print_results.py outputs
