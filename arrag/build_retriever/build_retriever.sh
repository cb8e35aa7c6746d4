#!/usr/bin/env bash
# Build a patch-level retrieval database: encode images into a code store, then index it with FAISS.
#
#   bash arrag/build_retriever/build_retriever.sh [IMAGES]
#
# Settings (environment variables; an empty one takes the CLI's default, see `arrag encode --help` and
# `arrag build-index --help`). Paths are passed to the CLI as they are: it resolves and checks them.
#   IMAGES         image source: a folder, webdataset .tar shards, a saved HF dataset   (default data/retriever/images)
#   VQ_CKPT        the tokenizer: LlamaGen's vq_ds16_t2i.pt, a Janus-Pro model folder (its own VQ), an arrag
#                  .safetensors, or a Hub id such as peizesun/llamagen_t2i/vq_ds16_t2i.pt
#                                                              (default arrag/Janus/janus/vq_ds16_t2i.pt)
#   VQ_PRESET      VQ architecture preset                      (default: from the checkpoint, else VQ-16)
#   IMAGE_SIZE     crop size in pixels                         (default: the tokenizer's, 384 for VQ-16)
#   RESIZE         original (Resize + CenterCrop, as AR-RAG) or adm (LlamaGen's crop)   (default original)
#   STORE          code store folder                           (default data/retriever/codes)
#   INDEX          index folder                                (default data/retriever/index_L)
#   SHAPE          neighbourhood: L, 2hop, ring                (default L)
#   KEY_SOURCE     code (codebook vectors) or latent (the original project's keys)      (default code)
#   FACTORY        auto or a FAISS factory string, e.g. OPQ8,IVF80000,PQ8               (default auto)
#   MEMORY_BUDGET  index memory budget for FACTORY=auto        (default 16G)
#   NPROBE TRAIN_SIZE SEED CHUNK_IMAGES GPUS                   build-index settings
#   BATCH_SIZE SHARD_SIZE WORKERS MIN_SIZE MAX_IMAGES DEVICE   encode settings
#   NUM_GPUS       >1 encodes with one process per GPU through torchrun                 (default 1)
#   EXTRA_ENCODE / EXTRA_INDEX   any other `arrag encode` / `arrag build-index` flags
# Rerunning resumes the encoding (finished shards are skipped) and rebuilds the index with --overwrite.
set -euo pipefail

IMAGES=${1:-${IMAGES:-data/retriever/images}}
VQ_CKPT=${VQ_CKPT:-arrag/Janus/janus/vq_ds16_t2i.pt}
STORE=${STORE:-data/retriever/codes}
INDEX=${INDEX:-data/retriever/index_L}
KEY_SOURCE=${KEY_SOURCE:-code}
NUM_GPUS=${NUM_GPUS:-1}
ARRAG=${ARRAG:-arrag}

ENCODE_ARGS=("$IMAGES" --out "$STORE" --vq "$VQ_CKPT")
add_encode() { [ -n "${2:-}" ] && ENCODE_ARGS+=("$1" "$2") || true; }
add_encode --vq-preset "${VQ_PRESET:-}"; add_encode --image-size "${IMAGE_SIZE:-}"; add_encode --resize "${RESIZE:-}"
add_encode --batch-size "${BATCH_SIZE:-}"; add_encode --shard-size "${SHARD_SIZE:-}"; add_encode --workers "${WORKERS:-}"
add_encode --min-size "${MIN_SIZE:-}"; add_encode --max-images "${MAX_IMAGES:-}"; add_encode --device "${DEVICE:-}"
[ "$KEY_SOURCE" = "latent" ] && ENCODE_ARGS+=(--save-latents)

INDEX_ARGS=("$STORE" --out "$INDEX" --key-source "$KEY_SOURCE" --overwrite)
add_index() { [ -n "${2:-}" ] && INDEX_ARGS+=("$1" "$2") || true; }
add_index --shape "${SHAPE:-}"; add_index --factory "${FACTORY:-}"; add_index --memory-budget "${MEMORY_BUDGET:-}"
add_index --nprobe "${NPROBE:-}"; add_index --train-size "${TRAIN_SIZE:-}"; add_index --seed "${SEED:-}"
add_index --chunk-images "${CHUNK_IMAGES:-}"; add_index --gpus "${GPUS:-}"

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
$ARRAG build-index "${INDEX_ARGS[@]}" ${EXTRA_INDEX:-}
$ARRAG search-stats "$INDEX" --queries 200
echo "== done: $INDEX"
