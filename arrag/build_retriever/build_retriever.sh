#!/usr/bin/env bash
# Build a patch-level retrieval database: encode images into a code store, then index it with FAISS.
#
#   bash arrag/build_retriever/build_retriever.sh [IMAGES]
#
# Settings (environment variables; defaults follow the original project's paths):
#   IMAGES        image source: a folder, webdataset .tar shards, a saved HF dataset     (default data/retriever/images)
#   VQ_CKPT       tokenizer weights, LlamaGen's vq_ds16_t2i.pt                           (default arrag/Janus/janus/vq_ds16_t2i.pt)
#   VQ_PRESET     VQ architecture preset                                                 (default VQ-16)
#   STORE         code store folder                                                      (default data/retriever/codes)
#   INDEX         index folder                                                           (default data/retriever/index_L)
#   IMAGE_SIZE    crop size in pixels                                                    (default 384)
#   SHAPE         neighbourhood: L, 2hop, ring                                           (default L)
#   KEY_SOURCE    code (normalised codebook rows) or latent (original project)           (default code)
#   FACTORY       auto or a FAISS factory string, e.g. OPQ8,IVF80000,PQ8                 (default auto)
#   MEMORY_BUDGET index memory budget for FACTORY=auto                                   (default 16G)
#   BATCH_SIZE    encoder batch                                                          (default 64)
#   WORKERS       DataLoader workers                                                     (default 8)
#   NUM_GPUS      >1 encodes with one process per GPU through torchrun                   (default 1)
#   EXTRA_ENCODE / EXTRA_INDEX   extra flags for `arrag encode` / `arrag build-index`
# Rerunning resumes the encoding (finished shards are skipped) and rebuilds the index with --overwrite.
set -euo pipefail

IMAGES=${1:-${IMAGES:-data/retriever/images}}
VQ_CKPT=${VQ_CKPT:-arrag/Janus/janus/vq_ds16_t2i.pt}
VQ_PRESET=${VQ_PRESET:-VQ-16}
STORE=${STORE:-data/retriever/codes}
INDEX=${INDEX:-data/retriever/index_L}
IMAGE_SIZE=${IMAGE_SIZE:-384}
SHAPE=${SHAPE:-L}
KEY_SOURCE=${KEY_SOURCE:-code}
FACTORY=${FACTORY:-auto}
MEMORY_BUDGET=${MEMORY_BUDGET:-16G}
BATCH_SIZE=${BATCH_SIZE:-64}
WORKERS=${WORKERS:-8}
NUM_GPUS=${NUM_GPUS:-1}
ARRAG=${ARRAG:-arrag}

if [ ! -f "$VQ_CKPT" ]; then
  echo "build_retriever.sh: VQ checkpoint $VQ_CKPT not found; download it with" >&2
  echo "  wget -P $(dirname "$VQ_CKPT") https://huggingface.co/peizesun/llamagen_t2i/resolve/main/vq_ds16_t2i.pt" >&2
  echo "or set VQ_CKPT=/path/to/vq_ds16_t2i.pt" >&2
  exit 2
fi

LATENTS=()
if [ "$KEY_SOURCE" = "latent" ]; then LATENTS=(--save-latents); fi

ENCODE_ARGS=("$IMAGES" --out "$STORE" --vq "$VQ_CKPT" --vq-preset "$VQ_PRESET" --image-size "$IMAGE_SIZE"
             --batch-size "$BATCH_SIZE" --workers "$WORKERS" "${LATENTS[@]}")
echo "== 1/2 encode $IMAGES -> $STORE"
if [ "$NUM_GPUS" -gt 1 ]; then
  # One process per GPU; each takes the shards k with k % WORLD_SIZE == RANK. The last one writes the manifest.
  torchrun --standalone --nproc_per_node "$NUM_GPUS" -m arrag encode "${ENCODE_ARGS[@]}" ${EXTRA_ENCODE:-}
  # A final pass writes the manifest if the last process to finish was not the one that saw all shards.
  $ARRAG encode "${ENCODE_ARGS[@]}" ${EXTRA_ENCODE:-}
else
  $ARRAG encode "${ENCODE_ARGS[@]}" ${EXTRA_ENCODE:-}
fi

echo "== 2/2 build-index $STORE -> $INDEX"
$ARRAG build-index "$STORE" --out "$INDEX" --shape "$SHAPE" --key-source "$KEY_SOURCE" --factory "$FACTORY" \
  --memory-budget "$MEMORY_BUDGET" --overwrite ${EXTRA_INDEX:-}
$ARRAG search-stats "$INDEX" --queries 200
echo "== done: $INDEX"
