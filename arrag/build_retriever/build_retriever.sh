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
#   MEMORY_BUDGET  index memory budget for FACTORY=auto        (default auto: 3/4 of the machine's memory)
#   DEDUP          1 stores each distinct (key, value) once with its count, 0 keeps every occurrence (default 1)
#   NPROBE TARGET_RECALL TRAIN_SIZE SEED CHUNK_IMAGES GPUS     build-index settings
#   BATCH_SIZE SHARD_SIZE WORKERS MIN_SIZE MAX_IMAGES DEVICE   encode settings
#   NUM_GPUS       encoding processes per machine, one per GPU (default 1)
#   NUM_PROCS      index-building processes per machine; each gets cores / NUM_PROCS threads   (default 1)
#   NUM_MACHINES   machines running this script on one shared filesystem (STORE, INDEX)     (default 1)
#   MACHINE_RANK   this machine, 0 .. NUM_MACHINES-1; machine 0 trains the quantizer and merges  (default 0)
#   RUN_ID         a name for this run, the same on every machine (needed when NUM_MACHINES > 1): the
#                  machines wait for each other through marker files in $INDEX.sync/$RUN_ID
#   EXTRA_ENCODE / EXTRA_INDEX   any other `arrag encode` / `arrag build-index` flags
# Steps: encode -> train the quantizer (once) -> add (every process its part) -> merge (machine 0).
# Rerunning resumes the encoding (finished shards are skipped) and rebuilds the index (--overwrite).
set -euo pipefail

IMAGES=${1:-${IMAGES:-data/retriever/images}}
VQ_CKPT=${VQ_CKPT:-arrag/Janus/janus/vq_ds16_t2i.pt}
STORE=${STORE:-data/retriever/codes}
INDEX=${INDEX:-data/retriever/index_L}
KEY_SOURCE=${KEY_SOURCE:-code}
NUM_GPUS=${NUM_GPUS:-1}
NUM_PROCS=${NUM_PROCS:-1}
NUM_MACHINES=${NUM_MACHINES:-1}
MACHINE_RANK=${MACHINE_RANK:-0}
ARRAG=${ARRAG:-arrag}
if [ "$NUM_MACHINES" -gt 1 ] && [ -z "${RUN_ID:-}" ]; then
  echo "build_retriever.sh: set RUN_ID (the same name on every machine) when NUM_MACHINES > 1" >&2; exit 2
fi
if [ "$MACHINE_RANK" -ge "$NUM_MACHINES" ]; then
  echo "build_retriever.sh: MACHINE_RANK $MACHINE_RANK must be below NUM_MACHINES $NUM_MACHINES" >&2; exit 2
fi

ENCODE_ARGS=("$IMAGES" --out "$STORE" --vq "$VQ_CKPT")
add_encode() { [ -n "${2:-}" ] && ENCODE_ARGS+=("$1" "$2") || true; }
add_encode --vq-preset "${VQ_PRESET:-}"; add_encode --image-size "${IMAGE_SIZE:-}"; add_encode --resize "${RESIZE:-}"
add_encode --batch-size "${BATCH_SIZE:-}"; add_encode --shard-size "${SHARD_SIZE:-}"; add_encode --workers "${WORKERS:-}"
add_encode --min-size "${MIN_SIZE:-}"; add_encode --max-images "${MAX_IMAGES:-}"; add_encode --device "${DEVICE:-}"
[ "$KEY_SOURCE" = "latent" ] && ENCODE_ARGS+=(--save-latents)

INDEX_ARGS=("$STORE" --out "$INDEX" --key-source "$KEY_SOURCE")
add_index() { [ -n "${2:-}" ] && INDEX_ARGS+=("$1" "$2") || true; }
add_index --shape "${SHAPE:-}"; add_index --factory "${FACTORY:-}"; add_index --memory-budget "${MEMORY_BUDGET:-}"
add_index --nprobe "${NPROBE:-}"; add_index --target-recall "${TARGET_RECALL:-}"; add_index --train-size "${TRAIN_SIZE:-}"; add_index --seed "${SEED:-}"
add_index --chunk-images "${CHUNK_IMAGES:-}"; add_index --gpus "${GPUS:-}"
[ "${DEDUP:-1}" = "0" ] && INDEX_ARGS+=(--no-dedup)

SYNC="$INDEX.sync/${RUN_ID:-local}"
# barrier NAME: wait until every machine has reached NAME.
barrier() {
  [ "$NUM_MACHINES" -gt 1 ] || return 0
  mkdir -p "$SYNC" && touch "$SYNC/$1.$MACHINE_RANK"
  until [ "$(ls "$SYNC" | grep -c "^$1\.")" -ge "$NUM_MACHINES" ]; do sleep 5; done
}
# run_all N CMD...: N copies of CMD side by side, copy p with P=p in its environment; fails if any fails.
run_all() {
  local n=$1 pids=() p; shift
  for ((p = 0; p < n; p++)); do P=$p "$@" & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p"; done
}

ENCODE_WORLD=$((NUM_MACHINES * NUM_GPUS))
echo "== 1/4 encode $IMAGES -> $STORE ($ENCODE_WORLD process(es) in all)"
encode_part() {
  local dev=() r=$((MACHINE_RANK * NUM_GPUS + P))
  [ "$NUM_GPUS" -gt 1 ] && dev=(--device "cuda:$P")
  $ARRAG encode "${ENCODE_ARGS[@]}" "${dev[@]}" --shard "$r/$ENCODE_WORLD" ${EXTRA_ENCODE:-}
}
if [ "$ENCODE_WORLD" -gt 1 ]; then
  run_all "$NUM_GPUS" encode_part
  barrier encoded
  # The last process to finish writes the store's manifest; a final pass makes sure of it (nothing is left
  # to encode by then), and the other machines wait for it.
  [ "$MACHINE_RANK" -eq 0 ] && $ARRAG encode "${ENCODE_ARGS[@]}" ${EXTRA_ENCODE:-}
  barrier store
else
  $ARRAG encode "${ENCODE_ARGS[@]}" ${EXTRA_ENCODE:-}
fi

WORLD=$((NUM_MACHINES * NUM_PROCS))
if [ "$WORLD" -eq 1 ]; then
  echo "== 2/4 + 3/4 build-index $STORE -> $INDEX (one process)"
  $ARRAG build-index "${INDEX_ARGS[@]}" --overwrite ${EXTRA_INDEX:-}
else
  echo "== 2/4 train the quantizer once (machine 0)"
  [ "$MACHINE_RANK" -eq 0 ] && $ARRAG build-index "${INDEX_ARGS[@]}" --train-only --overwrite ${EXTRA_INDEX:-}
  barrier trained
  THREADS=$(( $(nproc) / NUM_PROCS )); [ "$THREADS" -ge 1 ] || THREADS=1
  echo "== 3/4 add: $NUM_PROCS process(es) here, $WORLD in all, $THREADS thread(s) each"
  add_part() {
    OMP_NUM_THREADS=$THREADS $ARRAG build-index "${INDEX_ARGS[@]}" --shard "$((MACHINE_RANK * NUM_PROCS + P))/$WORLD" \
      ${EXTRA_INDEX:-}
  }
  run_all "$NUM_PROCS" add_part
  if [ "$MACHINE_RANK" -ne 0 ]; then
    echo "== done here: machine 0 merges the parts into $INDEX"; exit 0
  fi
  echo "== 4/4 merge-index $INDEX"
  $ARRAG merge-index "$INDEX" --wait 86400
fi
$ARRAG search-stats "$INDEX" --queries 200
echo "== done: $INDEX"
