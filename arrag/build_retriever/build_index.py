"""`arrag build-index`: code store -> (key, value) for every valid position of every image -> FAISS index.

Key = the neighbours' normalised codebook vectors, concatenated (`--key-source code`), or their stored
pre-quantisation latents (`latent`, as the original project did). Value = the code at the target.
Entry e is image e // P at valid position e % P (P valid targets per image), so FAISS ids need no side
table and the image of every hit is known. Keys are added in streaming chunks of images: memory beyond
the index itself stays flat as the database grows. Output is written to a temporary folder and renamed.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from arrag.errors import ArragError
from arrag.retrieval import index as fx
from arrag.retrieval.codestore import CodeStore
from arrag.retrieval.neighborhood import get_neighborhood, grid_key_vectors, keys_for_grid

INDEX_FORMAT = "arrag-index/1"


def chunk_keys(codes: np.ndarray, latents: np.ndarray | None, shape, codebook: np.ndarray, key_source: str):
    """Keys [c*P, d] float32 and values [c*P] uint16 for a chunk of code grids [c, h, w]."""
    if key_source == "code":
        pos, keys = grid_key_vectors(codes, codebook, shape)
    else:
        pos, nbr_lat = keys_for_grid(latents, shape)
        keys = nbr_lat.astype(np.float32)
    values = codes.reshape(len(codes), -1)[:, pos]
    return np.ascontiguousarray(keys.reshape(len(codes) * len(pos), -1), dtype=np.float32), values.reshape(-1)


def sample_training_keys(store: CodeStore, n_sample: int, shape, codebook: np.ndarray, key_source: str,
                         seed: int) -> np.ndarray:
    """A reproducible uniform sample of n_sample entries' keys [n_sample, d] (same seed, same sample)."""
    nb = get_neighborhood(shape)
    h, w = store.grid
    p = len(nb.positions(h, w))
    entries = np.sort(np.random.default_rng(seed).choice(store.num_images * p, n_sample, replace=False))
    images, inverse = np.unique(entries // p, return_inverse=True)
    codes = store.gather(images)
    latents = store.gather(images, "latents") if key_source == "latent" else None
    keys, _ = chunk_keys(codes, latents, nb, codebook, key_source)
    return keys.reshape(len(images), p, -1)[inverse, entries % p]


def build_index(store_dir: str | Path, out: str | Path, *, shape: str = "L", key_source: str = "code",
                factory: str = "auto", memory_budget: str | int = "16G", nprobe: int | None = None,
                train_size: int | None = None, seed: int = 0, chunk_images: int = 1024, gpus=None,
                overwrite: bool = False, progress: bool = True) -> dict:
    """Build the patch index of a code store into folder `out`; returns the manifest written there."""
    t0 = time.time()
    store = CodeStore.open(store_dir)
    nb = get_neighborhood(shape)
    if key_source not in ("code", "latent"):
        raise ArragError(f"--key-source {key_source!r}: choose code or latent")
    if key_source == "latent" and not store.has_latents:
        raise ArragError(f"--key-source latent needs latents in {store.folder}: encode with --save-latents")
    out = Path(out)
    if (out / "manifest.json").exists() and not overwrite:
        raise ArragError(f"{out} already holds an index; pass --overwrite to replace it")
    h, w = store.grid
    positions = nb.positions(h, w)
    p = len(positions)
    if p == 0:
        raise ArragError(f"a {h}x{w} grid has no valid target for the {nb.name!r} neighbourhood")
    n = store.num_images * p
    if n == 0:
        raise ArragError(f"code store {store.folder} holds no images")
    codebook = store.codebook()
    d = nb.key_dim(codebook.shape[1])
    budget = fx.parse_bytes(memory_budget)
    if factory == "auto":
        factory, reason = fx.choose_factory(n, d, budget)
    else:
        reason = "given with --factory"
    gpu_ids = fx.parse_gpus(gpus)
    index = fx.create_index(factory, d)
    if progress:
        print(f"[build-index] {n:,} entries ({store.num_images:,} images x {p} positions), d={d}: {factory} "
              f"({reason})")

    n_train = 0
    if not index.is_trained:
        n_train = train_size if train_size is not None else fx.train_sample_size(index, n)
        n_train = min(max(n_train, 1), n)
        sample = sample_training_keys(store, n_train, nb, codebook, key_source, seed)
        if progress:
            print(f"[build-index] training on {n_train:,} sampled entries (seed {seed})"
                  + (f" with GPUs {gpu_ids}" if gpu_ids else ""))
        fx.train(index, sample, gpu_ids)
        del sample

    tmp = out.with_name(out.name + ".tmp-build")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    values = np.lib.format.open_memmap(tmp / "values.npy", mode="w+", dtype=np.uint16, shape=(n,))
    lat_iter = store.iter_chunks(chunk_images, "latents") if key_source == "latent" else None
    bar = tqdm(total=store.num_images, desc="build-index", unit="img", disable=not progress)
    for i0, codes in store.iter_chunks(chunk_images, "codes"):
        latents = next(lat_iter)[1] if lat_iter is not None else None
        keys, vals = chunk_keys(codes, latents, nb, codebook, key_source)
        index.add(keys)
        values[i0 * p:(i0 + len(codes)) * p] = vals
        bar.update(len(codes))
    bar.close()
    if index.ntotal != n:
        raise RuntimeError(f"index holds {index.ntotal} entries, expected {n}")
    values.flush()
    del values
    nlist = fx.nlist_of(index)
    nprobe = nprobe if nprobe is not None else (fx.default_nprobe(nlist) if nlist else None)
    fx.write_index(index, tmp / "index.faiss")
    manifest = {
        "format": INDEX_FORMAT,
        "neighborhood": {"shape": nb.name, "offsets": [list(o) for o in nb.offsets], "causal": nb.causal},
        "key_source": key_source,
        "dim": d,
        "metric": "L2",
        "factory": factory,
        "factory_reason": reason,
        "index_type": fx.describe(index),
        "entries": int(n),
        "images": store.num_images,
        "entries_per_image": p,
        "grid": [h, w],
        "positions": positions.tolist(),
        "nlist": nlist,
        "nprobe": nprobe,
        "values": "values.npy",
        "vq_fingerprint": store.fingerprint,
        "store": str(Path(store_dir).resolve()),
        "build": {"seed": seed, "train_size": int(n_train),
                  "memory_budget": budget, "chunk_images": chunk_images, "gpus": gpu_ids,
                  "seconds": round(time.time() - t0, 2)},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    if progress:
        print(f"[build-index] wrote {out} ({n:,} entries, {manifest['build']['seconds']} s)")
    return manifest
