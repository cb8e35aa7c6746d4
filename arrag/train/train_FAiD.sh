#!/usr/bin/env bash
# Train FAiD: the original recipe (1 GPU, batch 4 x accumulation 8, lr 2e-4 constant, 1 epoch, bf16, clip 1.0,
# LoRA r 128 / alpha 256 / dropout 0.05 on q_proj,v_proj, 2 blenders with hops 1,2, K = 10).
#
#   bash arrag/train/train_FAiD.sh
#
# Steps (each resumes when rerun): encode the captioned training images into a code store with the base
# model's own tokenizer, retrieve K codes for every position (construct-train), then train through accelerate.
# Settings (environment variables; an empty one takes the CLI's default, see `arrag train-faid --help`).
# Paths and Hub ids are passed to the CLI as they are: it resolves and checks them.
#   BASE           base Janus-Pro folder or Hub id                        (default deepseek-ai/Janus-Pro-1B)
#   TRAIN_DATA     captioned training images (a folder with .txt captions, webdataset .tar shards, parquet
#                  files (img2dataset), a saved HF dataset or a hub dataset name)
#                                                                         (default data/train/images)
#   TRAIN_STORE    their code store                                       (default data/train/codes)
#   VQ_CKPT        tokenizer for encoding                                 (default: BASE, the model's own VQ)
#   VQ_PRESET IMAGE_SIZE RESIZE                                           encode settings (default: from the model)
#   RETRIEVER      patch index (build_retriever.sh), built from other images (default data/retriever/index_L)
#   EXCLUDE_SELF   1 when the training images are also in the index       (default 0)
#   NPROBE         construct-train's nprobe (the original used 2048)      (default: the index's)
#   NUM_BLENDER NUM_HOP K FAID_CELLS BLENDER_INIT                         (defaults 2, 1,2, 10, all, original)
#   BATCH_SIZE GRAD_ACCUM LR EPOCHS MAX_STEPS                             (defaults 4, 8, 2e-4, 1, none)
#   SCHEDULE WARMUP_RATIO WEIGHT_DECAY MAX_GRAD_NORM CFG_DROP MAX_TEXT_LEN (defaults constant, 0, 0, 1.0, 0, 512)
#   LORA_R LORA_ALPHA LORA_DROPOUT LORA_TARGETS                           (defaults 128, 256, 0.05, q_proj,v_proj)
#   SEED SAVE_EVERY KEEP_CHECKPOINTS NUM_WORKERS MIXED_PRECISION  (defaults 42, 500, 2, 2, bf16 on CUDA else no)
#   DEEPSPEED      a DeepSpeed config, e.g. arrag/train/zero3.json        (default none)
#   NUM_GPUS       processes on this machine                              (default 1)
#   NUM_MACHINES MACHINE_RANK MAIN_IP MAIN_PORT  multi-machine through accelerate (defaults 1, 0, -, 29500)
#   LAUNCHER       accelerate or torchrun                                 (default accelerate)
#   OUT            output folder            (default result/ckpts/ckpts_FAiD_b${NUM_BLENDER}_h${NUM_HOP without commas})
#   RESUME         1 continues from the newest checkpoint in OUT          (default 1)
#   OVERWRITE      1 deletes OUT's checkpoints and trains from scratch    (default 0)
#   EXTRA_ENCODE / EXTRA   any other `arrag encode` / `arrag train-faid` flags
set -euo pipefail

