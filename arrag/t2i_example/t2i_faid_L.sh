#!/usr/bin/env bash
# Text-to-image with FAiD (a fine-tuned Janus-Pro whose blenders smooth retrieved patches into its hidden states).
#
#   bash arrag/t2i_example/t2i_faid_L.sh            # run it with bash (the original README said python)
#
# Settings (environment variables):
#   MODEL          FAiD checkpoint folder (arrag train-faid output)  (default result/ckpts/arrag_faid)
#   RETRIEVER      patch index built by build_retriever.sh           (default data/retriever/index_L)
#   PROMPT         the prompt                                        (default a photo of a red bicycle leaning on a wall)
#   OUTPUT         the output image (a grid of PARALLEL_SIZE)        (default result/generated_imgs/example_t2i_faid.jpg)
#   PARALLEL_SIZE  samples                                           (default 4)
#   FAID_K         retrieved codes per step                          (default 10)
#   METHOD         faid, or faid+daid to add DAiD on top             (default faid)
#   NPROBE CFG_WEIGHT TEMPERATURE SEED IMAGE_SIZE DEVICE             (defaults: the index's, 5, 1.0, 0, 384, auto)
#   EXTRA          any other `arrag generate` flags
set -euo pipefail

MODEL=${MODEL:-result/ckpts/arrag_faid}
RETRIEVER=${RETRIEVER:-data/retriever/index_L}
PROMPT=${PROMPT:-a photo of a red bicycle leaning on a wall}
OUTPUT=${OUTPUT:-result/generated_imgs/example_t2i_faid.jpg}
PARALLEL_SIZE=${PARALLEL_SIZE:-4}
FAID_K=${FAID_K:-10}
METHOD=${METHOD:-faid}
CFG_WEIGHT=${CFG_WEIGHT:-5}
TEMPERATURE=${TEMPERATURE:-1.0}
SEED=${SEED:-0}
IMAGE_SIZE=${IMAGE_SIZE:-384}
DEVICE=${DEVICE:-auto}
ARRAG=${ARRAG:-arrag}

OPTIONAL=()
[ -n "${NPROBE:-}" ] && OPTIONAL+=(--nprobe "$NPROBE")

$ARRAG generate --model "$MODEL" --method "$METHOD" --retriever "$RETRIEVER" --faid-k "$FAID_K" --prompt "$PROMPT" \
  --parallel-size "$PARALLEL_SIZE" --cfg-weight "$CFG_WEIGHT" --temperature "$TEMPERATURE" --seed "$SEED" \
  --image-size "$IMAGE_SIZE" --device "$DEVICE" --out "${OUTPUT%.*}" --grid "$OUTPUT" "${OPTIONAL[@]}" ${EXTRA:-}
