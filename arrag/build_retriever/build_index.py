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
from arrag.retrieval import index as faiss_index
from arrag.retrieval.codestore import CodeStore
from arrag.retrieval.keys import KEY_SOURCES, grid_entries, sample_entry_keys
from arrag.retrieval.neighborhood import get_neighborhood

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


def build_index(store_dir: str | Path, out: str | Path, *, shape: str = "L", key_source: str = "code",
                factory: str = "auto", memory_budget: str | int = "16G", nprobe: int | None = None,
                train_size: int | None = None, seed: int = 0, chunk_images: int = 1024, gpus=None,
                overwrite: bool = False, progress: bool = True) -> dict:
    """Build the patch index of a code store into folder `out`; returns the manifest written there."""
    t0 = time.time()
    store = CodeStore.open(store_dir)
    nb = get_neighborhood(shape)
    if key_source not in KEY_SOURCES:
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
    budget = faiss_index.parse_bytes(memory_budget)
    if factory == "auto":
        factory, reason = faiss_index.choose_factory(n, d, budget)
    else:
        reason = "given with --factory"
    gpu_ids = faiss_index.parse_gpus(gpus)
    index = faiss_index.create_index(factory, d)
    if progress:
        print(f"[build-index] {n:,} entries ({store.num_images:,} images x {p} positions), d={d}: {factory} "
              f"({reason})")

    n_train = 0
    if not index.is_trained:
        n_train = train_size if train_size is not None else faiss_index.train_sample_size(index, n)
        n_train = min(max(n_train, 1), n)
        sample = sample_entry_keys(store, n_train, seed, nb, key_source)
        if progress:
            print(f"[build-index] training on {n_train:,} sampled entries (seed {seed})"
                  + (f" with GPUs {gpu_ids}" if gpu_ids else ""))
        faiss_index.train(index, sample, gpu_ids)
        del sample

    out.parent.mkdir(parents=True, exist_ok=True)
    fileops.sweep_stale_temps(out.parent)  # folders of runs that were killed
    tmp = fileops.temp_path(out)
    tmp.mkdir()
    try:
        _add_entries(tmp, index, store, nb, codebook, key_source, chunk_images, progress)
        nlist = faiss_index.nlist_of(index)
        nprobe = nprobe if nprobe is not None else (faiss_index.default_nprobe(nlist) if nlist else None)
        faiss_index.write_index(index, tmp / "index.faiss")
        manifest = {
            "format": INDEX_FORMAT,
            "neighborhood": {"shape": nb.name, "offsets": [list(o) for o in nb.offsets], "causal": nb.causal},
            "key_source": key_source,
            "dim": d,
            "metric": "L2",
            "factory": factory,
            "factory_reason": reason,
            "index_type": faiss_index.describe(index),
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
        keys, vals = grid_entries(codes, latents, nb, codebook, key_source)
        index.add(keys)
        values[i0 * p:(i0 + len(codes)) * p] = vals
        bar.update(len(codes))
    bar.close()
    if index.ntotal != n:
        raise RuntimeError(f"index holds {index.ntotal} entries, expected {n}")
    values.flush()
    del values
