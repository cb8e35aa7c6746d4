#!/usr/bin/env bash
# Text-to-image with DAiD (training-free retrieval augmentation) on Janus-Pro, with the L-shaped patch index.
#
#   bash arrag/t2i_example/t2i_daid_L.sh            # run it with bash (the original README said python)
#
# Settings (environment variables; an empty one takes `arrag generate`'s default, see `arrag generate --help`):
#   MODEL          Janus-Pro folder or Hugging Face id            (default deepseek-ai/Janus-Pro-1B)
#   RETRIEVER      patch index built by build_retriever.sh        (default data/retriever/index_L)
#   PROMPT         the prompt                                     (default a photo of a red bicycle leaning on a wall)
#   OUTPUT         the output image (a grid of PARALLEL_SIZE)     (default result/generated_imgs/example_t2i_daid.jpg)
#   PARALLEL_SIZE  samples                                        (default 1, as the original example)
#   DAID_LAMBDA DAID_TAU DAID_K DAID_AGGREGATE                    DAiD's settings (defaults 0.1, 1.0, 2048, nearest;
#                  k 2048 is the original's, for its database of millions of images; the demo worlds' small
#                  databases use 256, the value their validation sweeps chose: see docs/demo.md)
#   NPROBE RETRIEVER_DEVICE ALLOW_UNKNOWN_VQ=1                    the index (ALLOW_UNKNOWN_VQ for the prebuilt database)
#   CFG_WEIGHT TEMPERATURE TOP_K TOP_P SEED                       sampling (defaults 5, 1, off, off, 0)
#   IMAGE_SIZE                                                    pixels per side (default: the model's)
#   DEVICE DTYPE BATCH_SIZE DECODE_STEP                           where and how it runs
#   OVERWRITE=1                                                   replace the images of an earlier run
#   UPSCALE        write the images enlarged N times, nearest      (default 1; e.g. 4 for the 64-px demo models)
#   ARRAG          the command that runs arrag                    (default arrag; e.g. ".venv/bin/arrag" or
#                                                                  "python -m arrag")
#   EXTRA                                                         any other `arrag generate` flags
set -euo pipefail

MODEL=${MODEL:-deepseek-ai/Janus-Pro-1B}
RETRIEVER=${RETRIEVER:-data/retriever/index_L}
PROMPT=${PROMPT:-a photo of a red bicycle leaning on a wall}
OUTPUT=${OUTPUT:-result/generated_imgs/example_t2i_daid.jpg}
PARALLEL_SIZE=${PARALLEL_SIZE:-1}
ARRAG=${ARRAG:-arrag}

ARGS=(--model "$MODEL" --method daid --retriever "$RETRIEVER" --prompt "$PROMPT" --parallel-size "$PARALLEL_SIZE"
      --out "${OUTPUT%.*}" --grid "$OUTPUT")
add() { [ -n "${2:-}" ] && ARGS+=("$1" "$2") || true; }
add --daid-lambda "${DAID_LAMBDA:-}"; add --daid-tau "${DAID_TAU:-}"; add --daid-k "${DAID_K:-}"
add --daid-aggregate "${DAID_AGGREGATE:-}"; add --nprobe "${NPROBE:-}"; add --retriever-device "${RETRIEVER_DEVICE:-}"
add --cfg-weight "${CFG_WEIGHT:-}"; add --temperature "${TEMPERATURE:-}"; add --top-k "${TOP_K:-}"
add --top-p "${TOP_P:-}"; add --seed "${SEED:-}"; add --image-size "${IMAGE_SIZE:-}"; add --device "${DEVICE:-}"
add --dtype "${DTYPE:-}"; add --batch-size "${BATCH_SIZE:-}"; add --decode-step "${DECODE_STEP:-}"
[ "${ALLOW_UNKNOWN_VQ:-0}" = "1" ] && ARGS+=(--allow-unknown-vq)
[ "${OVERWRITE:-0}" = "1" ] && ARGS+=(--overwrite)
add --upscale "${UPSCALE:-}"
export ARRAG_OVERWRITE_HINT="rerun with OVERWRITE=1"  # what a refusal tells the user to type

$ARRAG generate "${ARGS[@]}" ${EXTRA:-}
