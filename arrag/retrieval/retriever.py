"""PatchRetriever: load a patch index (ours or the original AR-RAG prebuilt one) and search it in batches.

search(queries [Q, D], k) -> (distances [Q, k] float32, codes [Q, k] int64), code -1 where fewer than k
entries exist. NumPy in, NumPy out; torch in, torch out on the same device. With GPU FAISS and CUDA
tensors, the search and the id -> code lookup stay on the GPU (no host round trip). A de-duplicated
index answers as the full one would: each hit is repeated by its count (retrieval.dedup). Indexes
merged from parallel builds load too: on-disk inverted lists (memory-mapped) or index shards.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from arrag import fileops
from arrag.errors import ArragError, one_line
from arrag.retrieval import index as faiss_index
from arrag.retrieval import torch_search
from arrag.retrieval.dedup import copies_in_top, expand
from arrag.retrieval.neighborhood import Neighborhood, get_neighborhood
from arrag.retrieval.torch_search import TorchIndex

ORIGINAL_INDEX, ORIGINAL_VALUES = "faiss_ivf_pq_opq.index", "next_codes.npy"


class PatchRetriever:
    def __init__(self, index, values: np.ndarray, manifest: dict, folder: Path, gpus: list[int]):
        self.index = index  # a faiss index (CPU or GPU) or a TorchIndex
        # Plain ndarray views of memory-mapped files (still mapped, nothing read): indexing a np.memmap goes
        # through its Python __getitem__, a cost paid on every decoding step.
        self.values = np.asarray(values)
        self.manifest = manifest
        self.folder = folder
        self.gpus = gpus
        self._values_torch: dict[str, torch.Tensor] = {}
        self._counts_torch: dict[str, torch.Tensor] = {}
        self.counts = np.asarray(self._array("counts.npy", len(values))) if manifest.get("dedup") else None
        self._csr: tuple[np.ndarray, np.ndarray] | None = None
        self._entry_codes: np.ndarray | None = None
        self.set_nprobe(manifest.get("nprobe"))

    def _array(self, name: str, length: int) -> np.ndarray:
        try:
            arr = np.load(self.folder / name, mmap_mode="r")
        except (ValueError, OSError, EOFError) as e:
            raise ArragError(f"cannot read {self.folder / name} ({one_line(e)}); rebuild the index") from None
        if len(arr) != length:
            raise ArragError(f"{self.folder / name} has {len(arr)} rows, the index {length}; rebuild the index")
        return arr

    @property
    def backend(self) -> str:
        """Where searches run: 'faiss-cpu', 'faiss-gpu' or 'torch:<device>'."""
        if isinstance(self.index, TorchIndex):
            return "torch:" + ",".join(str(d) for d in self.index.devices)
        return "faiss-gpu" if self.gpus else "faiss-cpu"

    # -- loading ------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: str | Path, device: str | int | list[int] = "cpu", nprobe: int | None = None,
             mmap_values: bool = True, verify: bool = True, backend: str = "auto",
             gpu_fallback: bool = False, mmap: bool = False) -> PatchRetriever:
        """Load from `folder`: our layout (manifest.json, index.faiss, values.npy) or the original prebuilt one.

        device: "cpu", "cuda" (every GPU, sharded), "cuda:1", or a list of GPU ids. nprobe overrides the
        manifest's default. On GPUs the index goes to faiss-gpu when it is installed, else (Flat and IVF-Flat) to
        the torch search backend, which also serves CodePQ indexes (always); `backend` "torch" or "faiss"
        forces one. `gpu_fallback`: stay on the CPU, with a notice, when neither can serve the index on the GPU
        (a PQ index without faiss-gpu). File sizes are always checked against the manifest; `verify` also
        checks their hashes when the files total at most HASH_BELOW bytes (an int: that many bytes; False: sizes
        only, `--no-verify-index`), since hashing reads everything (~1 s per GB) in every process that loads the
        index; `arrag verify-index` hashes any index in full. `mmap`
        maps a single-file index instead of reading it into memory (merged on-disk indexes are always mapped).
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise ArragError(f"retriever not found: {folder} (build one with `arrag build-index`)")
        if nprobe is not None and nprobe < 1:
            raise ArragError(f"--nprobe must be >= 1, got {nprobe}")
        if (folder / "manifest.json").exists():
            manifest = _read_manifest(folder / "manifest.json")
            values_path = folder / manifest.get("values", "values.npy")
            check_index_files(folder, manifest, hash_below=HASH_BELOW if verify is True else int(verify),
                              allow_unverified=verify is False)
            layout = manifest.get("layout", "single")
            if layout == "shards":
                index = faiss_index.read_shard_files(folder, manifest["shard_files"])
            else:
                index = faiss_index.read_index(folder / "index.faiss", mmap=mmap, ondisk=layout == "ondisk")
        elif (folder / ORIGINAL_INDEX).exists():
            warnings.warn(f"{folder} is the original AR-RAG prebuilt database: its tokenizer cannot be verified "
                          "(no fingerprint); it was built with LlamaGen's vq_ds16_t2i.pt and latent keys",
                          stacklevel=2)
            index = faiss_index.read_index(folder / ORIGINAL_INDEX)
            values_path = folder / ORIGINAL_VALUES
            nlist = faiss_index.nlist_of(index)
            # The original set `nprobe` on the OPQ wrapper, where FAISS ignores it: it really searched with the
            # nprobe stored in this file (1, FAISS's default, for an index its build_index_L.py wrote).
            stored = faiss_index.stored_nprobe(index)
            manifest = {"format": "ar-rag-original", "neighborhood": {"shape": "L"}, "key_source": "latent",
                        "dim": index.d, "metric": "L2", "entries": int(index.ntotal), "nlist": nlist,
                        "nprobe": stored, "nprobe_source": f"stored in {ORIGINAL_INDEX}, as the original searched",
                        "vq_fingerprint": None, "index_type": faiss_index.describe(index)}
            if stored is not None:
                print(f"arrag: {folder}: the original prebuilt database; searching {stored} of its {nlist} lists, the "
                      "nprobe stored in its index file, with which the original searched" +
                      (f" (--nprobe {nprobe} given instead)" if nprobe is not None else " (--nprobe widens it)"),
                      file=sys.stderr)
        else:
            raise ArragError(f"{folder} holds no index: expected manifest.json + index.faiss, or the original "
                             f"{ORIGINAL_INDEX} + {ORIGINAL_VALUES}")
        if not values_path.exists():
            raise ArragError(f"{folder}: values file {values_path.name} is missing")
        try:
            values = np.load(values_path, mmap_mode="r" if mmap_values else None)
        except (ValueError, OSError, EOFError) as e:
            raise ArragError(f"cannot read {values_path} ({one_line(e)}): the file is truncated "
                             "or damaged; rebuild the index") from None
        if len(values) != index.ntotal:
            raise ArragError(f"{folder}: {values_path.name} has {len(values)} values but the index has "
                             f"{index.ntotal} entries")
        if manifest.get("format") != "ar-rag-original":
            check_manifest_figures(folder, manifest, index)
        if nprobe is not None:
            manifest = {**manifest, "nprobe": int(nprobe)}
        if backend not in ("auto", "faiss", "torch"):
            raise ArragError(f"retriever backend {backend!r}: choose auto, faiss or torch")
        spec = _gpu_spec(device)
        if backend == "torch":
            target = "cpu" if spec is None else torch_search.torch_devices(spec)
            return cls(TorchIndex.from_faiss(index, target), values, manifest, folder, [])
        # faiss-gpu's IVF-PQ takes 8-bit codes with residuals only: a CodePQ index goes to the torch backend.
        if spec is not None and backend == "auto" and (not faiss_index.has_gpu_faiss()
                                                       or faiss_index.is_code_pq(index)):
            if torch.cuda.is_available() and torch_search.supports(index):
                return cls(TorchIndex.from_faiss(index, torch_search.torch_devices(spec)), values, manifest, folder, [])
            reason = ("no CUDA device" if not torch.cuda.is_available() else
                      f"{faiss_index.describe(index)} needs faiss-gpu (the torch backend serves Flat, IVF-Flat "
                      "and CodePQ)")
            if gpu_fallback:
                warnings.warn(f"retriever {folder} stays on the CPU: {reason}", stacklevel=2)
                return cls(index, values, manifest, folder, [])
            raise ArragError(f"cannot put the index {folder} on the GPU: {reason}; install faiss-gpu, build a Flat or "
                             "IVF-Flat index (--factory), or search on the CPU (--retriever-device cpu)")
        gpus = faiss_index.parse_gpus(spec)
        if gpus:
            index = faiss_index.to_gpus(index, gpus, shard=True)
        return cls(index, values, manifest, folder, gpus)

    # -- facts --------------------------------------------------------------------------------------------
    @property
    def neighborhood(self) -> Neighborhood:
        return get_neighborhood(self.manifest["neighborhood"]["shape"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def entries(self) -> int:
        return int(self.index.ntotal)

    @property
    def fingerprint(self) -> str | None:
        return self.manifest.get("vq_fingerprint")

    def check_store(self, store) -> None:
        """Refuse a code store this index cannot be used with: encoded by another tokenizer (VQ fingerprint), or
        on another grid. The original prebuilt database records neither and is not checked."""
        if self.fingerprint is not None and self.fingerprint != store.fingerprint:
            raise ArragError(f"code store {store.folder} (VQ {store.fingerprint}) and retriever {self.folder} "
                             f"(VQ {self.fingerprint}) were built with different tokenizers (or one of them by "
                             "arrag < 0.2, whose fingerprints differ: rebuild the older one)")
        grid = self.manifest.get("grid")
        if grid is not None and tuple(grid) != store.grid:
            raise ArragError(f"code store {store.folder} holds {store.grid[0]}x{store.grid[1]} grids, the index "
                             f"{self.folder} {grid[0]}x{grid[1]}; encode both at one --image-size")

    def settings(self) -> dict:
        """What a generation's sidecar records about the retriever it searched."""
        return {"nprobe": self.nprobe, "retriever": str(self.folder), "retriever_entries": self.entries,
                "retriever_fingerprint": self.fingerprint}

    def set_nprobe(self, nprobe: int | None) -> None:
        if isinstance(self.index, TorchIndex):
            if self.index.nlist and nprobe is not None:
                self.index.nprobe = int(min(nprobe, self.index.nlist))
            self.nprobe = self.index.nprobe
        else:
            self.nprobe = faiss_index.set_nprobe(self.index, nprobe)

    def check_compatible(self, vq, allow_unknown: bool = False) -> None:
        """Refuse a retriever whose VQ fingerprint differs from the model's (or is unknown, unless allowed)."""
        mine = self.fingerprint
        if mine is None:
            if not allow_unknown:
                raise ArragError(f"retriever {self.folder} has no VQ fingerprint (original prebuilt database); "
                                 "pass --allow-unknown-vq if it was built with this model's tokenizer")
            return
        if not vq.matches(mine):
            raise ArragError(f"retriever {self.folder} was built with another tokenizer (VQ fingerprint {mine}, "
                             f"model {vq.fingerprint()}); rebuild it with this model's VQ (an index built by arrag "
                             "< 0.2 on a GPU also needs a rebuild, or --allow-unknown-vq if you know it matches)")

    # -- search -------------------------------------------------------------------------------------------
    def search(self, queries, k: int, with_ids: bool = False):
        """Batched k-NN: queries [Q, D] -> (squared-L2 distances [Q, k], codes [Q, k] int64; -1 = no entry), and
        with_ids the entries' ids [Q, k] int64 last (a de-duplicated entry repeated by its count; attribution)."""
        return self._search(queries, k, counted=False, with_ids=with_ids)

    def search_counted(self, queries, k: int, with_ids: bool = False):
        """search() without repeating de-duplicated hits: (distances [Q, k], codes [Q, k], copies [Q, k] int64),
        copies = how many of each hit's occurrences the full index's top k holds (`dedup.copies_in_top`), or
        None for an index without de-duplication (every hit is one occurrence). The same multiset of
        (distance, code) pairs as search(), for callers that aggregate (DAiD's p_ret) instead of listing.
        with_ids: the hits' entry ids [Q, k] int64 last (attribution)."""
        return self._search(queries, k, counted=True, with_ids=with_ids)

    def _search(self, queries, k: int, counted: bool, with_ids: bool = False) -> tuple:
        self._check(queries, k)
        if isinstance(queries, torch.Tensor):
            found = self._search_torch(queries, k, counted)
        else:
            found = self._search_np(queries, k, counted)
        return found if with_ids else found[:-1]

    def search_ids(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, entry ids) [Q, k], NumPy; a de-duplicated entry is repeated by its count, as in the full
        index (-1 = none)."""
        self._check(queries, k)
        return self._search_ids(queries, k)

    def _search_ids(self, queries: np.ndarray, k: int, expand_counts: bool = True) -> tuple[np.ndarray, np.ndarray]:
        dist, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        if self.counts is not None and expand_counts:
            dist, ids = expand(dist, ids, self.counts, k)
        return dist, ids

    def search_excluding(self, queries: np.ndarray, k: int, owners: np.ndarray) -> np.ndarray:
        """Codes [Q, k] of the k nearest entries that did not come from image owners[q] (-1 pads): what the
        full index returns once every copy from the query's own image is dropped (construct-train
        --exclude-self)."""
        self._check(queries, k)
        if self.counts is None and not self.manifest.get("entries_per_image"):
            raise ArragError(f"{self.folder} does not say which image each entry came from (the original prebuilt "
                             "database); --exclude-self needs an index built by `arrag build-index`")
        owners = np.asarray(owners, dtype=np.int64)
        fetch = 4 * k  # own copies are dropped, so ask for more and keep the first k others
        dist, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), fetch)
        if self.counts is None:  # entry e came from image e // P
            keep = (ids >= 0) & (ids // int(self.manifest["entries_per_image"]) != owners[:, None])
            weights = keep.astype(np.int64)
        else:  # copies from the owner image are subtracted from each entry's count
            weights = np.where(ids >= 0, self.counts[np.maximum(ids, 0)].astype(np.int64)
                               - self._own_copies(ids, owners), 0)
        _, picked = expand(dist, np.where(weights > 0, ids, -1), np.maximum(weights, 0).ravel(),
                           k, weights_per_hit=True)
        return self._codes_np(picked)

    def _image_csr(self) -> tuple[np.ndarray, np.ndarray]:
        """The de-duplicated index's map from entries to the images they came from (memory-mapped, opened once)."""
        if self._csr is None:
            offsets = self._array("entry_image_offsets.npy", len(self.values) + 1)
            self._csr = (offsets, np.load(self.folder / "entry_images.npy", mmap_mode="r"))
        return self._csr

    @property
    def image_map(self) -> str:
        """How entries map to database images: 'csr' (de-duplicated: entry_image_offsets + entry_images),
        'arithmetic' (entry e of a full index came from image e // entries_per_image) or 'none' (the original
        prebuilt database records no images)."""
        if self.counts is not None:
            return "csr"
        return "arithmetic" if self.manifest.get("entries_per_image") else "none"

    def images_of(self, entries: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The database images behind entries [M] (ids >= 0) -> (offsets int64 [M+1], images int64 [<= M*limit],
        occurrences int64 [M]): entry m's first min(occurrences, limit) image ids (ascending, one per occurrence)
        are images[offsets[m]:offsets[m+1]]. Only the slices asked for are read from the memory-mapped map."""
        entries = np.asarray(entries, dtype=np.int64).reshape(-1)
        kind = self.image_map
        if kind == "none":
            raise ArragError(f"{self.folder} is the original prebuilt database: it records no database images for "
                             "its entries; build an index with `arrag build-index` to see them")
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        if kind == "arithmetic":  # one occurrence each
            return (np.arange(len(entries) + 1, dtype=np.int64), entries // int(self.manifest["entries_per_image"]),
                    np.ones(len(entries), np.int64))
        offsets, images = self._image_csr()
        lo, hi = np.asarray(offsets[entries], np.int64), np.asarray(offsets[entries + 1], np.int64)
        take = np.minimum(hi - lo, limit)
        out_offsets = np.concatenate([[0], np.cumsum(take)]).astype(np.int64)
        # every position of every taken slice, as one gather: lo[m] + 0 .. take[m]-1
        where = np.repeat(lo - out_offsets[:-1], take) + np.arange(out_offsets[-1])
        order = np.argsort(where, kind="stable")  # read the map in ascending order
        got = np.empty(len(where), np.int64)
        got[order] = images[where[order]]
        return out_offsets, got, hi - lo

    def entry_cells(self, entry: int, image: int, grid: np.ndarray) -> np.ndarray:
        """The raster cells of database image `image` (its code grid [h, w]) whose target is entry `entry`:
        where the patch sits in that image (a de-duplicated entry may occur there more than once)."""
        if self.image_map == "arithmetic":
            p = int(self.manifest["entries_per_image"])
            if entry // p != image:
                return np.zeros(0, np.int64)
            return np.asarray(self.manifest["positions"], np.int64)[[entry % p]]
        from arrag.retrieval.dedup import entry_rows

        rows, _ = entry_rows(np.asarray(grid)[None], self.neighborhood)
        if self._entry_codes is None:  # memory-mapped once, like the image map
            self._entry_codes = self._array("entry_codes.npy", len(self.values))
        want = np.concatenate([np.asarray(self._entry_codes[entry], np.uint16), [np.uint16(self.values[entry])]])
        positions = self.neighborhood.positions(*np.asarray(grid).shape)
        return positions[(rows == want).all(1)].astype(np.int64)

    def _own_copies(self, ids: np.ndarray, owners: np.ndarray) -> np.ndarray:
        """How many occurrences of entry ids[q, j] came from image owners[q]: two binary searches in each hit's
        ascending slice of the CSR image list (memory-mapped; nothing proportional to the index is loaded)."""
        offsets, images = self._image_csr()
        flat = np.maximum(ids, 0).ravel()
        lo, hi = np.asarray(offsets[flat], np.int64), np.asarray(offsets[flat + 1], np.int64)
        target = np.broadcast_to(owners[:, None], ids.shape).ravel()
        return (_bisect(images, lo, hi, target, right=True) - _bisect(images, lo, hi, target, right=False)
                ).reshape(ids.shape)

    def entry_keys(self, ids: np.ndarray, store) -> np.ndarray:
        """The true keys [len(ids), D] of entry ids (recall measurement), from the index's entry codes or store."""
        if self.manifest.get("dedup"):
            from arrag.retrieval.keys import row_keys

            codes = np.load(self.folder / "entry_codes.npy", mmap_mode="r")
            rows = np.concatenate([np.asarray(codes[ids]), np.zeros((len(ids), 1), np.uint16)], 1)
            return row_keys(rows, store.codebook())
        from arrag.retrieval.keys import entry_keys

        return entry_keys(store, ids, self.neighborhood, self.manifest["key_source"])

    def _check(self, queries, k: int) -> None:
        if k < 1:
            raise ArragError(f"k must be >= 1, got {k}")
        if queries.shape[-1] != self.dim:
            raise ArragError(f"queries have dimension {queries.shape[-1]}, the index expects {self.dim}")

    def _codes_np(self, ids: np.ndarray) -> np.ndarray:
        flat = np.maximum(ids, 0).ravel()
        if len(flat) > 65536:  # many reads from a memory-mapped values file: read them in ascending order
            order = np.argsort(flat, kind="stable")
            got = np.empty(len(flat), dtype=np.int64)
            got[order] = self.values[flat[order]]
        else:
            got = np.asarray(self.values[flat], dtype=np.int64)
        return np.where(ids >= 0, got.reshape(ids.shape), -1)

    def _search_np(self, queries: np.ndarray, k: int, counted: bool) -> tuple:
        """(distances, codes[, copies], ids): the ids always last, dropped by callers that do not want them."""
        dist, ids = self._search_ids(queries, k, expand_counts=not counted)
        if not counted:
            return dist, self._codes_np(ids), ids
        return dist, self._codes_np(ids), None if self.counts is None else copies_in_top(ids, self.counts, k), ids

    def _search_torch(self, queries: torch.Tensor, k: int, counted: bool) -> tuple:
        if isinstance(self.index, TorchIndex):  # searched where the index lives, codes looked up there too
            found = self._codes_torch(*self.index.search(queries.detach().to(self.index.device), k), k, counted)
        elif queries.is_cuda and self.gpus:
            import faiss.contrib.torch_utils  # noqa: F401  (lets GPU indexes take CUDA tensors directly)

            found = self._codes_torch(*self.index.search(queries.float().contiguous(), k), k, counted)
        else:
            found = tuple(None if a is None else torch.from_numpy(a)
                          for a in self._search_np(queries.detach().float().cpu().numpy(), k, counted))
        return tuple(None if a is None else a.to(queries.device) for a in found)

    def _codes_torch(self, dist: torch.Tensor, ids: torch.Tensor, k: int, counted: bool) -> tuple:
        """Raw hits on a device -> (distances, codes[, copies], ids) there: counts expanded (or, `counted`, turned
        into copies per hit), codes looked up on that device."""
        copies = None
        if self.counts is not None:
            counts = self._on(self._counts_torch, self.counts, ids.device)
            if counted:
                copies = copies_in_top(ids, counts, k)
            else:
                dist, ids = expand(dist, ids, counts, k)
        values = self._on(self._values_torch, self.values, ids.device)
        codes = values[ids.clamp_min(0)].long()
        if values.dtype == torch.int16:
            codes = codes & 0xFFFF  # uint16 codes kept as their int16 bits: 2 bytes per entry on a GPU
        codes = torch.where(ids >= 0, codes, -1)
        return (dist, codes, copies, ids) if counted else (dist, codes, ids)

    def prepare(self, device: str | torch.device) -> None:
        """Copy the code (and count) tables to where searches of queries on `device` return their hits, now,
        not inside the first search: on a GPU that copy would stall a decoding loop that otherwise never waits."""
        if isinstance(self.index, TorchIndex):
            device = self.index.device
        elif not (self.gpus and torch.device(device).type == "cuda"):
            return  # faiss-cpu: hits come back as NumPy and are looked up there
        self._on(self._values_torch, self.values, device)
        if self.counts is not None:
            self._on(self._counts_torch, self.counts, device)

    @staticmethod
    def _on(cache: dict, array: np.ndarray, device) -> torch.Tensor:
        """A copy of `array` (codes or counts) on `device`, made once: uint16 codes as int16 bits (2 bytes per entry),
        the rest as int32 (4 bytes)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = str(device)
        if key not in cache:
            array = np.asarray(array)
            compact = array.view(np.int16) if array.dtype == np.uint16 else array.astype(np.int32, copy=False)
            cache[key] = torch.from_numpy(np.array(compact)).to(device)  # a copy: the array may be a read-only map
        return cache[key]


HASH_BELOW = 2 << 30  # an index whose files total more is checked by size on load (`arrag verify-index` hashes all)


# Fields a user may change by hand, left out of the manifest's digest: the nprobe search starts with, and where
# the code store has moved to.
DIGEST_FREE = ("manifest_sha256", "nprobe", "store")
DIGEST_FORMATS = ("arrag-index/3",)  # formats whose manifests carry manifest_sha256


def manifest_digest(manifest: dict) -> str:
    """sha256 (32 hex digits) of a manifest's content fields, canonical JSON, for build-index to record."""
    body = {k: v for k, v in manifest.items() if k not in DIGEST_FREE}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def check_index_files(folder: Path, manifest: dict, hash_below: int = HASH_BELOW, progress: bool = False,
                      allow_unverified: bool = False) -> dict:
    """Check the manifest itself (its digest, when its format records one) and every file it records: present,
    of the recorded size, and (when the files total at most `hash_below` bytes) of the recorded blake2b hash.
    Returns {'files', 'bytes', 'hashed', 'digest'}; a damaged file or an edited manifest is one ArragError line.
    `allow_unverified` (--no-verify-index): a manifest with no file records, or an edited one, is used with a
    warning instead."""
    from tqdm import tqdm

    path = folder / "manifest.json"
    files = manifest.get("files")
    if not files or not isinstance(files, dict):
        why = f"{path} records no file checksums ('files'): an unverified index"
        if not allow_unverified:
            raise ArragError(f"{why}; rebuild it with `arrag build-index`, or pass --no-verify-index to use it as "
                             "it is")
        warnings.warn(f"{why}; used unchecked (--no-verify-index)", stacklevel=3)
        files = {}
    digest = "absent"
    recorded = manifest.get("manifest_sha256")
    if recorded is not None or manifest.get("format") in DIGEST_FORMATS:
        if recorded != manifest_digest(manifest):
            why = (f"{path} was edited after build-index wrote it (its content no longer matches its "
                   f"manifest_sha256{'' if recorded is not None else ', which was removed'})")
            if not allow_unverified:
                raise ArragError(f"{why}; restore it or rebuild the index (only nprobe and store may be changed by "
                                 "hand), or pass --no-verify-index to use it as it is")
            warnings.warn(f"{why}; used as it is (--no-verify-index)", stacklevel=3)
            digest = "edited"
        else:
            digest = "matches"
    for name in files:
        if not (folder / name).is_file():
            raise ArragError(f"{folder}: {name} is missing; rebuild the index with `arrag build-index`")
    total = sum(int(r.get("bytes", 0)) for r in files.values())
    hashed = total <= hash_below
    hint = (f"; rebuild {folder} with `arrag build-index`" +
            ("" if not hashed else " (or pass --no-verify-index to check sizes only)"))
    with tqdm(total=total if hashed else None, unit="B", unit_scale=True, desc=f"verify {folder.name}",
              disable=not (progress and hashed)) as bar:
        for name, record in files.items():
            fileops.verify_file(folder / name, record, hash_contents=hashed, hint=hint,
                                on_bytes=bar.update if progress else None)
    return {"files": len(files), "bytes": total, "hashed": hashed, "digest": digest}


def check_manifest_figures(folder: Path, manifest: dict, index) -> list[str]:
    """Cross-check the manifest's own figures against the files: entries and dim against the index, de-duplication
    against its counts file, the grid against the recorded target positions. Returns what was checked; an
    inconsistency is one ArragError line (an edited manifest, or files from another build)."""
    path = folder / "manifest.json"
    checked = []

    def refuse(what: str) -> None:
        raise ArragError(f"{path}: {what}; the manifest was edited or the files come from another build: restore it "
                         "or rebuild the index with `arrag build-index`")

    if "entries" in manifest:
        if manifest["entries"] != index.ntotal:
            refuse(f"entries {manifest['entries']:,}, but index.faiss holds {index.ntotal:,}")
        checked.append("entries")
    if manifest.get("dim") != index.d:
        refuse(f"dim {manifest.get('dim')}, but index.faiss holds {index.d}-dimensional keys")
    checked.append("dim")
    if "dedup" in manifest:
        has_counts = (folder / "counts.npy").is_file()
        if bool(manifest["dedup"]) != has_counts:
            refuse(f"dedup {str(manifest['dedup']).lower()}, but the folder {'holds' if has_counts else 'has no'} the "
                   "counts.npy of a de-duplicated index")
        checked.append("dedup")
    grid, positions = manifest.get("grid"), manifest.get("positions")
    if grid is not None and positions is not None:
        try:
            expected = get_neighborhood(manifest["neighborhood"]["shape"]).positions(*grid).tolist()
        except (TypeError, ValueError, KeyError, ArragError):
            expected = None
        if expected != positions:
            refuse(f"grid {grid} does not give the {len(positions)} target positions the index was built over")
        checked.append("grid")
    return checked


def _bisect(sorted_values: np.ndarray, lo: np.ndarray, hi: np.ndarray, target: np.ndarray, right: bool) -> np.ndarray:
    """Per element, the first index in [lo, hi) of the ascending `sorted_values` whose value is > target
    (`right`) or >= target: a vectorised binary search over many slices at once."""
    lo, hi = lo.copy(), hi.copy()
    while True:
        active = lo < hi
        if not active.any():
            return lo
        mid = (lo + hi) // 2
        v = np.asarray(sorted_values[np.where(active, mid, 0)], np.int64)
        go_right = active & ((v <= target) if right else (v < target))
        lo = np.where(go_right, mid + 1, lo)
        hi = np.where(active & ~go_right, mid, hi)


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ArragError(f"{path} is not valid JSON ({e}); rebuild the index with `arrag build-index`") from None
    required = ("neighborhood", "dim", "key_source")
    if not isinstance(manifest, dict) or any(k not in manifest for k in required):
        raise ArragError(f"{path} is not an arrag index manifest (needs {', '.join(required)}); rebuild the index")
    for key in ("nprobe", "dim"):  # hand edits: a fraction would be truncated silently, a string or 0 crash later
        value = manifest.get(key)
        if (value is not None or key == "dim") and (type(value) is not int or value < 1):
            raise ArragError(f"{path}: {key} {value!r} is not a whole number >= 1; correct it in the manifest or "
                             "rebuild the index")
    return manifest


def _gpu_spec(device):
    if isinstance(device, (list, tuple)):
        return list(device)
    if isinstance(device, int):
        return [device]
    if device in (None, "cpu"):
        return None
    return str(device)
