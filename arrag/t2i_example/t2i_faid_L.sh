#!/usr/bin/env bash
# Text-to-image with FAiD (a fine-tuned Janus-Pro whose blenders smooth retrieved patches into its hidden states).
#
#   bash arrag/t2i_example/t2i_faid_L.sh            # run it with bash (the original README said python)
#
# Settings (environment variables; an empty one takes `arrag generate`'s default, see `arrag generate --help`):
#   MODEL          FAiD checkpoint (train-faid output, or jingyq1/arrag_faid)   (default result/ckpts/ckpts_FAiD_b2_h12,
#                  what train_FAiD.sh writes)
#   RETRIEVER      patch index built by build_retriever.sh        (default data/retriever/index_L)
#   PROMPT         the prompt                                     (default a photo of a red bicycle leaning on a wall)
#   OUTPUT         the output image (a grid of PARALLEL_SIZE)     (default result/generated_imgs/example_t2i_faid.jpg)
#   PARALLEL_SIZE  samples                                        (default 1, as the original example)
#   METHOD         faid, or faid+daid to add DAiD on top          (default faid)
#   FAID_K         retrieved codes per step                       (default 10)
#   DAID_LAMBDA DAID_TAU DAID_K DAID_AGGREGATE                    DAiD's settings (with METHOD=faid+daid)
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

MODEL=${MODEL:-result/ckpts/ckpts_FAiD_b2_h12}
RETRIEVER=${RETRIEVER:-data/retriever/index_L}
PROMPT=${PROMPT:-a photo of a red bicycle leaning on a wall}
OUTPUT=${OUTPUT:-result/generated_imgs/example_t2i_faid.jpg}
PARALLEL_SIZE=${PARALLEL_SIZE:-1}
METHOD=${METHOD:-faid}
ARRAG=${ARRAG:-arrag}

ARGS=(--model "$MODEL" --method "$METHOD" --retriever "$RETRIEVER" --prompt "$PROMPT"
      --parallel-size "$PARALLEL_SIZE" --out "${OUTPUT%.*}" --grid "$OUTPUT")
add() { [ -n "${2:-}" ] && ARGS+=("$1" "$2") || true; }
add --faid-k "${FAID_K:-}"; add --daid-lambda "${DAID_LAMBDA:-}"; add --daid-tau "${DAID_TAU:-}"
add --daid-k "${DAID_K:-}"; add --daid-aggregate "${DAID_AGGREGATE:-}"; add --nprobe "${NPROBE:-}"
add --retriever-device "${RETRIEVER_DEVICE:-}"; add --cfg-weight "${CFG_WEIGHT:-}"; add --temperature "${TEMPERATURE:-}"
add --top-k "${TOP_K:-}"; add --top-p "${TOP_P:-}"; add --seed "${SEED:-}"; add --image-size "${IMAGE_SIZE:-}"
add --device "${DEVICE:-}"; add --dtype "${DTYPE:-}"; add --batch-size "${BATCH_SIZE:-}"
add --decode-step "${DECODE_STEP:-}"
[ "${ALLOW_UNKNOWN_VQ:-0}" = "1" ] && ARGS+=(--allow-unknown-vq)
[ "${OVERWRITE:-0}" = "1" ] && ARGS+=(--overwrite)
add --upscale "${UPSCALE:-}"
export ARRAG_OVERWRITE_HINT="rerun with OVERWRITE=1"  # what a refusal tells the user to type

$ARRAG generate "${ARGS[@]}" ${EXTRA:-}
