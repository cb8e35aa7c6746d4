"""FAISS index: choose, create, train, tune, move to GPUs, save and load. Squared-L2 metric throughout.

Index choice follows autofaiss's idea, by entry count under a memory budget:
  exact  Flat                    up to 100k entries (4*d bytes per entry)
  IVF    IVF{nlist},Flat         while it fits (4*d + 8 bytes per entry, exact distances in probed lists)
  codes  IVF{nlist},CodePQ       code keys beyond that (about 15 bytes per entry, still exact; see below)
  PQ     OPQ{m},IVF{nlist},PQ{m} latent keys beyond that (m + 8 bytes per entry), the original AR-RAG index
                                 (m = 8 for 32-d keys)
From HNSW_ABOVE entries (50M; `--hnsw-above` moves it) the IVF indexes take an HNSW32 coarse quantiser
(`IVF{nlist}_HNSW32,...`) and more lists, 2^16 to 2^18 (about 8 sqrt(n)), as autofaiss does for hundreds of
millions of vectors: lists stay a few thousand entries long at billions, and an HNSW graph finds the nearest of
2^18 centroids in microseconds where comparing with all of them would dominate each search. Its k-means runs on a
flat index (or the GPUs), not on the graph.
An explicit FAISS factory string overrides the choice. One name is arrag's own:
  IVF{nlist},CodePQ  code keys stored as their neighbour codes (n_neighbours x log2(codebook) bits + an 8-byte
                     id per entry, e.g. 7 + 8 bytes for Janus-Pro's L keys instead of 136), with EXACT distances:
                     a key is a concatenation of codebook rows, so a product quantiser whose sub-codebooks are
                     the VQ codebook itself encodes it losslessly (FAISS IVF-PQ, no residual, only the coarse
                     quantiser trained). Code keys only; searched by faiss-cpu or the torch backend.
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path

import faiss
import numpy as np

from arrag.errors import ArragError
from arrag.fileops import atomic_path

EXACT_MAX = 100_000


AUTO_BUDGET_SHARE = 0.75  # --memory-budget auto: this share of the machine's physical memory


def machine_memory() -> int:
    """Bytes of physical memory of this machine (0 where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def parse_bytes(text: str | int, flag: str = "--memory-budget") -> int:
    """'16G', '512M', '1.5T', a plain integer, or 'auto' (3/4 of this machine's physical memory) -> bytes."""
    if isinstance(text, int):
        return text
    if str(text).strip().lower() == "auto":
        total = machine_memory()
        if total <= 0:
            raise ArragError(f"{flag} auto: this OS does not report its memory; give a size such as 64G")
        return int(total * AUTO_BUDGET_SHARE)
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)I?B?\s*", str(text).upper())
    if not m:
        raise ArragError(f"{flag} {text!r}: expected a size such as 512M, 16G or 1T")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


HNSW_ABOVE = 50_000_000  # entries from which --factory auto uses an HNSW32 coarse quantiser and more lists
HNSW_M = 32  # graph neighbours per centroid of the HNSW coarse quantiser
MAX_NLIST = 1 << 18


