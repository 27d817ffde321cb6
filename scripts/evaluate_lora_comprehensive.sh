#!/usr/bin/env bash
# Compare base vs LoRA, dense vs radial attention, at several video lengths (docs/LORA_LENGTH_EXTENSION.md).
# Writes OUT/report.md, OUT/results.json, plots and every video; rerunning skips finished cells.
#   MODEL=Wan-AI/Wan2.1-T2V-14B-Diffusers LORA=runs/length_extension/lora scripts/evaluate_lora_comprehensive.sh
set -euo pipefail

: "${MODEL:?set MODEL to a diffusers pipeline folder or hub id}"
FAMILY="${FAMILY:-wan}"                      # wan | wan22 | hunyuan
LORA="${LORA:-}"                             # PATH[:SCALE]; empty = base model only
LORA2="${LORA2:-}"                           # optional second LoRA to compare
OUT="${OUT:-runs/eval}"
LENGTHS="${LENGTHS:-1x,2x}"                  # frames (81,161) or multiples of BASE_FRAMES (1x,2x,4x)
BASE_FRAMES="${BASE_FRAMES:-81}"
HEIGHT="${HEIGHT:-720}"
WIDTH="${WIDTH:-1280}"
STEPS="${STEPS:-50}"
GUIDANCE="${GUIDANCE:-5.0}"
SEED="${SEED:-42}"
FPS="${FPS:-16}"
DATASET="${DATASET:-}"                       # prepared dataset for the held-out loss per length
VARIANTS="${VARIANTS:-}"                     # e.g. base_dense,base_radial,lora_radial (default: all)
DENSE_LAYERS="${DENSE_LAYERS:-}"             # default: the LoRA's training metadata, else 0
DENSE_TIMESTEPS="${DENSE_TIMESTEPS:-}"       # e.g. 12 of 50 steps dense, as the paper's inference setting
PROMPTS="${PROMPTS:-}"                       # file, one prompt per line
RADIAL_LORA="${RADIAL_LORA:-radial-lora}"

args=(evaluate --model "${MODEL}" --family "${FAMILY}" --lengths "${LENGTHS}" --base-frames "${BASE_FRAMES}"
      --height "${HEIGHT}" --width "${WIDTH}" --steps "${STEPS}" --guidance "${GUIDANCE}" --seed "${SEED}"
      --fps "${FPS}" --out "${OUT}")
if [ -n "${PROMPTS}" ]; then
    args+=(--prompts "${PROMPTS}")
else
    args+=(--prompt "A golden retriever runs along a beach at sunset, waves rolling in, camera tracking left"
           --prompt "A red car drives through a snowy mountain road, snowflakes falling, aerial view")
fi
[ -n "${LORA}" ] && args+=(--lora "${LORA}")
[ -n "${LORA2}" ] && args+=(--lora2 "${LORA2}")
[ -n "${DATASET}" ] && args+=(--dataset "${DATASET}")
[ -n "${VARIANTS}" ] && args+=(--variants "${VARIANTS}")
[ -n "${DENSE_LAYERS}" ] && args+=(--dense-layers "${DENSE_LAYERS}")
[ -n "${DENSE_TIMESTEPS}" ] && args+=(--dense-timesteps "${DENSE_TIMESTEPS}")

printf '[%s] radial-lora %s\n' "$(date -u +%H:%M:%S)" "${args[*]}"
"${RADIAL_LORA}" "${args[@]}"
printf '[%s] report: %s/report.md\n' "$(date -u +%H:%M:%S)" "${OUT}"
