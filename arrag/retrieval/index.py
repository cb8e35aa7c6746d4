"""FAISS index: choose, create, train, tune, move to GPUs, save and load. Squared-L2 metric throughout.

Index choice follows autofaiss's idea, by entry count under a memory budget:
  exact  Flat                    up to 100k entries (4*d bytes per entry)
  IVF    IVF{nlist},Flat         up to 10M entries (4*d + 8 bytes per entry, exact distances in probed lists)
  PQ     OPQ{m},IVF{nlist},PQ{m} beyond, or when the others exceed the budget (m + 8 bytes per entry),
                                 the original AR-RAG index (m = 8 for 32-d keys)
An explicit FAISS factory string overrides the choice.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import faiss
import numpy as np

from arrag.errors import ArragError
from arrag.fileops import atomic_path

EXACT_MAX = 100_000


def parse_bytes(text: str | int) -> int:
    """'16G', '512M', '1.5T' or a plain integer -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)I?B?\s*", str(text).upper())
    if not m:
        raise ArragError(f"--memory-budget {text!r}: expected a size such as 512M, 16G or 1T")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


def default_nlist(n: int) -> int:
    """A power of two near 4*sqrt(n) lists, between 16 and 65536."""
    return int(min(65536, max(16, 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n)))))))


def default_nprobe(nlist: int) -> int:
    """Probed lists at query time: sqrt(nlist)/2, at least 16 (32 for 4096 lists).

    Measured on the 1.05M-entry ShapesWorld database (bench/retrieval.py, IVF4096,Flat): recall@10 0.994
    at nprobe 16, 0.998 at 32, 1.000 at 128, with queries/s falling 1.5x per doubling. Real-image keys
    are more diverse: check with `arrag search-stats` and pass --nprobe if recall is short.
    """
    return int(min(nlist, max(16, round(math.sqrt(nlist) / 2))))


def bytes_per_entry(factory: str, d: int) -> int:
    """Approximate index memory per entry for the factories we choose (ids included)."""
    if factory == "Flat":
        return 4 * d
    m = re.search(r"PQ(\d+)", factory)
    return int(m.group(1)) + 8 if m else 4 * d + 8