def format_bytes(n: float) -> str:
    """'812 KiB', '3.4 GiB': a size for messages, in the unit that suits it."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"


def default_nlist(n: int, hnsw_above: int = HNSW_ABOVE) -> int:
    """Lists for n entries: a power of two near 4*sqrt(n), between 16 and 65536; from `hnsw_above` entries (an
    HNSW coarse quantiser) near 8*sqrt(n), up to 2^18 (2^16 at 50M entries, 2^17 at 500M, 2^18 at 2B)."""
    if n >= hnsw_above:
        return int(min(MAX_NLIST, max(16, 2 ** round(math.log2(max(1.0, 8 * math.sqrt(n)))))))
    return int(min(65536, max(16, 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n)))))))


def coarse_quantizer(n: int, hnsw_above: int = HNSW_ABOVE) -> str:
    """The IVF part of an automatic factory for n entries: 'IVF{nlist}' or, from `hnsw_above`, 'IVF{nlist}_HNSW32'."""
    return f"IVF{default_nlist(n, hnsw_above)}" + (f"_HNSW{HNSW_M}" if n >= hnsw_above else "")


def default_nprobe(nlist: int) -> int:
    """Probed lists at query time: sqrt(nlist)/2, at least 16 (32 for 4096 lists).

    Measured on the 1.05M-entry ShapesWorld database (bench/retrieval.py, IVF4096,Flat): recall@10 0.994
    at nprobe 16, 0.998 at 32, 1.000 at 128, with queries/s falling 1.5x per doubling. Real-image keys
    are more diverse: check with `arrag search-stats` and pass --nprobe if recall is short.
    """
    return int(min(nlist, max(16, round(math.sqrt(nlist) / 2))))


CODE_PQ = re.compile(r"(IVF\d+(?:_HNSW\d+)?),CodePQ")


def code_pq_shape(d: int, codebook_size: int, e_dim: int) -> tuple[int, int]:
    """(sub-vectors M, bits per code) of a CodePQ index over d-dim keys of e_dim-dim codebook rows."""
    if d % e_dim:
        raise ArragError(f"CodePQ: keys of {d} dims are not whole codebook rows of {e_dim} dims")
    return d // e_dim, max(1, math.ceil(math.log2(codebook_size)))


def bytes_per_entry(factory: str, d: int, codebook_size: int = 16384, e_dim: int = 8) -> int:
    """Approximate index memory per entry (ids included); CodePQ's depends on the codebook (default Janus-Pro's)."""
    if factory == "Flat":
        return 4 * d
    if CODE_PQ.fullmatch(factory):
        sub, bits = code_pq_shape(d, codebook_size, e_dim)
        return math.ceil(sub * bits / 8) + 8
    m = re.search(r"PQ(\d+)", factory)
    return int(m.group(1)) + 8 if m else 4 * d + 8


def quantizer_bytes(factory: str, d: int) -> int:
    """Bytes of an IVF factory's coarse quantiser: its centroids, and the graph links of an HNSW one (0: no IVF)."""
    m = re.search(r"IVF(\d+)(?:_HNSW(\d+))?", factory)
    if not m:
        return 0
    nlist = int(m.group(1))
    links = 2 * int(m.group(2)) * 4 * 1.07 if m.group(2) else 0  # level 0 holds 2M links; upper levels add ~1/M
    return int(nlist * (4 * d + links))


