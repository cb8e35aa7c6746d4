#!/usr/bin/env bash
# Train FAiD: the original recipe (1 GPU, batch 4 x accumulation 8, lr 2e-4 constant, 1 epoch, bf16, clip 1.0,
# LoRA r 128 / alpha 256 / dropout 0.05 on q_proj,v_proj, 2 blenders with hops 1,2, K = 10).
#
#   bash arrag/train/train_FAiD.sh
#
# Steps (each resumes when rerun): encode the captioned training images into a code store (skipped when the
# store exists), retrieve K codes for every position (construct-train), then train through accelerate.
# Settings (environment variables):
#   BASE           base Janus-Pro folder                                  (default deepseek-ai/Janus-Pro-1B)
#   TRAIN_DATA     captioned training images (webdataset .tar, saved HF dataset, folder with .txt captions)
#                                                                         (default data/train/images)
#   TRAIN_STORE    their code store                                       (default data/train/codes)
#   VQ_CKPT        tokenizer weights for encoding                         (default arrag/Janus/janus/vq_ds16_t2i.pt)
#   RETRIEVER      patch index (build_retriever.sh), built from other images (default data/retriever/index_L)
#   EXCLUDE_SELF   1 when the training images are also in the index       (default 0)
#   NUM_BLENDER NUM_HOP K                                                 (default 2, 1,2, 10)
#   NUM_GPUS       processes on this machine                             (default 1)
#   NUM_MACHINES MACHINE_RANK MAIN_IP MAIN_PORT  multi-machine through accelerate (defaults 1, 0, -, 29500)
#   LAUNCHER       accelerate or torchrun                                 (default accelerate)
#   DEEPSPEED      a DeepSpeed config, e.g. arrag/train/zero3.json        (default none)
#   BATCH_SIZE GRAD_ACCUM LR EPOCHS                                       (default 4, 8, 2e-4, 1)
#   OUT            output folder            (default result/ckpts/ckpts_FAiD_b${NUM_BLENDER}_h${NUM_HOP without commas})
#   RESUME         1 continues from the newest checkpoint in OUT          (default 1)
#   EXTRA          any other `arrag train-faid` flags
set -euo pipefail

BASE=${BASE:-deepseek-ai/Janus-Pro-1B}
TRAIN_DATA=${TRAIN_DATA:-data/train/images}
TRAIN_STORE=${TRAIN_STORE:-data/train/codes}
VQ_CKPT=${VQ_CKPT:-arrag/Janus/janus/vq_ds16_t2i.pt}
RETRIEVER=${RETRIEVER:-data/retriever/index_L}
EXCLUDE_SELF=${EXCLUDE_SELF:-0}
NUM_BLENDER=${NUM_BLENDER:-2}
NUM_HOP=${NUM_HOP:-1,2}
K=${K:-10}
NUM_GPUS=${NUM_GPUS:-1}
NUM_MACHINES=${NUM_MACHINES:-1}
MACHINE_RANK=${MACHINE_RANK:-0}
MAIN_PORT=${MAIN_PORT:-29500}
LAUNCHER=${LAUNCHER:-accelerate}
BATCH_SIZE=${BATCH_SIZE:-4}
GRAD_ACCUM=${GRAD_ACCUM:-8}
LR=${LR:-2e-4}
EPOCHS=${EPOCHS:-1}
OUT=${OUT:-result/ckpts/ckpts_FAiD_b${NUM_BLENDER}_h${NUM_HOP//,/}}
RESUME=${RESUME:-1}
ARRAG=${ARRAG:-arrag}

if [ ! -f "$BASE/config.json" ]; then
  echo "train_FAiD.sh: no Janus-Pro checkpoint at $BASE; download deepseek-ai/Janus-Pro-1B there or set BASE" >&2
  exit 2
fi

if [ ! -f "$TRAIN_STORE/manifest.json" ]; then
  echo "== 1/3 encode $TRAIN_DATA -> $TRAIN_STORE"
  $ARRAG encode "$TRAIN_DATA" --out "$TRAIN_STORE" --vq "$VQ_CKPT" --image-size 384 ${EXTRA_ENCODE:-}
else
  echo "== 1/3 code store $TRAIN_STORE exists"
fi

echo "== 2/3 construct-train: top-$K codes per position from $RETRIEVER"
SELF=()
[ "$EXCLUDE_SELF" = "1" ] && SELF=(--exclude-self)
$ARRAG construct-train "$TRAIN_STORE" --retriever "$RETRIEVER" --k "$K" "${SELF[@]}"

echo "== 3/3 train-faid -> $OUT"
TRAIN_ARGS=(train-faid --base "$BASE" --store "$TRAIN_STORE" --out "$OUT" --num-blender "$NUM_BLENDER"
            --num-hop "$NUM_HOP" --retrieved-key-num "$K" --batch-size "$BATCH_SIZE" --grad-accum "$GRAD_ACCUM"
            --lr "$LR" --epochs "$EPOCHS" --schedule constant --warmup-ratio 0 --max-grad-norm 1.0
            --lora-r 128 --lora-alpha 256 --lora-dropout 0.05 --max-text-len 512)
[ "$RESUME" = "1" ] && TRAIN_ARGS+=(--resume)
[ -n "${DEEPSPEED:-}" ] && TRAIN_ARGS+=(--deepspeed "$DEEPSPEED")

if [ "$LAUNCHER" = "torchrun" ]; then
  torchrun --nnodes "$NUM_MACHINES" --node_rank "$MACHINE_RANK" --nproc_per_node "$NUM_GPUS" \
    ${MAIN_IP:+--master_addr "$MAIN_IP"} --master_port "$MAIN_PORT" -m arrag "${TRAIN_ARGS[@]}" ${EXTRA:-}
else
  LAUNCH=(--num_processes $((NUM_GPUS * NUM_MACHINES)) --num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK"
          --main_process_port "$MAIN_PORT" --dynamo_backend no)
  [ -n "${MAIN_IP:-}" ] && LAUNCH+=(--main_process_ip "$MAIN_IP")
  [ $((NUM_GPUS * NUM_MACHINES)) -gt 1 ] && LAUNCH+=(--multi_gpu)
  accelerate launch "${LAUNCH[@]}" -m arrag "${TRAIN_ARGS[@]}" ${EXTRA:-}
fi
echo "== done: $OUT"