BASE=${BASE:-deepseek-ai/Janus-Pro-1B}
TRAIN_DATA=${TRAIN_DATA:-data/train/images}
TRAIN_STORE=${TRAIN_STORE:-data/train/codes}
VQ_CKPT=${VQ_CKPT:-$BASE}
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
OUT=${OUT:-result/ckpts/ckpts_FAiD_b${NUM_BLENDER}_h${NUM_HOP//,/}}
RESUME=${RESUME:-1}
ARRAG=${ARRAG:-arrag}

if [ ! -f "$TRAIN_STORE/manifest.json" ]; then
  echo "== 1/3 encode $TRAIN_DATA -> $TRAIN_STORE (resumes when rerun)"
  ENCODE_ARGS=("$TRAIN_DATA" --out "$TRAIN_STORE" --vq "$VQ_CKPT")
  add_encode() { [ -n "${2:-}" ] && ENCODE_ARGS+=("$1" "$2") || true; }
  add_encode --vq-preset "${VQ_PRESET:-}"; add_encode --image-size "${IMAGE_SIZE:-}"; add_encode --resize "${RESIZE:-}"
  $ARRAG encode "${ENCODE_ARGS[@]}" ${EXTRA_ENCODE:-}
else
  echo "== 1/3 code store $TRAIN_STORE is complete"
fi

echo "== 2/3 construct-train: top-$K codes per position from $RETRIEVER"
CONSTRUCT_ARGS=("$TRAIN_STORE" --retriever "$RETRIEVER" --k "$K")
[ "$EXCLUDE_SELF" = "1" ] && CONSTRUCT_ARGS+=(--exclude-self)
[ -n "${NPROBE:-}" ] && CONSTRUCT_ARGS+=(--nprobe "$NPROBE")
$ARRAG construct-train "${CONSTRUCT_ARGS[@]}"

echo "== 3/3 train-faid -> $OUT"
TRAIN_ARGS=(train-faid --base "$BASE" --store "$TRAIN_STORE" --out "$OUT" --num-blender "$NUM_BLENDER"
            --num-hop "$NUM_HOP" --retrieved-key-num "$K")
add() { [ -n "${2:-}" ] && TRAIN_ARGS+=("$1" "$2") || true; }
add --faid-cells "${FAID_CELLS:-}"; add --blender-init "${BLENDER_INIT:-}"
add --batch-size "${BATCH_SIZE:-}"; add --grad-accum "${GRAD_ACCUM:-}"
add --lr "${LR:-}"; add --epochs "${EPOCHS:-}"; add --max-steps "${MAX_STEPS:-}"; add --schedule "${SCHEDULE:-}"
add --warmup-ratio "${WARMUP_RATIO:-}"; add --weight-decay "${WEIGHT_DECAY:-}"; add --max-grad-norm "${MAX_GRAD_NORM:-}"
add --cfg-drop "${CFG_DROP:-}"; add --max-text-len "${MAX_TEXT_LEN:-}"; add --lora-r "${LORA_R:-}"
add --lora-alpha "${LORA_ALPHA:-}"; add --lora-dropout "${LORA_DROPOUT:-}"; add --lora-targets "${LORA_TARGETS:-}"
add --seed "${SEED:-}"; add --save-every "${SAVE_EVERY:-}"; add --keep-checkpoints "${KEEP_CHECKPOINTS:-}"
# Mixed precision said once, to arrag and to accelerate launch alike (else accelerate warns that it took its default)
if [ -z "${MIXED_PRECISION:-}" ]; then
  MIXED_PRECISION=$(nvidia-smi -L >/dev/null 2>&1 && echo bf16 || echo no)
fi
add --num-workers "${NUM_WORKERS:-}"; add --mixed-precision "$MIXED_PRECISION"; add --deepspeed "${DEEPSPEED:-}"
[ "$RESUME" = "1" ] && TRAIN_ARGS+=(--resume)
[ "${OVERWRITE:-0}" = "1" ] && TRAIN_ARGS+=(--overwrite)
export ARRAG_OVERWRITE_HINT="rerun with OVERWRITE=1"  # what a refusal tells the user to type

if [ "$LAUNCHER" = "torchrun" ]; then
  torchrun --nnodes "$NUM_MACHINES" --node_rank "$MACHINE_RANK" --nproc_per_node "$NUM_GPUS" \
    ${MAIN_IP:+--master_addr "$MAIN_IP"} --master_port "$MAIN_PORT" -m arrag "${TRAIN_ARGS[@]}" ${EXTRA:-}
else
  LAUNCH=(--num_processes $((NUM_GPUS * NUM_MACHINES)) --num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK"
          --main_process_port "$MAIN_PORT" --dynamo_backend no --mixed_precision "$MIXED_PRECISION")
  [ -n "${MAIN_IP:-}" ] && LAUNCH+=(--main_process_ip "$MAIN_IP")
  [ $((NUM_GPUS * NUM_MACHINES)) -gt 1 ] && LAUNCH+=(--multi_gpu)
  accelerate launch "${LAUNCH[@]}" -m arrag "${TRAIN_ARGS[@]}" ${EXTRA:-}
fi
echo "== done: $OUT"