def choose_factory(n: int, d: int, memory_budget: int, codebook_shape: tuple[int, int] | None = None,
                   hnsw_above: int = HNSW_ABOVE, dedup: bool = False) -> tuple[str, str]:
    """(factory string, one-line reason) for n entries of dimension d whose search RAM (`search_memory`, with
    the code and, `dedup`, count tables) stays under memory_budget bytes.

    codebook_shape (K, e) when the keys are codes (concatenated codebook rows): CodePQ, exact at PQ's size,
    then comes before PQ. From `hnsw_above` entries the coarse quantiser is an HNSW graph over more lists."""
    nlist = default_nlist(n, hnsw_above)
    ivf = coarse_quantizer(n, hnsw_above)
    m = max(1, d // 4)
    while d % m:
        m -= 1
    options = [("Flat", f"{n:,} entries <= {EXACT_MAX:,}: exact search")] if n <= EXACT_MAX else []
    # Exact distances whenever they fit the budget: PQ codes lose much recall on patch keys (bench/retrieval.py).
    lists = (f"{nlist:,} lists, an HNSW{HNSW_M} coarse quantiser from {hnsw_above:,} entries"
             if n >= hnsw_above else f"{nlist:,} lists")
    options.append((f"{ivf},Flat", f"{n:,} entries: inverted lists with exact distances ({lists})"))
    if codebook_shape is not None and d % codebook_shape[1] == 0:
        options.append((f"{ivf},CodePQ", f"{n:,} entries: inverted lists of the keys' codes, exact distances "
                        f"({lists})"))
    options.append((f"OPQ{m},{ivf},PQ{m}", f"{n:,} entries: OPQ + IVF-PQ, {m} bytes per code ({lists})"))
    for factory, reason in options:
        need = search_memory(factory, n, d, codebook_shape, dedup)["ram"]
        if need <= memory_budget:
            return factory, f"{reason} (~{format_bytes(need)} of {format_bytes(memory_budget)} budget)"
    need = search_memory(options[-1][0], n, d, codebook_shape, dedup)["ram"]
    raise ArragError(f"--memory-budget {format_bytes(memory_budget)} is too small for {n:,} entries: even "
                     f"{options[-1][0]} needs ~{format_bytes(need)}; raise it or encode fewer images")


def create_index(factory: str, d: int, codebook: np.ndarray | None = None) -> faiss.Index:
    """An empty index for a FAISS factory string, or arrag's IVF{nlist},CodePQ over `codebook` [K, e]."""
    m = CODE_PQ.fullmatch(factory)
    if m:
        if codebook is None:
            raise ArragError(f"--factory {factory}: CodePQ stores code keys; it needs --key-source code")
        sub, bits = code_pq_shape(d, len(codebook), codebook.shape[1])
        index = faiss.index_factory(d, f"{m.group(1)},PQ{sub}x{bits}", faiss.METRIC_L2)
        ivf = faiss.downcast_index(index)
        ivf.by_residual = False  # codes of the keys themselves, not of their residuals to a centroid
        # Every sub-quantiser is the codebook; rows past K (2**bits > K) lie far away and are never chosen.
        book = np.full((2 ** bits, codebook.shape[1]), 1e3, np.float32)
        book[:len(codebook)] = codebook
        faiss.copy_array_to_vector(np.tile(book, (sub, 1)).ravel(), ivf.pq.centroids)
        ivf.pq.is_trained = True
        return index
    try:
        return faiss.index_factory(d, factory, faiss.METRIC_L2)
    except RuntimeError as e:
        raise ArragError(f"--factory {factory!r} is not a valid FAISS factory string for d={d}: "
                         f"{str(e).strip().splitlines()[-1][:160]}") from None


def pack_codes(codes: np.ndarray, nbits: int) -> np.ndarray:
    """Sub-codes [n, M] -> FAISS's packed PQ codes [n, ceil(M * nbits / 8)] uint8 (bits LSB first, as PQ encoders
    write them); unpack_codes reads them back."""
    n, m = codes.shape
    bits = ((codes.astype(np.int64)[..., None] >> np.arange(nbits, dtype=np.int64)) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(n, m * nbits), axis=1, bitorder="little")


def unpack_codes(packed: np.ndarray, m: int, nbits: int) -> np.ndarray:
    """FAISS's packed PQ codes [n, code_size] uint8 -> sub-codes [n, m] int64; the inverse of pack_codes."""
    bits = np.unpackbits(packed, axis=1, bitorder="little")[:, :m * nbits].reshape(len(packed), m, nbits)
    return (bits.astype(np.int64) << np.arange(nbits, dtype=np.int64)).sum(-1)


def add_code_pq(index: faiss.Index, keys: np.ndarray, codes: np.ndarray, ids: np.ndarray | None = None) -> None:
    """Add keys [n, d] to a CodePQ index from their known codebook codes [n, M]: the coarse quantiser assigns the
    lists, and the codes are packed as they are, instead of FAISS encoding every sub-vector again by searching the
    whole codebook (~1 MFLOP an entry with 16,384 codes). The same index as index.add(keys) (tested)."""
    ivf = faiss.downcast_index(_ivf(index))
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    lists = ivf.quantizer.assign(keys, 1).reshape(-1) if len(keys) else np.zeros(0, np.int64)
    coarse = ivf.coarse_code_size()
    sa = np.empty((len(keys), coarse + ivf.code_size), np.uint8)
    sa[:, :coarse] = lists.astype("<i8").view(np.uint8).reshape(-1, 8)[:, :coarse]
    sa[:, coarse:] = pack_codes(codes, ivf.pq.nbits)
    ivf.add_sa_codes(sa, None if ids is None else np.ascontiguousarray(ids, dtype=np.int64))
    if ivf is not index:
        index.ntotal = ivf.ntotal


def is_code_pq(index: faiss.Index) -> bool:
    """True for an IVF{nlist},CodePQ index (an IVF-PQ without residuals: only arrag makes those)."""
    ivf = _ivf(index)
    return ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ) and not ivf.by_residual


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


