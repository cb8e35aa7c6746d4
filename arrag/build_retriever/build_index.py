"""`arrag build-index`: code store -> (key, value) for every valid position of every image -> FAISS index.

Key = the neighbours' normalised codebook vectors, concatenated (`--key-source code`), or their stored
pre-quantisation latents (`latent`, as the original project did). Value = the code at the target.
Entry e is image e // P at valid position e % P (P valid targets per image), so FAISS ids need no side
table and the image of every hit is known. Keys are added in streaming chunks of images: memory beyond
the index itself stays flat as the database grows. Output is written to a temporary folder and renamed.
"""

from __future__ import annotations

import errno
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from arrag import fileops
from arrag.errors import ArragError
from arrag.retrieval import index as fx
from arrag.retrieval.codestore import CodeStore
from arrag.retrieval.neighborhood import get_neighborhood, grid_key_vectors, keys_for_grid

INDEX_FORMAT = "arrag-index/1"
# Every file build-index writes into its folder: the only files `--overwrite` may remove.
INDEX_FILES = (r"manifest\.json", r"index\.faiss", r"values\.npy")


def is_index_folder(folder: Path) -> bool:
    """True when `folder`'s manifest says build-index made it."""
    try:
        return str(json.loads((folder / "manifest.json").read_text()).get("format", "")).startswith("arrag-index/")
    except (OSError, ValueError, AttributeError):
        return False


def check_out_folder(store_dir: Path, out: Path, overwrite: bool) -> None:
    """Refuse an --out that would destroy the input store or anything build-index did not write."""
    if fileops.same_or_inside(store_dir, out):
        raise ArragError(f"--out {out} is or contains the code store {store_dir}; pass a folder outside the store")
    fileops.check_replaceable(out, what="index", is_ours=is_index_folder(out), owned=INDEX_FILES,
                              overwrite=overwrite)


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
    check_out_folder(store.folder, out, overwrite)
    if seed < 0:
        raise ArragError(f"--seed must be >= 0, got {seed}")
    if chunk_images < 1:
        raise ArragError(f"--chunk-images must be >= 1, got {chunk_images}")
    if nprobe is not None and nprobe < 1:
        raise ArragError(f"--nprobe must be >= 1, got {nprobe}")
    if train_size is not None and train_size < 1:
        raise ArragError(f"--train-size must be >= 1, got {train_size}")
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

    out.parent.mkdir(parents=True, exist_ok=True)
    fileops.sweep_stale_temps(out.parent)  # folders of runs that were killed
    tmp = fileops.temp_path(out)
    tmp.mkdir()
    try:
        _add_entries(tmp, index, store, nb, codebook, key_source, chunk_images, progress)
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
            "store": str(store.folder.resolve()),
            "files": {name: fileops.file_digest(tmp / name) for name in ("index.faiss", "values.npy")},
            "build": {"seed": seed, "train_size": int(n_train),
                      "memory_budget": budget, "chunk_images": chunk_images, "gpus": gpu_ids,
                      "seconds": round(time.time() - t0, 2)},
        }
        fileops.write_text(tmp / "manifest.json", json.dumps(manifest, indent=2) + "\n")
        fileops.replace_owned_dir(tmp, out, what="index", is_ours=is_index_folder(out), owned=INDEX_FILES,
                                  overwrite=overwrite)
    except BaseException as e:
        fileops.remove_owned_dir(tmp, what="temporary index", owned=INDEX_FILES)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise fileops.no_space_error(out) from None
        raise
    if progress:
        print(f"[build-index] wrote {out} ({n:,} entries, {manifest['build']['seconds']} s)")
    return manifest


def _add_entries(folder: Path, index, store: CodeStore, nb, codebook: np.ndarray, key_source: str,
                 chunk_images: int, progress: bool) -> None:
    """Stream every entry's key into `index` and its value into `folder`/values.npy, chunk by chunk."""
    p = len(nb.positions(*store.grid))
    n = store.num_images * p
    values = np.lib.format.open_memmap(folder / "values.npy", mode="w+", dtype=np.uint16, shape=(n,))
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