def choose_factory(n: int, d: int, memory_budget: int) -> tuple[str, str]:
    """(factory string, one-line reason) for n entries of dimension d under memory_budget bytes."""
    nlist = default_nlist(n)
    m = max(1, d // 4)
    while d % m:
        m -= 1
    options = [("Flat", f"{n:,} entries <= {EXACT_MAX:,}: exact search")] if n <= EXACT_MAX else []
    # Exact distances whenever they fit the budget: PQ codes lose much recall on patch keys (bench/retrieval.py).
    options.append((f"IVF{nlist},Flat", f"{n:,} entries: inverted lists with exact distances"))
    options.append((f"OPQ{m},IVF{nlist},PQ{m}", f"{n:,} entries: OPQ + IVF-PQ, {m} bytes per code"))
    for factory, reason in options:
        need = n * bytes_per_entry(factory, d)
        if need <= memory_budget:
            return factory, f"{reason} (~{need / 2**30:.2f} GiB of {memory_budget / 2**30:.2f} GiB budget)"
    need = n * bytes_per_entry(options[-1][0], d)
    raise ArragError(f"--memory-budget {memory_budget / 2**30:.2f} GiB is too small for {n:,} entries: even "
                     f"{options[-1][0]} needs ~{need / 2**30:.2f} GiB; raise it or encode fewer images")


def create_index(factory: str, d: int) -> faiss.Index:
    try:
        return faiss.index_factory(d, factory, faiss.METRIC_L2)
    except RuntimeError as e:
        raise ArragError(f"--factory {factory!r} is not a valid FAISS factory string for d={d}: "
                         f"{str(e).strip().splitlines()[-1][:160]}") from None


def train_sample_size(index: faiss.Index, n: int) -> int:
    """Training points: 64 per IVF list (FAISS warns under 39), at least 10k for PQ codebooks, capped at n."""
    if index.is_trained:
        return 0
    ivf = _ivf(index)
    need = 64 * ivf.nlist if ivf is not None else 10_000
    return int(min(n, max(need, 10_000)))


def _ivf(index: faiss.Index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def nlist_of(index: faiss.Index) -> int | None:
    ivf = _ivf(index)
    return int(ivf.nlist) if ivf is not None else None


def set_nprobe(index: faiss.Index, nprobe: int | None) -> int | None:
    """Set nprobe on a CPU or GPU (possibly sharded) IVF index; returns the value in effect (None if not IVF)."""
    nlist = nlist_of(index)
    if nprobe is None or (nlist is None and not _is_gpu(index)):
        return None
    value = int(min(nprobe, nlist)) if nlist else int(nprobe)
    space = faiss.GpuParameterSpace() if _is_gpu(index) else faiss.ParameterSpace()
    space.set_index_parameter(index, "nprobe", value)
    return value


TUNE_MAX_WORK = 2e12  # queries x entries x dim: above it (about 5 min on 2 cores) nprobe is not tuned at build


def tune_nprobe(index: faiss.Index, queries: np.ndarray, k: int = 10, target: float = 0.95) -> dict | None:
    """The smallest power-of-two nprobe whose top-k reaches `target` recall against probing every list.

    Against all lists is exact search for IVF-Flat (for PQ it measures the probing loss only). Recall is
    tie-aware: a hit counts when its distance is within the all-lists k-th distance. Returns {'nprobe',
    'recall', 'target', 'queries', 'k', 'table': [[nprobe, recall], ...]}, or None for a non-IVF index or one
    too large to tune here (`arrag search-stats` sweeps nprobe instead).
    """
    nlist = nlist_of(index)
    if nlist is None or len(queries) * index.ntotal * index.d > TUNE_MAX_WORK or index.ntotal == 0:
        return None
    q = np.ascontiguousarray(queries, dtype=np.float32)
    before = _ivf(index).nprobe
    try:
        set_nprobe(index, nlist)
        ref = index.search(q, k)[0][:, -1:]
        table, probe = [], 1
        while True:
            set_nprobe(index, probe)
            dist, ids = index.search(q, k)
            recall = float(((ids >= 0) & (dist <= ref + 1e-5 * np.maximum(1.0, ref))).mean())
            table.append([probe, round(recall, 4)])
            if recall >= target or probe >= nlist:
                return {"nprobe": probe, "recall": round(recall, 4), "target": target, "queries": len(q), "k": k,
                        "reference": "all lists", "table": table}
            probe = min(2 * probe, nlist)
    finally:
        set_nprobe(index, before)


def _is_gpu(index: faiss.Index) -> bool:
    return type(index).__name__.startswith("Gpu") or type(index).__name__ in ("IndexShards", "IndexReplicas")


def has_gpu_faiss() -> bool:
    """True when the installed FAISS is a GPU build and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def parse_gpus(spec) -> list[int]:
    """'cpu' / None -> []; 'cuda' -> every GPU; 'cuda:1', '0,1', [0, 1] -> those ids."""
    if spec is None or spec == "cpu":
        return []
    if isinstance(spec, (list, tuple)):
        ids = [int(g) for g in spec]
    elif spec in ("cuda", "gpu", "all", "auto"):
        if not has_gpu_faiss():
            if spec == "auto":
                return []
            raise ArragError("GPU FAISS requested, but this FAISS build sees no GPU; install faiss-gpu or use cpu")
        ids = list(range(faiss.get_num_gpus()))
    else:
        ids = [int(g) for g in str(spec).replace("cuda:", "").split(",") if g.strip()]
    if ids and not has_gpu_faiss():
        raise ArragError(f"GPUs {ids} requested, but this FAISS build has no GPU support; install faiss-gpu "
                         "(CUDA machines: `make install` does) or use --device cpu")
    return ids


def to_gpus(index: faiss.Index, gpus: list[int], shard: bool = True) -> faiss.Index:
    """Clone a CPU index onto GPUs, sharded across them (each holds 1/len(gpus) of the entries)."""
    if not gpus:
        return index
    co = faiss.GpuMultipleClonerOptions()
    co.shard = shard
    co.useFloat16 = True  # halves GPU memory for IVF-PQ lookup tables; distances stay float32
    resources = [faiss.StandardGpuResources() for _ in gpus]
    vres, vdev = faiss.GpuResourcesVector(), faiss.Int32Vector()
    for g, r in zip(gpus, resources, strict=True):
        vdev.push_back(g)
        vres.push_back(r)
    gpu_index = faiss.index_cpu_to_gpu_multiple(vres, vdev, index, co)
    gpu_index.arrag_resources = resources  # keep them alive as long as the index
    return gpu_index


def train(index: faiss.Index, sample: np.ndarray, gpus: list[int] | None = None) -> None:
    """Train on `sample` [S, d] float32; the coarse k-means runs on the GPUs when given."""
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    ivf = _ivf(index)
    gpu_flat = None
    if gpus and ivf is not None:
        # IndexIVF trains its coarse quantiser through `clustering_index` when one is set.
        gpu_flat = to_gpus(faiss.IndexFlatL2(ivf.d), gpus, shard=False)
        ivf.clustering_index = gpu_flat
    index.train(sample)
    if gpu_flat is not None:
        ivf.clustering_index = None


def write_index(index: faiss.Index, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def read_index(path: str | Path, mmap: bool = False, ondisk: bool = False) -> faiss.Index:
    """Read an index; `mmap` maps its data instead of loading it, `ondisk` opens on-disk inverted lists that lie
    beside the index file (merge-index's lists.ivfdata), wherever the folder has moved."""
    path = Path(path)
    if not path.is_file():
        raise ArragError(f"no FAISS index at {path}")
    flags = (faiss.IO_FLAG_MMAP if mmap else 0) | (faiss.IO_FLAG_ONDISK_SAME_DIR if ondisk else 0)
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as e:
        raise ArragError(f"cannot read FAISS index {path}: {str(e).strip().splitlines()[-1][:160]}") from None


def describe(index: faiss.Index) -> str:
    """A short human description: the index type chain."""
    parts, cur = [], index
    while True:
        parts.append(type(cur).__name__)
        if isinstance(cur, faiss.IndexPreTransform):
            cur = faiss.downcast_index(cur.index)
            continue
        break
    return " > ".join(parts)


def index_memory_bytes(index: faiss.Index) -> int:
    """Bytes the index takes when serialised (about its memory footprint; for on-disk inverted lists, only
    what stays in RAM). Index shards: the sum over their parts."""
    if isinstance(index, faiss.IndexShards):
        return sum(index_memory_bytes(faiss.downcast_index(index.at(i))) for i in range(index.count()))
    return int(faiss.serialize_index(index).nbytes)


def list_sizes(index: faiss.Index) -> np.ndarray:
    """Entries per inverted list [nlist] of a CPU IVF index (int64)."""
    ivf = _ivf(index)
    if ivf is None:
        raise ArragError("list sizes need an IVF index")
    return np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)


def sample_stored_vectors(index: faiss.Index, n: int, seed: int = 0) -> np.ndarray:
    """About n vectors [n, d] reconstructed from a seeded sample of an IVF index's entries (approximate for PQ),
    read from the inverted lists directly (no id map), in the input space of any pre-transform (OPQ)."""
    ivf = _ivf(index)
    if ivf is None:
        raise ArragError("sampling stored vectors needs an IVF index")
    sizes = list_sizes(index)
    if sizes.sum() == 0:
        return np.zeros((0, index.d), np.float32)
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(int(sizes.sum()), min(n, int(sizes.sum())), replace=False))
    starts = np.cumsum(sizes) - sizes
    lists = np.searchsorted(starts, picks, side="right") - 1
    out = np.empty((len(picks), ivf.d), np.float32)
    for j, (lst, pick) in enumerate(zip(lists, picks, strict=True)):
        ivf.reconstruct_from_offset(int(lst), int(pick - starts[lst]), faiss.swig_ptr(out[j]))
    outer = faiss.downcast_index(index)
    if isinstance(outer, faiss.IndexPreTransform):
        back = np.empty((len(out), index.d), np.float32)
        outer.reverse_chain(len(out), faiss.swig_ptr(out), faiss.swig_ptr(back))
        out = back
    return out