def stored_nprobe(index: faiss.Index) -> int | None:
    """The nprobe an IVF index searches with now: the one stored in its file, as read (None if not IVF). It lives
    on the IVF inside any wrapper (OPQ's IndexPreTransform), never on the wrapper."""
    ivf = _ivf(index)
    return int(ivf.nprobe) if ivf is not None else None


def set_nprobe(index: faiss.Index, nprobe: int | None) -> int | None:
    """Set nprobe on a CPU or GPU (possibly sharded) IVF index; returns the value in effect (None if not IVF).

    FAISS's ParameterSpace sets it on the IVF inside any wrapper: an attribute set on an IndexPreTransform (as the
    original AR-RAG code did) is a Python attribute FAISS never reads."""
    nlist = nlist_of(index)
    if nprobe is None or (nlist is None and not _is_gpu(index)):
        return None
    value = int(min(nprobe, nlist)) if nlist else int(nprobe)
    space = faiss.GpuParameterSpace() if _is_gpu(index) else faiss.ParameterSpace()
    space.set_index_parameter(index, "nprobe", value)
    if has_hnsw_quantizer(index):  # the graph must explore at least twice the lists it returns (as autofaiss)
        space.set_index_parameter(index, "quantizer_efSearch", max(16, 2 * value))
    return value


def has_hnsw_quantizer(index: faiss.Index) -> bool:
    """True for a CPU IVF index whose coarse quantiser is an HNSW graph."""
    ivf = _ivf(index)
    return ivf is not None and isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW)


TUNE_MAX_WORK = 2e12  # queries x entries x dim of the reference search (about 5 min on 2 cores)
MIN_REFERENCE_LISTS = 1024  # a reference probes at least this many lists (or all)


def reference_lists(nlist: int, queries: int, entries: int, d: int, max_work: float | None = None) -> int:
    """Lists the reference search of nprobe tuning probes: all while queries x entries x d fits `max_work`, else
    the largest power of two that does (at least MIN_REFERENCE_LISTS): each query's nearest lists, a sample of
    lists per query where probing every list would take hours on billions of entries."""
    work, max_work = queries * entries * d, TUNE_MAX_WORK if max_work is None else max_work
    if work <= max_work:
        return nlist
    share = 2 ** math.floor(math.log2(max(1.0, nlist * max_work / work)))
    return int(min(nlist, max(MIN_REFERENCE_LISTS, share)))


