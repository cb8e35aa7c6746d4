"""Databases: `arrag encode`, `build-index`, `merge-index`, `verify-index`, `search-stats`."""

from __future__ import annotations

import argparse
from pathlib import Path

from arrag.cli.common import (
    _add_device,
    _add_dist_timeout,
    _add_index_checks,
    _add_trust,
    _float,
    _index_check,
    _int,
    _result_file,
    _write_result,
)
from arrag.errors import ArragError
from arrag.image_io import MAX_IMAGE_SIZE


def _encode(args: argparse.Namespace) -> int:
    from arrag.build_retriever.encode import encode

    r = encode(args.source, args.out, args.vq, vq_preset=args.vq_preset, image_size=args.image_size,
               batch_size=args.batch_size, shard_size=args.shard_size, num_workers=args.workers,
               save_latents=args.save_latents, shard=args.shard, device=args.device, min_size=args.min_size,
               max_images=args.max_images, resize=args.resize, trust_checkpoint=args.trust_checkpoint,
               dist_timeout=args.dist_timeout)
    state = "complete: manifest.json written" if r.complete else "other shards still pending (rerun to finish)"
    print(f"{r.summary()}; store {r.folder} {state}")
    return 0


def _build_index(args: argparse.Namespace) -> int:
    from arrag.build_retriever.build_index import build_index

    build_index(args.store, args.out, shape=args.shape, key_source=args.key_source, factory=args.factory,
                memory_budget=args.memory_budget, nprobe=args.nprobe, train_size=args.train_size, seed=args.seed,
                chunk_images=args.chunk_images, gpus=args.gpus, overwrite=args.overwrite, dedup=not args.no_dedup,
                shard=args.shard, train_only=args.train_only, target_recall=args.target_recall,
                dist_timeout=args.dist_timeout, hnsw_above=args.hnsw_above)
    return 0


def _merge_index(args: argparse.Namespace) -> int:
    from arrag.build_retriever.build_index import merge_index

    merge_index(args.index)
    return 0


def _verify_index(args: argparse.Namespace) -> int:
    from arrag.retrieval import index as faiss_index
    from arrag.retrieval.retriever import ORIGINAL_INDEX, _read_manifest, check_index_files, check_manifest_figures

    folder = Path(args.index)
    if not (folder / "manifest.json").is_file():
        hint = " (the original prebuilt database records no checksums)" if (folder / ORIGINAL_INDEX).exists() else ""
        raise ArragError(f"{folder} has no manifest.json: nothing records what its files should hold{hint}")
    manifest = _read_manifest(folder / "manifest.json")
    got = check_index_files(folder, manifest, hash_below=1 << 62, progress=True)
    layout = manifest.get("layout", "single")
    index = faiss_index.read_shard_files(folder, manifest["shard_files"]) if layout == "shards" else \
        faiss_index.read_index(folder / "index.faiss", mmap=layout == "single", ondisk=layout == "ondisk")
    checked = check_manifest_figures(folder, manifest, index)
    digest = {"matches": "the manifest's own digest matches its content",
              "absent": f"the manifest ({manifest.get('format')}) predates digests: only the figures below could be "
                        "checked"}[got["digest"]]
    print(f"{folder}: all {got['files']} files intact ({got['bytes'] / 2**30:.2f} GiB hashed, every checksum matches "
          f"the manifest); {digest}; its {', '.join(checked)} agree with the files")
    return 0


