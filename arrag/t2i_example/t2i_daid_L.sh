#!/usr/bin/env bash
# Text-to-image with DAiD (training-free retrieval augmentation) on Janus-Pro, with the L-shaped patch index.
#
#   bash arrag/t2i_example/t2i_daid_L.sh            # run it with bash (the original README said python)
#
# Settings (environment variables):
#   MODEL          Janus-Pro checkpoint folder                      (default deepseek-ai/Janus-Pro-1B, a local folder)
#   RETRIEVER      patch index built by build_retriever.sh          (default data/retriever/index_L)
#   PROMPT         the prompt                                       (default a photo of a red bicycle leaning on a wall)
#   OUTPUT         the output image (a grid of PARALLEL_SIZE)       (default result/generated_imgs/example_t2i_daid.jpg)
#   PARALLEL_SIZE  samples                                          (default 4)
#   DAID_LAMBDA DAID_TAU DAID_K DAID_AGGREGATE NPROBE               (defaults: arrag's, see `arrag generate --help`)
#   CFG_WEIGHT TEMPERATURE SEED IMAGE_SIZE DEVICE                   (defaults 5, 1.0, 0, 384, auto)
#   EXTRA          any other `arrag generate` flags, e.g. "--allow-unknown-vq" for the original prebuilt database
set -euo pipefail

MODEL=${MODEL:-deepseek-ai/Janus-Pro-1B}
RETRIEVER=${RETRIEVER:-data/retriever/index_L}
PROMPT=${PROMPT:-a photo of a red bicycle leaning on a wall}
OUTPUT=${OUTPUT:-result/generated_imgs/example_t2i_daid.jpg}
PARALLEL_SIZE=${PARALLEL_SIZE:-4}
CFG_WEIGHT=${CFG_WEIGHT:-5}
TEMPERATURE=${TEMPERATURE:-1.0}
SEED=${SEED:-0}
IMAGE_SIZE=${IMAGE_SIZE:-384}
DEVICE=${DEVICE:-auto}
ARRAG=${ARRAG:-arrag}

OPTIONAL=()
[ -n "${DAID_LAMBDA:-}" ] && OPTIONAL+=(--daid-lambda "$DAID_LAMBDA")
[ -n "${DAID_TAU:-}" ] && OPTIONAL+=(--daid-tau "$DAID_TAU")
[ -n "${DAID_K:-}" ] && OPTIONAL+=(--daid-k "$DAID_K")
[ -n "${DAID_AGGREGATE:-}" ] && OPTIONAL+=(--daid-aggregate "$DAID_AGGREGATE")
[ -n "${NPROBE:-}" ] && OPTIONAL+=(--nprobe "$NPROBE")

$ARRAG generate --model "$MODEL" --method daid --retriever "$RETRIEVER" --prompt "$PROMPT" \
  --parallel-size "$PARALLEL_SIZE" --cfg-weight "$CFG_WEIGHT" --temperature "$TEMPERATURE" --seed "$SEED" \
  --image-size "$IMAGE_SIZE" --device "$DEVICE" --out "${OUTPUT%.*}" --grid "$OUTPUT" "${OPTIONAL[@]}" ${EXTRA:-}