def tune_nprobe(index: faiss.Index, queries: np.ndarray, k: int = 10, target: float = 0.95,
                max_work: float | None = None) -> dict | None:
    """The smallest power-of-two nprobe whose top-k reaches `target` recall against a reference search.

    The reference probes every list (exact search for IVF-Flat and CodePQ; for PQ it measures the probing loss
    only) or, where that exceeds `max_work`, each query's nearest `reference_lists` lists: recall then counts the
    neighbours found among those lists, an upper bound that is close while the tuned nprobe is well below them.
    Recall is tie-aware: a hit counts when its distance is within the reference's k-th distance. Returns
    {'nprobe', 'recall', 'target', 'queries', 'k', 'reference', 'reference_lists', 'table': [[nprobe, recall],
    ...]}, or None for a non-IVF or empty index. Never skipped for size.
    """
    nlist = nlist_of(index)
    if nlist is None or index.ntotal == 0:
        return None
    q = np.ascontiguousarray(queries, dtype=np.float32)
    max_work = TUNE_MAX_WORK if max_work is None else max_work
    ref_lists = reference_lists(nlist, len(q), index.ntotal, index.d, max_work)
    before, t0 = _ivf(index).nprobe, time.time()
    try:
        ref = _reference_search(index, q, k, ref_lists)[:, -1:]
        table, probe = [], 1
        while True:
            set_nprobe(index, probe)
            dist, ids = index.search(q, k)
            recall = float(((ids >= 0) & (dist <= ref + 1e-5 * np.maximum(1.0, ref))).mean())
            table.append([probe, round(recall, 4)])
            if recall >= target or probe >= ref_lists:
                return {"nprobe": probe, "recall": round(recall, 4), "target": target, "queries": len(q), "k": k,
                        "reference": "all lists" if ref_lists == nlist else
                        f"each query's nearest {ref_lists:,} of {nlist:,} lists (probing all: {len(q)} x "
                        f"{index.ntotal:,} x {index.d} > {max_work:.0e})",
                        "reference_lists": ref_lists, "table": table, "seconds": round(time.time() - t0, 2)}
            probe = min(2 * probe, ref_lists)
    finally:
        set_nprobe(index, before)


def _reference_search(index: faiss.Index, q: np.ndarray, k: int, lists: int) -> np.ndarray:
    """Distances [Q, k] of a search of each query's `lists` nearest lists, found exactly (all centroids compared):
    an HNSW quantiser asked for thousands of lists would walk its whole graph with a huge beam, and could miss
    some."""
    ivf = faiss.downcast_index(_ivf(index))
    x = q
    outer = faiss.downcast_index(index)
    if isinstance(outer, faiss.IndexPreTransform):  # e.g. OPQ: the lists live in the transformed space
        for i in range(outer.chain.size()):
            x = faiss.downcast_VectorTransform(outer.chain.at(i)).apply_py(x)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    coarse_d, coarse_i = faiss.knn(np.ascontiguousarray(x, dtype=np.float32), centroids, lists)
    ivf.nprobe = lists  # the caller restores its own
    return ivf.search_preassigned(np.ascontiguousarray(x, dtype=np.float32), k, coarse_i, coarse_d)[0]


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
        try:
            ids = [int(g) for g in str(spec).replace("cuda:", "").split(",") if g.strip()]
        except ValueError:
            raise ArragError(f"GPUs {spec!r}: expected cpu, cuda, auto or GPU ids such as 0,1") from None
        if any(g < 0 for g in ids):
            raise ArragError(f"GPUs {spec!r}: GPU ids are >= 0")
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