def _search_stats(args: argparse.Namespace) -> int:
    from arrag.retrieval import index as faiss_index
    from arrag.retrieval.codestore import CodeStore
    from arrag.retrieval.index import sample_stored_vectors
    from arrag.retrieval.keys import sample_entry_keys
    from arrag.retrieval.recall import (
        distinct_codes_per_topk,
        list_balance,
        nprobe_sweep,
        queries_per_second,
        recall_at_k,
    )
    from arrag.retrieval.retriever import PatchRetriever

    if args.seed < 0 or args.queries < 0 or args.recall_k < 1:
        raise ArragError("--seed and --queries must be >= 0 and --k >= 1")
    if args.json:
        _result_file(args.json, "search-stats", lambda r: "entries" in r and "index" in r, "--json")
    r = PatchRetriever.load(args.index, device=args.device, nprobe=args.nprobe, verify=_index_check(args))
    m = r.manifest
    stats = {"index": str(args.index), "entries": r.entries, "occurrences": m.get("occurrences", r.entries),
             "dedup_ratio": m.get("dedup_ratio", 1.0), "type": m.get("index_type"),
             "factory": m.get("factory"), "nlist": m.get("nlist"), "nprobe": r.nprobe,
             "memory_bytes": faiss_index.index_memory_bytes(r.index) if r.backend == "faiss-cpu" else None,
             "backend": r.backend,
             "key_source": m.get("key_source"), "neighborhood": m["neighborhood"]["shape"],
             "vq_fingerprint": m.get("vq_fingerprint")}
    balance = list_balance(r)
    if balance:
        stats.update(balance)
    store_dir = args.store or m.get("store")
    if args.queries > 0 and store_dir:
        store = CodeStore.open(store_dir)
        r.check_store(store)
        queries = sample_entry_keys(store, args.queries, args.seed, r.neighborhood, m["key_source"])
        stats[f"recall@{args.recall_k}"] = recall_at_k(r, store, queries, args.recall_k)
        stats[f"distinct_codes@{args.recall_k}"] = round(distinct_codes_per_topk(r, queries, args.recall_k), 2)
        stats["queries_per_s"] = {b: queries_per_second(r, queries, args.recall_k, b) for b in (1, 16, 64)}
        if m.get("nlist") and not args.no_sweep:
            stats["nprobe_sweep"] = nprobe_sweep(r, store, queries, args.recall_k)
    elif args.queries > 0 and m.get("nlist") and not args.no_sweep:  # no store (the original database)
        queries = sample_stored_vectors(r.index, args.queries, args.seed)
        stats["nprobe_sweep"] = nprobe_sweep(r, None, queries, args.recall_k)
    sweep = stats.pop("nprobe_sweep", None)
    for key, value in stats.items():
        print(f"{key:16} {value}")
    if sweep:
        label = "recall@" + str(args.recall_k) if "recall" in sweep[0] else "share of all-list hits"
        print(f"{'nprobe':>8} {label:>24} {'queries/s (batch 16)':>22}")
        for row in sweep:
            print(f"{row['nprobe']:8d} {row.get('recall', row.get('recall_vs_all_lists')):24.4f} "
                  f"{row['queries_per_s']:22,.0f}")
        stats["nprobe_sweep"] = sweep
    if args.json:
        _write_result(Path(args.json), "search-stats", stats)
    return 0


