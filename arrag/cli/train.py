"""FAiD training: `arrag construct-train`, `train-faid`."""

from __future__ import annotations

import argparse

from arrag.cli.common import (
    _add_dist_timeout,
    _add_index_checks,
    _add_trust,
    _configs_from,
    _default,
    _float,
    _index_check,
    _int,
)


def _construct_train(args: argparse.Namespace) -> int:
    from arrag.train.construct import construct_train

    s = construct_train(args.store, args.retriever, args.out, retrieved_key_num=args.retrieved_key_num,
                        exclude_self=args.exclude_self, verify_index=_index_check(args),
                        chunk_images=args.chunk_images, nprobe=args.nprobe, shard=args.shard, device=args.device,
                        dist_timeout=args.dist_timeout)
    print(f"retrieved top-{s['k']} codes for every valid position of {args.store} -> {args.out or args.store}")
    return 0


def _train_faid(args: argparse.Namespace) -> int:
    from arrag.train.train_faid import FaidTrainConfig, train_faid

    train_faid(*_configs_from(args, FaidTrainConfig))
    return 0


def add_parsers(sub) -> None:
    """Add this group's subcommands to the CLI's subparsers."""
    from arrag.train.train_faid import FaidTrainConfig

    ct = sub.add_parser(
        "construct-train", help="FAiD training set: top-K retrieved codes for every position of a code store",
        description="For each image of a captioned code store and each valid target, retrieve the top-K codes "
                    "with the ground-truth neighbours (one batched search per chunk). Writes retrieved-*.npy "
                    "(int16 [n, h*w, K], -1 = none) beside the codes, resumable.")
    ct.add_argument("store", help="code store with captions (arrag encode on image-caption data)")
    ct.add_argument("--retriever", required=True, help="index folder built with the same tokenizer")
    ct.add_argument("--out", default=None, help="output folder (default: the store folder)")
    ct.add_argument("--k", "--retrieved-key-num", dest="retrieved_key_num", type=_int(1), default=10,
                    help="retrieved codes per position (default 10, as the original)")
    ct.add_argument("--exclude-self", action="store_true",
                    help="drop hits from the same image (when the index was built from this store)")
    ct.add_argument("--chunk-images", type=_int(1), default=256, help="images per batched search (default 256)")
    ct.add_argument("--nprobe", type=_int(1), default=None,
                    help="IVF lists probed (default: the index's; for the original prebuilt database the nprobe stored "
                         "in its file, with which the original built its training set)")
    _add_index_checks(ct)
    ct.add_argument("--shard", default=None,
                    help="process i of n (i/n): this process takes the store shards s with s %% n == i; default from "
                         "RANK/WORLD_SIZE (torchrun, accelerate launch)")
    _add_dist_timeout(ct)
    ct.add_argument("--device", default="cpu",
                    help="where the index is searched: cpu (memory-mapped, shared by the processes of a machine), "
                         "cuda (each process on its LOCAL_RANK's GPU) or cuda:N (default cpu)")
    ct.set_defaults(func=_construct_train)

    tf = sub.add_parser(
        "train-faid", help="train FAiD: LoRA + SmoothPatchBlenders on a construct-train set (accelerate)",
        description="Train FAiD from a base Janus-Pro: new blenders, peft LoRA on the language model, gen_head; "
                    "cross-entropy on image tokens with retrieved candidates. Run it plainly (one process) or "
                    "through `accelerate launch -m arrag train-faid ...` for several GPUs or machines. Writes "
                    "checkpoints (resumable with --resume) and, at the end, the merged model in the released layout.")
    F = FaidTrainConfig
    tf.add_argument("--base", required=True, help="base Janus-Pro checkpoint folder (config.json, weights, tokenizer)")
    tf.add_argument("--store", required=True, help="captioned code store encoded with the base model's VQ")
    tf.add_argument("--retrieved", default=_default(F, "retrieved"),
                    help="construct-train output folder (default: the store folder)")
    tf.add_argument("--out", default=_default(F, "out"),
                    help="output folder (default result/ckpts/ckpts_FAiD_b{num_blender}_h{hops})")
    tf.add_argument("--num-blender", type=_int(0), default=_default(F, "num_blender"),
                    help="a count of blenders, spread evenly over the layers; the config stores the interval "
                         "num_SmoothPatchBlender = layers // count, as the original (default %(default)s)")
    tf.add_argument("--num-hop", default=_default(F, "num_hop"),
                    help="hop sizes of each blender, from 1,2,3 (default %(default)s)")
    tf.add_argument("--faid-cells", default=_default(F, "faid_cells"), choices=["all", "valid"],
                    help="where blender output is added: every image cell, as the original (default), or only "
                         "at targets with retrieval (arrag's earlier variant)")
    tf.add_argument("--blender-init", default=_default(F, "blender_init"), choices=["original", "zero"],
                    help="new blenders' initialisation: the original's (default), or zero, where they add nothing "
                         "at step 0 and their gates start open at 0.5 (small models: the original's gates can start "
                         "saturated and close for good)")
    tf.add_argument("--retrieved-key-num", "--k", dest="retrieved_key_num", type=_int(1),
                    default=_default(F, "retrieved_key_num"),
                    help="retrieved codes per position; must match construct-train's --k (default %(default)s)")
    tf.add_argument("--lora-r", type=_int(0), default=_default(F, "lora_r"),
                    help="LoRA rank; 0 disables LoRA (default %(default)s)")
    tf.add_argument("--lora-alpha", type=_int(1), default=_default(F, "lora_alpha"),
                    help="LoRA alpha (default %(default)s)")
    tf.add_argument("--lora-dropout", type=_float(0, 1, open_high=True), default=_default(F, "lora_dropout"),
                    help="LoRA dropout (default %(default)s)")
    tf.add_argument("--lora-targets", default=_default(F, "lora_targets"),
                    help="comma-separated module names in the language model's layers (default %(default)s)")
    tf.add_argument("--lr", type=_float(0, open_low=True), default=_default(F, "lr"),
                    help="AdamW learning rate (default %(default)s)")
    tf.add_argument("--weight-decay", type=_float(0), default=_default(F, "weight_decay"),
                    help="AdamW weight decay (default %(default)s)")
    tf.add_argument("--batch-size", type=_int(1), default=_default(F, "batch_size"),
                    help="samples per process per micro-step (default %(default)s)")
    tf.add_argument("--grad-accum", type=_int(1), default=_default(F, "grad_accum"),
                    help="gradient accumulation steps (default %(default)s)")
    tf.add_argument("--epochs", type=_int(1), default=_default(F, "epochs"),
                    help="passes over the training set (default %(default)s)")
    tf.add_argument("--max-steps", type=_int(1), default=_default(F, "max_steps"),
                    help="stop after this many optimizer steps")
    tf.add_argument("--schedule", choices=["constant", "cosine"], default=_default(F, "schedule"),
                    help="learning-rate schedule after warm-up (default %(default)s)")
    tf.add_argument("--warmup-ratio", type=_float(0, 1, open_high=True), default=_default(F, "warmup_ratio"),
                    help="fraction of steps of linear warm-up (default %(default)s)")
    tf.add_argument("--max-grad-norm", type=_float(0), default=_default(F, "max_grad_norm"),
                    help="gradient-norm clip; 0 disables (default %(default)s)")
    tf.add_argument("--cfg-drop", type=_float(0, 1), default=_default(F, "cfg_drop"),
                    help="arrag's option: probability of training a sample on the unconditional prompt, without "
                         "retrieved features (default %(default)s)")
    tf.add_argument("--token-weights", default=None,
                    help="arrag's option: a .npy [images, h*w] of loss weights per image token, in store order "
                         "(e.g. more weight on objects); the loss is sum(w * ce) / sum(w). Default: the plain mean")
    tf.add_argument("--max-text-len", type=_int(8), default=_default(F, "max_text_len"),
                    help="prompt token limit (default %(default)s)")
    tf.add_argument("--seed", type=_int(0, 2**32 - 1), default=_default(F, "seed"),
                    help="seed for initialisation, order, shuffles (default %(default)s)")
    tf.add_argument("--save-every", type=_int(0), default=_default(F, "save_every"),
                    help="checkpoint every N optimizer steps (default %(default)s)")
    tf.add_argument("--keep-checkpoints", type=_int(1), default=_default(F, "keep_checkpoints"),
                    help="checkpoints kept (default %(default)s)")
    tf.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    tf.add_argument("--overwrite", action="store_true",
                    help="delete the checkpoints and train.json in --out and start over")
    tf.add_argument("--deepspeed", default=_default(F, "deepspeed"),
                    help="DeepSpeed config, e.g. arrag/train/zero3.json (ZeRO-3)")
    tf.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default=_default(F, "mixed_precision"),
                    help="default bf16 on CUDA, no (fp32) on CPU")
    tf.add_argument("--cpu", action="store_true", help="train on the CPU even when CUDA is present")
    _add_trust(tf)
    tf.add_argument("--num-workers", type=_int(0), default=_default(F, "num_workers"),
                    help="DataLoader workers per process (default %(default)s)")
    tf.set_defaults(func=_train_faid)