def train(index: faiss.Index, sample: np.ndarray, gpus: list[int] | None = None, kmeans_device: str | None = None,
          seed: int = 0) -> None:
    """Train on `sample` [S, d] float32. The coarse k-means runs on FAISS GPUs when `gpus` are given, else with
    torch on `kmeans_device` ('cuda:0': a GPU without faiss-gpu) when given, else with FAISS on the CPU: in two
    levels (kmeans.two_level_kmeans) from TWO_LEVEL_LISTS lists, where one k-means would take hours."""
    from arrag.retrieval.kmeans import TWO_LEVEL_LISTS, kmeans, two_level_kmeans

    sample = np.ascontiguousarray(sample, dtype=np.float32)
    ivf = _ivf(index)
    trainee, trainee_ivf = index, ivf
    if is_code_pq(index):
        # Only the coarse quantiser learns: IVF-PQ's own training would replace the codebook by k-means
        # centroids. An IVF-Flat sharing the quantiser (not owning it) runs FAISS's usual coarse training.
        trainee = trainee_ivf = faiss.IndexIVFFlat(ivf.quantizer, ivf.d, ivf.nlist)
    pre_transformed = isinstance(faiss.downcast_index(index), faiss.IndexPreTransform)  # OPQ: k-means after it
    centroids = None
    if not gpus and trainee_ivf is not None and not pre_transformed:
        if kmeans_device is not None:
            centroids = kmeans(sample, trainee_ivf.nlist, seed=seed, device=kmeans_device)
        elif trainee_ivf.nlist >= TWO_LEVEL_LISTS:
            centroids = two_level_kmeans(sample, trainee_ivf.nlist, seed=seed)
    if centroids is not None:
        # The centroids go into the quantiser; FAISS then sees a trained quantiser and trains only the rest.
        trainee_ivf.quantizer.reset()
        trainee_ivf.quantizer.add(centroids)
        trainee_ivf.quantizer.is_trained = True
        if trainee is not index:
            ivf.is_trained = True
            return
    clustering = None
    if trainee_ivf is not None and gpus:
        clustering = to_gpus(faiss.IndexFlatL2(trainee_ivf.d), gpus, shard=False)
    elif trainee_ivf is not None and has_hnsw_quantizer(trainee_ivf):
        clustering = faiss.IndexFlatL2(trainee_ivf.d)  # k-means on the graph would rebuild it every iteration
    if clustering is not None:
        # IndexIVF trains its coarse quantiser through `clustering_index` when one is set.
        trainee_ivf.clustering_index = clustering
    trainee.train(sample)
    if clustering is not None:
        trainee_ivf.clustering_index = None
    if trainee is not index:
        ivf.is_trained = True


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


def search_memory(factory: str, n: int, d: int, codebook_shape: tuple[int, int] | None = None,
                  dedup: bool = False, occurrences: int | None = None) -> dict:
    """Estimated bytes to search an index of n entries built by `factory`, before building it: 'ram' (faiss-cpu:
    the index and the code and count tables), 'disk' (the index folder, with de-duplication's entry maps) and
    'gpu' (the torch backend for Flat, IVF-Flat and CodePQ; faiss-gpu for PQ), with 'gpu_backend' naming it."""
    size = {} if codebook_shape is None else {"codebook_size": codebook_shape[0], "e_dim": codebook_shape[1]}
    quantizer = quantizer_bytes(factory, d)
    index = n * bytes_per_entry(factory, d, **size) + quantizer
    tables = n * (2 + (4 if dedup else 0))  # values uint16, counts uint32
    ram = index + tables
    disk = ram
    if dedup:  # entry codes (neighbours + value, uint16), CSR offsets (int64), one image id per occurrence (uint32)
        e = codebook_shape[1] if codebook_shape else 8
        disk += n * (2 * (d // e + 1) + 8) + 4 * (occurrences or n)
    m = CODE_PQ.fullmatch(factory)
    if factory == "Flat" or re.fullmatch(r"IVF\d+(_HNSW\d+)?,Flat", factory):
        gpu, backend = n * (4 * d + 4) + quantizer, "torch"
    elif m:
        sub = code_pq_shape(d, *(codebook_shape or (16384, 8)))[0]
        gpu, backend = n * (2 * sub + 4) + quantizer, "torch"  # int16 sub-codes and an int32 id per entry
    else:
        gpu, backend = index, "faiss-gpu"
    gpu += n * (2 + (4 if dedup else 0))  # the code (int16) and count (int32) tables beside the hits
    return {"ram": int(ram), "disk": int(disk), "gpu": int(gpu), "gpu_backend": backend}


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


def read_shard_files(folder: Path, names: list[str]) -> faiss.Index:
    """The shards of a non-IVF parallel build (`layout: shards`) as one faiss.IndexShards with successive ids."""
    indexes = [read_index(Path(folder) / n) for n in names]
    shards = faiss.IndexShards(indexes[0].d, True, True)  # threaded, successive ids
    for ix in indexes:
        shards.add_shard(ix)
    return shards
