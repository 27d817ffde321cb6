#!/usr/bin/env bash
# Full length-extension flow for a real model on GPUs (docs/LORA_LENGTH_EXTENSION.md):
#   1. radial-lora data prepare   videos + captions -> cached latents at the target length(s)
#   2. radial-lora data validate  shapes, checksums, NaN/Inf
#   3. accelerate launch ... train  LoRA under radial attention (configs/lora_length_extension.json)
#   4. scripts/evaluate_lora_comprehensive.sh  base vs LoRA, dense vs radial, per length
# Every step resumes: rerun the script after an interruption. Settings come from environment variables:
#   VIDEOS=/data/clips MODEL=Wan-AI/Wan2.1-T2V-14B-Diffusers NUM_GPUS=8 scripts/train_lora_length_extension.sh
set -euo pipefail

: "${VIDEOS:?set VIDEOS to a folder of videos with same-named .txt captions (or a CSV/JSONL)}"
MODEL="${MODEL:-Wan-AI/Wan2.1-T2V-14B-Diffusers}"
FAMILY="${FAMILY:-wan}"                              # wan | wan22 | hunyuan
CONFIG="${CONFIG:-configs/lora_length_extension.json}"
RUN_DIR="${RUN_DIR:-runs/length_extension}"
DATA_DIR="${DATA_DIR:-${RUN_DIR}/dataset}"
LENGTHS="${LENGTHS:-161}"                            # training lengths, 4k+1 frames, comma-separated
BASE_FRAMES="${BASE_FRAMES:-81}"                     # what the base model was trained for (HunyuanVideo: 125)
HEIGHT="${HEIGHT:-720}"
WIDTH="${WIDTH:-1280}"
FPS="${FPS:-16}"
NUM_GPUS="${NUM_GPUS:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)}"
ACCELERATE_ARGS="${ACCELERATE_ARGS:-}"                # e.g. "--mixed_precision bf16 --main_process_port 29501"
TRAIN_SET="${TRAIN_SET:-}"                            # extra "--set key=value" overrides, space-separated
SKIP_EVAL="${SKIP_EVAL:-0}"
RADIAL_LORA="${RADIAL_LORA:-radial-lora}"
[ "${NUM_GPUS}" -ge 1 ] 2>/dev/null || NUM_GPUS=1

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

log "1/4 prepare ${VIDEOS} -> ${DATA_DIR} (lengths ${LENGTHS}, ${HEIGHT}x${WIDTH})"
prepare_status=0
"${RADIAL_LORA}" data prepare "${VIDEOS}" --out "${DATA_DIR}" --model "${MODEL}" --family "${FAMILY}" \
    --lengths "${LENGTHS}" --height "${HEIGHT}" --width "${WIDTH}" --fps "${FPS}" || prepare_status=$?
if [ "${prepare_status}" -eq 3 ]; then
    log "some inputs were skipped (listed above); continuing with the rest"
elif [ "${prepare_status}" -ne 0 ]; then
    exit "${prepare_status}"
fi

log "2/4 validate ${DATA_DIR}"
"${RADIAL_LORA}" data validate "${DATA_DIR}"

log "3/4 train on ${NUM_GPUS} GPU(s) with ${CONFIG}"
resume=()
if compgen -G "${RUN_DIR}/lora/checkpoints/step_*/state.json" > /dev/null; then
    resume=(--resume latest)
    log "resuming from the newest checkpoint in ${RUN_DIR}/lora/checkpoints"
fi
overrides=(--set "model.id=${MODEL}" --set "model.family=${FAMILY}" --set "data.path=${DATA_DIR}"
           --set "data.lengths=[${LENGTHS}]" --set "data.base_length=${BASE_FRAMES}"
           --set "resolution.height=${HEIGHT}" --set "resolution.width=${WIDTH}" --set "output_dir=${RUN_DIR}/lora")
for kv in ${TRAIN_SET}; do overrides+=(--set "${kv}"); done
# shellcheck disable=SC2086  # ACCELERATE_ARGS is a list of flags on purpose
accelerate launch --num_processes "${NUM_GPUS}" ${ACCELERATE_ARGS} "$(command -v "${RADIAL_LORA}")" \
    train --config "${CONFIG}" "${overrides[@]}" "${resume[@]}"

if [ "${SKIP_EVAL}" = "1" ]; then
    log "done (evaluation skipped); LoRA in ${RUN_DIR}/lora"
    exit 0
fi
log "4/4 evaluate"
MODEL="${MODEL}" FAMILY="${FAMILY}" LORA="${RUN_DIR}/lora" DATASET="${DATA_DIR}" OUT="${RUN_DIR}/eval" \
    BASE_FRAMES="${BASE_FRAMES}" HEIGHT="${HEIGHT}" WIDTH="${WIDTH}" \
    bash "$(dirname "$0")/evaluate_lora_comprehensive.sh"
log "done: LoRA ${RUN_DIR}/lora, report ${RUN_DIR}/eval/report.md"
