"""`arrag construct-train`: the FAiD training set, i.e. the top-K retrieved codes of every image position.

For each image of a code store with captions and each target valid for the retriever's neighbourhood,
the ground-truth neighbours form the query (the same keys the index was built from) and the K nearest
entries' codes are kept: int16 [n, h*w, K], -1 at invalid targets and where fewer than K were found.
One batched search per chunk of images. Written per code-store shard (`retrieved-00000.npy` beside
`codes-00000.npy`, under a temporary name, renamed when complete), so an interrupted run resumes.
With `exclude_self`, hits from the same image are dropped (the training images are in the database);
this needs the index to be built from this very store (entry e is image e // P).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from arrag import fileops
from arrag.distributed import DEFAULT_TIMEOUT, join
from arrag.errors import ArragError
from arrag.fileops import save_npy
from arrag.provenance import SettingsLock, made_by
from arrag.retrieval.codestore import CodeStore, is_store_folder
from arrag.retrieval.neighborhood import grid_key_vectors
from arrag.retrieval.retriever import PatchRetriever

FORMAT = "arrag-faid-trainset/1"


def retrieved_name(k: int) -> str:
    return f"retrieved-{k:05d}.npy"


def is_trainset_folder(folder: Path) -> bool:
    """True when `folder` is a code store or holds retrieved codes that construct-train wrote."""
    return is_store_folder(folder) or made_by(folder / "retrieved.json", "construct-train",
                                              legacy=lambda r: r.get("format") == FORMAT)


def construct_train(store_dir: str | Path, retriever_dir: str | Path, out: str | Path | None = None, *,
                    retrieved_key_num: int = 10,
                    exclude_self: bool = False, chunk_images: int = 256, nprobe: int | None = None,
                    progress: bool = True, verify_index: bool = True, shard: str | None = None,
                    device: str = "cpu", dist_timeout: float = DEFAULT_TIMEOUT) -> dict:
    """Write the retrieved codes of every shard of `store_dir` into `out` (default: the store folder).

    shard 'i/n' (or RANK/WORLD_SIZE from torchrun / accelerate launch): this process takes the store shards s with
    s % n == i; every process writes whole per-shard files, the same bytes as one process would. device: where the
    index is searched ('cuda' puts each process on its LOCAL_RANK's GPU); on the CPU the index is memory-mapped, so
    the processes of one machine share its pages."""
    k = retrieved_key_num  # K candidates per position (the original's retrieved_key_num)
    group, rank, world = join(shard, dist_timeout)
    store = CodeStore.open(store_dir)
    if not store.has_captions:
        raise ArragError(f"code store {store.folder} has no captions: encode image-caption data for FAiD training")
    if k < 1:
        raise ArragError(f"--k must be >= 1, got {k}")
    if chunk_images < 1:
        raise ArragError(f"--chunk-images must be >= 1, got {chunk_images}")
    out = Path(out) if out is not None else store.folder
    fileops.check_out_dir(out, what="FAiD training set folder", is_ours=is_trainset_folder(out))
    if device == "cuda" and world > 1:
        import os

        import torch

        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    retriever = PatchRetriever.load(retriever_dir, device=device, nprobe=nprobe, verify=verify_index,
                                    mmap=device == "cpu")
    retriever.check_store(store)
    same_store = Path(retriever.manifest.get("store", "")).resolve() == store.folder.resolve()
    if exclude_self and not same_store:
        raise ArragError("--exclude-self needs the index built from this code store (its manifest names "
                         f"{retriever.manifest.get('store')}); otherwise no image can retrieve itself")
    h, w = store.grid
    nb = retriever.neighborhood
    codebook = store.codebook()
    settings = {"format": FORMAT, "k": k, "exclude_self": exclude_self, "store": str(store.folder.resolve()),
                "retriever": str(retriever.folder.resolve()), "vq_fingerprint": store.fingerprint,
                "neighborhood": nb.name, "nprobe": retriever.nprobe, "grid": [h, w]}
    # Retrieved codes kept inside their own store (the default --out) belong to it wherever it is moved or
    # copied: its path is recorded but not held against a rerun there.
    in_store = out.resolve() == store.folder.resolve()
    lock = SettingsLock(out / "retrieved.json", settings, what="retrieved codes",
                        has_results=lambda: any(out.glob("retrieved-*.npy")), ignore=("store",) if in_store else (),
                        start_over=f"use another --out, or delete {out}/retrieved.json and {out}/retrieved-*.npy",
                        kind="construct-train")
    lock.check()
    out.mkdir(parents=True, exist_ok=True)
    fileops.sweep_stale_temps(out)
    bounds = np.cumsum([0] + [s["count"] for s in store.manifest["shards"]])
    todo = [s for s in range(len(bounds) - 1)
            if s % world == rank and not _retrieved_intact(out / retrieved_name(s), int(bounds[s + 1] - bounds[s]))]
    bar = tqdm(total=int(sum(bounds[s + 1] - bounds[s] for s in todo)), desc=f"construct-train [{rank}/{world}]",
               unit="img", disable=not progress)
    for s in todo:
        lo, hi = int(bounds[s]), int(bounds[s + 1])
        result = np.full((hi - lo, h * w, k), -1, dtype=np.int16)
        for i0, codes in store.iter_chunks(chunk_images, start=lo, stop=hi):
            pos, keys = grid_key_vectors(codes, codebook, nb)
            queries = keys.reshape(-1, keys.shape[-1])
            if exclude_self:  # every copy from the query's own image is dropped
                owners = np.repeat(np.arange(i0, i0 + len(codes)), len(pos))
                got = retriever.search_excluding(queries, k, owners)
            else:
                got = retriever.search(queries, k)[1]
            result[i0 - lo:i0 - lo + len(codes)][:, pos] = got.reshape(len(codes), len(pos), k)
            bar.update(len(codes))
        lock.record()
        save_npy(out / retrieved_name(s), result)
    bar.close()
    if group is not None:  # the job ends when every rank's shards are written
        group.barrier("construct-train: every rank's shards")
    return settings


def _retrieved_intact(path: Path, count: int) -> bool:
    try:
        return len(np.load(path, mmap_mode="r")) == count
    except (OSError, ValueError, EOFError):
        return False


class RetrievedCodes:
    """A store's retrieved codes, [N, h*w, K] int16 (-1 = none), read one image at a time from the per-shard files
    (through the store's RowReader; never concatenated, so a training process holds none of them)."""

    def __init__(self, folder: Path, store: CodeStore, k: int):
        self.folder, self.store, self.k = folder, store, k
        h, w = store.grid
        self.shape = (store.num_images, h * w, k)

    def __len__(self) -> int:
        return self.store.num_images

    def path(self, shard: int) -> Path:
        return self.folder / retrieved_name(shard)

    dtype = np.dtype(np.int16)

    def __getitem__(self, image):
        """[h*w, K] for one image (read with pread: CodeStore.read_rows); any other index reads the whole array first
        (for small stores and checks: nothing at scale does that)."""
        if isinstance(image, (int, np.integer)):
            k, row = self.store.shard_of(int(image))
            return self.store.read_rows(self.path(k), self.store.manifest["shards"][k]["count"], np.array([row]))[0]
        return np.asarray(self)[image]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = np.concatenate([self.store.mapped(self.path(s), shard["count"])
                                for s, shard in enumerate(self.store.manifest["shards"])])
        return whole if dtype is None else whole.astype(dtype)


def load_retrieved(folder: str | Path, store: CodeStore, retrieved_key_num: int | None = None) -> RetrievedCodes:
    """The retrieved codes of a store (see RetrievedCodes); checks K, the tokenizer and every shard file's length
    and shape once, up front."""
    folder = Path(folder)
    meta_path = folder / "retrieved.json"
    if not meta_path.exists():
        raise ArragError(f"no retrieved codes in {folder}: run `arrag construct-train` first")
    meta = json.loads(meta_path.read_text())
    if meta["vq_fingerprint"] != store.fingerprint:
        raise ArragError(f"retrieved codes in {folder} were built with another tokenizer (VQ {meta['vq_fingerprint']}"
                         f", store {store.fingerprint})")
    k = retrieved_key_num
    if k is not None and meta["k"] != k:
        raise ArragError(f"retrieved codes in {folder} have K={meta['k']}, asked for {k}; rerun construct-train")
    codes = RetrievedCodes(folder, store, int(meta["k"]))
    for s, shard in enumerate(store.manifest["shards"]):
        arr = store.load_shard_file(codes.path(s), shard["count"],
                                    what="rerun `arrag construct-train` with the same settings to finish it")
        if arr.shape[1:] != codes.shape[1:]:
            raise ArragError(f"{codes.path(s)} has shape {arr.shape}, expected [n, {codes.shape[1]}, {codes.k}]; "
                             "rerun `arrag construct-train`")
        del arr
    return codes
