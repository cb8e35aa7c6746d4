"""Retrieval benchmarks: key construction speed, build-index memory, code-store size, recall and queries/s.

    .venv/bin/python bench/retrieval.py            # ~5 min on 2 cores the first time (the store is cached)

1. Key construction throughput as a ratio to np.copy of the same output bytes (the memory bound).
   Target >= 0.5.
2. Peak RSS of `build-index` at two database sizes (same factory), minus the index's own bytes. Target: flat.
3. Code-store bytes per token and per image. Target: 2 bytes per token (the original HDF5 layout stored
   int32 codes plus float32 vectors: about 20 KB per 384-px image).
4. Recall@10 against exact search (tie-aware, see arrag.retrieval.recall) and queries/s at batch 1, 16, 64
   for the auto-chosen index on a >= 1M-entry database at its default nprobe. Target: recall >= 0.9.
The database: ShapesWorld images encoded by a seeded VQ-tiny-8 at 128 px (16x16 tokens, 210 entries each).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from arrag.build_retriever.encode import encode  # noqa: E402
from arrag.demo.shapes import ShapesWorld  # noqa: E402
from arrag.fileops import remove_owned_dir  # noqa: E402
from arrag.image_io import save_image  # noqa: E402
from arrag.retrieval.codestore import STORE_FILES, CodeStore  # noqa: E402
from arrag.retrieval.neighborhood import grid_key_vectors  # noqa: E402
from arrag.vq import VQModel  # noqa: E402
from bench.timing import best_of  # noqa: E402


def key_throughput() -> dict:
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16384, (1000, 24, 24)).astype(np.uint16)
    book = rng.normal(size=(16384, 8)).astype(np.float32)
    _, keys = grid_key_vectors(codes, book)
    src = np.ones(keys.nbytes // 4, np.float32)
    t_keys = best_of(lambda: grid_key_vectors(codes, book))
    t_copy = best_of(lambda: np.copy(src))
    return {"output_mb": keys.nbytes / 1e6, "keys_gb_s": keys.nbytes / t_keys / 1e9,
            "copy_gb_s": keys.nbytes / t_copy / 1e9, "ratio": t_copy / t_keys, "target": 0.5}


def make_store(out: Path, images: int, workers: int) -> Path:
    store = out / "store"
    if (store / "manifest.json").exists() and CodeStore.open(store).num_images == images:
        return store
    img_dir = out / "images"
    world = ShapesWorld("database", seed=0, size=128)
    for i in range(images):
        p = img_dir / f"{i // 1000:03d}" / f"{i:06d}.png"
        if not p.exists():
            save_image(world.image(i), p)
    torch.manual_seed(0)
    VQModel("VQ-tiny-8").save(out / "vq.safetensors")
    remove_owned_dir(store, what="code store", owned=STORE_FILES)
    encode(str(img_dir), store, out / "vq.safetensors", image_size=128, batch_size=64, shard_size=500,
           num_workers=workers)
    return store


def sub_store(store: Path, out: Path, shards: int) -> Path:
    """A store made of the first `shards` shards of another (files linked, manifest cut)."""
    remove_owned_dir(out, what="code store", owned=STORE_FILES)
    out.mkdir(parents=True)
    man = json.loads((store / "manifest.json").read_text())
    man["shards"] = man["shards"][:shards]
    man["num_images"] = sum(s["count"] for s in man["shards"])
    for s in man["shards"]:
        (out / s["codes"]).symlink_to((store / s["codes"]).resolve())
    (out / "codebook.npy").symlink_to((store / "codebook.npy").resolve())
    (out / "manifest.json").write_text(json.dumps(man))
    return out


def build_rss(store: Path, out: Path, factory: str) -> dict:
    """Build in a fresh process; return its peak RSS and the index size."""
    code = ("import resource, sys; from arrag.build_retriever.build_index import build_index; "
            f"m = build_index({str(store)!r}, {str(out)!r}, factory={factory!r}, train_size=65536, "
            "overwrite=True, progress=False); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, m['entries'], m['build']['seconds'])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    rss, entries, seconds = res.stdout.split()[-3:]
    index_bytes = (out / "index.faiss").stat().st_size
    return {"entries": int(entries), "peak_rss_mb": int(rss) / 2**20, "index_mb": index_bytes / 2**20,
            "rss_minus_index_mb": (int(rss) - index_bytes) / 2**20, "seconds": float(seconds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000, help="database images (210 entries each; default 5000)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--out", default="bench/out/retrieval")
    args = ap.parse_args()
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"torch_threads": torch.get_num_threads()}

    result["key_construction"] = kc = key_throughput()
    print(f"1. key construction: {kc['keys_gb_s']:.2f} GB/s vs np.copy {kc['copy_gb_s']:.2f} GB/s "
          f"-> ratio {kc['ratio']:.2f} (target >= 0.5)")

    store = make_store(out, args.images, args.workers)
    st = CodeStore.open(store)
    h, w = st.grid
    code_bytes = sum((store / s["codes"]).stat().st_size for s in st.manifest["shards"])
    result["store"] = sb = {"images": st.num_images, "grid": [h, w], "bytes": code_bytes,
                            "bytes_per_image": code_bytes / st.num_images,
                            "bytes_per_token": code_bytes / (st.num_images * h * w),
                            "bytes_per_384px_image_at_2B_per_token": 2 * 24 * 24,
                            "original_hdf5_bytes_per_384px_image": 576 * 4 + 576 * 8 * 4}
    print(f"3. code store: {sb['bytes_per_token']:.3f} bytes/token, {sb['bytes_per_image']:.0f} bytes per "
          f"{h}x{w} image (a 384-px image: {sb['bytes_per_384px_image_at_2B_per_token']} B vs "
          f"{sb['original_hdf5_bytes_per_384px_image']} B in the original layout)")

    shards = len(st.manifest["shards"])
    small = sub_store(store, out / "store_half", max(1, shards // 2))
    rss = {"half": build_rss(small, out / "idx_half", "IVF1024,PQ8x4"),
           "full": build_rss(store, out / "idx_full", "IVF1024,PQ8x4")}
    result["build_rss"] = rss
    for name, r in rss.items():
        print(f"2. build-index {name:4}: {r['entries']:>9,} entries, peak RSS {r['peak_rss_mb']:.0f} MiB, index "
              f"{r['index_mb']:.0f} MiB, RSS - index {r['rss_minus_index_mb']:.0f} MiB ({r['seconds']:.1f} s)")
    growth = rss["full"]["rss_minus_index_mb"] / rss["half"]["rss_minus_index_mb"]
    print(f"   RSS - index grows {growth:.2f}x for {rss['full']['entries'] / rss['half']['entries']:.1f}x entries "
          "(target: flat)")

    from arrag.build_retriever.build_index import build_index
    from arrag.retrieval.keys import sample_entry_keys
    from arrag.retrieval.recall import queries_per_second, recall_at_k
    from arrag.retrieval.retriever import PatchRetriever

    auto_dir = out / "idx_auto"
    if not (auto_dir / "manifest.json").exists():
        build_index(store, auto_dir, overwrite=True)
    r = PatchRetriever.load(auto_dir)
    queries = sample_entry_keys(st, args.queries, seed=1)
    recall = recall_at_k(r, st, queries, 10)
    qps = {b: queries_per_second(r, queries, 10, b) for b in (1, 16, 64)}
    result["search"] = {"entries": r.entries, "factory": r.manifest["factory"], "nprobe": r.nprobe,
                        "recall@10": recall, "queries_per_s": qps, "target_recall": 0.9}
    print(f"4. {r.manifest['factory']} over {r.entries:,} entries, nprobe {r.nprobe}: recall@10 {recall:.3f} "
          f"(target >= 0.9); queries/s " + ", ".join(f"batch {b}: {v:,.0f}" for b, v in qps.items()))
    (out / "retrieval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'retrieval.json'}")


if __name__ == "__main__":
    main()
