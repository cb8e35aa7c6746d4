#!/usr/bin/env bash
# Build a patch-level retrieval database: encode images into a code store, then index it with FAISS.
#
#   bash arrag/build_retriever/build_retriever.sh [SOURCE ...]   # several sources go into one store, in order
#
# Settings (environment variables; an empty one takes the CLI's default, see `arrag encode --help` and
# `arrag build-index --help`). Paths are passed to the CLI as they are: it resolves and checks them.
#   IMAGES         the image source when none is given on the command line: a folder, webdataset .tar shards
#                  (also http(s):// URLs and pipe: commands), parquet files (img2dataset), a saved HF
#                  dataset or a hub dataset name                               (default data/retriever/images)
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
#   NUM_PROCS      processes per machine for every stage (one per GPU on GPU machines)   (default 1)
#   NUM_MACHINES   machines running this script on one shared filesystem (STORE, INDEX)     (default 1)
#   MACHINE_RANK   this machine, 0 .. NUM_MACHINES-1                                       (default 0)
#   MASTER_ADDR MASTER_PORT   where machine 0's rendezvous listens (default 127.0.0.1, 29500; each stage
#                  uses the next port: 29500 encode, 29501 build-index)
#   DIST_TIMEOUT   seconds a process waits for the others before it stops, naming them   (default 1800)
#   TORCHRUN       the launcher                                (default torchrun)
#   EXTRA_ENCODE / EXTRA_INDEX   any other `arrag encode` / `arrag build-index` flags
# Steps: encode -> build-index (rank 0 trains the quantizer, every process adds its part, rank 0 merges) -> a
# look at the index (machine 0). With several processes every stage runs under torchrun (--nnodes NUM_MACHINES
# --node-rank MACHINE_RANK --nproc-per-node NUM_PROCS); the processes coordinate through torch.distributed, so a
# machine that dies makes the others stop within DIST_TIMEOUT with a line naming it. (For a SLURM job array, run
# the CLI steps by hand: see README, "Scale".) Rerunning resumes the encoding (finished shards are skipped) and
# rebuilds the index (--overwrite).
set -euo pipefail

if [ $# -gt 0 ]; then SOURCES=("$@"); else SOURCES=("${IMAGES:-data/retriever/images}"); fi
VQ_CKPT=${VQ_CKPT:-arrag/Janus/janus/vq_ds16_t2i.pt}
STORE=${STORE:-data/retriever/codes}
INDEX=${INDEX:-data/retriever/index_L}
KEY_SOURCE=${KEY_SOURCE:-code}
NUM_PROCS=${NUM_PROCS:-1}
NUM_MACHINES=${NUM_MACHINES:-1}
MACHINE_RANK=${MACHINE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
DIST_TIMEOUT=${DIST_TIMEOUT:-1800}
ARRAG=${ARRAG:-arrag}
TORCHRUN=${TORCHRUN:-torchrun}
if [ "$MACHINE_RANK" -ge "$NUM_MACHINES" ]; then
  echo "build_retriever.sh: MACHINE_RANK $MACHINE_RANK must be below NUM_MACHINES $NUM_MACHINES" >&2; exit 2
fi
WORLD=$((NUM_MACHINES * NUM_PROCS))

ENCODE_ARGS=("${SOURCES[@]}" --out "$STORE" --vq "$VQ_CKPT")
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

# stage PORT ARGS...: one `arrag ARGS...` process, or WORLD of them under torchrun (this machine's NUM_PROCS).
stage() {
  local port=$1; shift
  if [ "$WORLD" -eq 1 ]; then
    $ARRAG "$@"
  else
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NUM_PROCS > 0 ? $(nproc) / NUM_PROCS : 1 ))} \
      $TORCHRUN --nnodes "$NUM_MACHINES" --node-rank "$MACHINE_RANK" --nproc-per-node "$NUM_PROCS" \
      --master-addr "$MASTER_ADDR" --master-port "$port" -m arrag "$@" --dist-timeout "$DIST_TIMEOUT"
  fi
}

echo "== 1/3 encode ${SOURCES[*]} -> $STORE ($WORLD process(es) in all)"
stage "$MASTER_PORT" encode "${ENCODE_ARGS[@]}" ${EXTRA_ENCODE:-}
echo "== 2/3 build-index $STORE -> $INDEX ($WORLD process(es) in all)"
stage "$((MASTER_PORT + 1))" build-index "${INDEX_ARGS[@]}" --overwrite ${EXTRA_INDEX:-}
if [ "$MACHINE_RANK" -ne 0 ]; then
  echo "== done here: machine 0 merges the parts into $INDEX"; exit 0
fi
echo "== 3/3 search-stats $INDEX"
$ARRAG search-stats "$INDEX" --queries 200
echo "== done: $INDEX"