def add_parsers(sub) -> None:
    """Add this group's subcommands to the CLI's subparsers."""

    enc = sub.add_parser(
        "encode", help="encode images into a code store (first half of build_retriever.sh)",
        description="Images -> resize + centre crop -> VQ codes, written as a sharded code store (manifest.json, "
                    "codes-*.npy). Resumable: finished shards are skipped on rerun.")
    enc.add_argument("source", nargs="+",
                     help="one or more image sources, encoded into one store in the order given: a folder of images "
                          "(recursive), webdataset .tar shards (file, folder or shard-{000..009}.tar; also "
                          "http(s):// URLs and pipe: commands such as 'pipe:aws s3 cp s3://bucket/shard-0.tar -'), "
                          "parquet files as img2dataset writes them (file, folder, pattern or URL), a saved HF "
                          "dataset folder, or a hub dataset name")
    enc.add_argument("--out", required=True, help="code store folder")
    enc.add_argument("--vq", required=True,
                     help="the tokenizer: LlamaGen's vq_ds16_t2i.pt, an arrag .safetensors, a Janus-Pro model folder "
                          "(its own VQ), or a hub id such as peizesun/llamagen_t2i/vq_ds16_t2i.pt or "
                          "deepseek-ai/Janus-Pro-1B")
    enc.add_argument("--vq-preset", default=None, help="VQ architecture preset (default: from the file, else VQ-16)")
    enc.add_argument("--image-size", type=_int(1, MAX_IMAGE_SIZE), default=None,
                     help="crop size in pixels (default: the tokenizer's, 384 = 24x24 tokens for VQ-16)")
    enc.add_argument("--batch-size", type=_int(1), default=32, help="images per encoder batch (default 32)")
    enc.add_argument("--shard-size", type=_int(1), default=4096, help="images per shard file (default 4096)")
    enc.add_argument("--workers", type=_int(0), default=None,
                     help="DataLoader processes decoding images (default: the CPUs available, at most 16)")
    enc.add_argument("--resize", default="original", choices=["original", "adm"],
                     help="original: Resize(short side, bilinear) + CenterCrop, as AR-RAG encoded its database "
                          "(default); adm: LlamaGen's crop (BOX halving, bicubic)")
    enc.add_argument("--save-latents", action="store_true", help="also store float16 latents (for latent keys)")
    enc.add_argument("--shard", default=None,
                     help="process i of n (i/n) of a job array (each encodes its units and exits; the last to finish, "
                          "or a final run without --shard, writes the manifest); under torchrun leave it out")
    _add_dist_timeout(enc)
    enc.add_argument("--min-size", type=_int(0), default=64, help="skip images with a side below this (default 64)")
    enc.add_argument("--max-images", type=_int(1), default=None, help="encode only the first N images")
    _add_trust(enc)
    _add_device(enc)
    enc.set_defaults(func=_encode)

    bi = sub.add_parser(
        "build-index", help="build the FAISS patch index from a code store (second half of build_retriever.sh)",
        description="Code store -> (neighbourhood key, target code) for every valid position -> FAISS index, "
                    "de-duplicated with counts. Writes manifest.json, index.faiss, values.npy and the counts to "
                    "--out; with --shard i/n, one part of a parallel build (then `arrag merge-index`).")
    bi.add_argument("store", help="code store folder written by `arrag encode`")
    bi.add_argument("--out", required=True, help="index folder (e.g. data/retriever/index_L)")
    bi.add_argument("--shape", default="L", help="neighbourhood: L (default), 2hop or ring")
    bi.add_argument("--key-source", default="code", choices=["code", "latent"],
                    help="keys from normalised codebook rows (default) or stored latents (original project)")
    bi.add_argument("--factory", default="auto",
                    help="'auto' (by size and budget), a FAISS factory string, or IVF<nlist>,CodePQ (code keys stored "
                         "as their codes: about 15 bytes an entry, exact distances)")
    bi.add_argument("--memory-budget", default="auto",
                    help="RAM the index may need to search: --factory auto picks an index under it, and a build whose "
                         "estimate exceeds it is refused before training; a size such as 64G, or auto, 3/4 of this "
                         "machine's memory (default auto)")
    bi.add_argument("--hnsw-above", type=_int(1), default=None,
                    help="entries from which --factory auto uses an HNSW32 coarse quantiser over 2^16-2^18 lists "
                         "(default 50,000,000)")
    bi.add_argument("--nprobe", type=_int(1), default=None,
                    help="nprobe stored in the manifest (default: the smallest reaching --target-recall)")
    bi.add_argument("--target-recall", type=_float(0, 1, open_low=True), default=0.95,
                    help="recall@10 against probing every list that the tuned nprobe must reach (default 0.95)")
    bi.add_argument("--train-size", type=_int(1), default=None, help="training sample size (default by index type)")
    bi.add_argument("--seed", type=_int(0), default=0, help="seed of the training sample (default 0)")
    bi.add_argument("--chunk-images", type=_int(1), default=1024, help="images per streaming add (default 1024)")
    bi.add_argument("--gpus", default="auto",
                    help="GPUs for the coarse k-means: auto, cpu, or ids such as 0,1 (FAISS's GPU k-means with "
                         "faiss-gpu, else torch's on the first CUDA device)")
    bi.add_argument("--overwrite", action="store_true", help="replace an existing index in --out")
    bi.add_argument("--no-dedup", action="store_true",
                    help="store every occurrence of a (key, value) pair; by default each distinct pair is stored "
                         "once with its count and images, and searches expand hits by their counts (same results)")
    bi.add_argument("--shard", default=None,
                    help="rank i of n (i/n) of a job array's build: after --train-only, each rank adds its part and "
                         "exits; then `arrag merge-index OUT`. Under torchrun or accelerate launch leave it out: the "
                         "ranks coordinate through torch.distributed (rank 0 trains, merges and writes the manifest)")
    bi.add_argument("--train-only", action="store_true",
                    help="train the quantizer of a job array's build into OUT/parts and stop: the first step, before "
                         "the ranks (--shard i/n) and merge-index (under torchrun rank 0 trains it)")
    _add_dist_timeout(bi)
    bi.set_defaults(func=_build_index)

    mi = sub.add_parser("merge-index", help="join the parts of a parallel build-index into one index",
                        description="Join OUT/parts/rank-*-of-n (written by `arrag build-index --shard i/n`) into the "
                                    "index in OUT: IVF indexes into one index with on-disk inverted lists (FAISS's "
                                    "merge; searched by memory map), other factories as index shards.")
    mi.add_argument("index", help="the --out folder of the parallel build")
    mi.set_defaults(func=_merge_index)

    vi = sub.add_parser("verify-index", help="hash every file of a patch index against its manifest",
                        description="Read every file an index's manifest records and check its size and blake2b "
                                    "checksum (loading an index over --hash-below only checks sizes).")
    vi.add_argument("index", help="index folder")
    vi.set_defaults(func=_verify_index)

    ss = sub.add_parser("search-stats", help="entries, memory, index type, nprobe and recall of a patch index",
                        description="Describe a patch index and estimate recall@k against exact search on a "
                                    "seeded sample of entries of its code store, plus queries/s at batch 1/16/64.")
    ss.add_argument("index", help="index folder")
    ss.add_argument("--store", default=None, help="code store for recall (default: the one in the manifest)")
    ss.add_argument("--queries", type=_int(0), default=200, help="sampled queries for recall; 0 skips (default 200)")
    ss.add_argument("--k", dest="recall_k", type=_int(1), default=10, help="k for recall@k (default 10)")
    ss.add_argument("--nprobe", type=_int(1), default=None, help="override the manifest's nprobe")
    ss.add_argument("--seed", type=_int(0), default=0, help="seed of the query sample (default 0)")
    _add_index_checks(ss)
    ss.add_argument("--device", default="cpu", help="cpu, cuda or GPU ids (default cpu)")
    ss.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ss.add_argument("--no-sweep", action="store_true",
                    help="skip the table of recall and speed at several nprobe values (IVF indexes)")
    ss.set_defaults(func=_search_stats)
