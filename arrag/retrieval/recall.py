"""Search quality and speed of a retriever: recall@k against exact search, queries per second, IVF list
balance and how many distinct codes a top-k holds.

Patch keys are concatenated codebook rows, so many entries share a key exactly and the "true" top-k is
ambiguous among ties. Recall is therefore measured on distances: a returned hit counts when its true
distance is within the exact k-th distance (+1e-5). True distances are recomputed from the code store
for every returned id, so approximate (PQ) distances never flatter the figure.
"""

from __future__ import annotations

import time

import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth

from arrag.errors import ArragError
from arrag.retrieval import index as faiss_index
from arrag.retrieval.codestore import CodeStore
from arrag.retrieval.keys import grid_entries
from arrag.retrieval.retriever import PatchRetriever


def exact_distances(retriever: PatchRetriever, store: CodeStore, queries: np.ndarray, k: int = 10,
                    chunk_images: int = 1024) -> np.ndarray:
    """The exact k nearest squared-L2 distances [Q, k] of `queries` over every key of the index's code store."""
    occurrences = int(retriever.manifest.get("occurrences", retriever.entries))
    if store.num_images * int(retriever.manifest["entries_per_image"]) != occurrences:
        raise ArragError(f"code store {store.folder} does not match the index ({occurrences} entries)")
    key_source, codebook = retriever.manifest["key_source"], store.codebook()

    def blocks():
        lat_iter = store.iter_chunks(chunk_images, "latents") if key_source == "latent" else None
        for _, codes in store.iter_chunks(chunk_images):
            latents = next(lat_iter)[1] if lat_iter is not None else None
            yield grid_entries(codes, latents, retriever.neighborhood, codebook, key_source)[0]

    return knn_ground_truth(np.ascontiguousarray(queries, dtype=np.float32), blocks(), k)[0]


def recall_at_k(retriever: PatchRetriever, store: CodeStore, queries: np.ndarray, k: int = 10,
                chunk_images: int = 1024, exact: np.ndarray | None = None) -> float:
    """Tie-aware recall@k of `retriever` against exact search over the keys of its own code store.

    `exact`: the distances from exact_distances, when several settings are compared on the same queries.
    """
    exact_d = exact if exact is not None else exact_distances(retriever, store, queries, k, chunk_images)
    _, ids = retriever.search_ids(np.ascontiguousarray(queries, dtype=np.float32), k)
    found = ids >= 0
    true_d = np.full(ids.shape, np.inf, dtype=np.float32)
    if found.any():
        keys = retriever.entry_keys(ids[found], store)
        q_rep = np.repeat(queries, found.sum(1), axis=0)
        true_d[found] = ((keys - q_rep) ** 2).sum(1)
    good = true_d <= exact_d[:, k - 1:k] + 1e-5
    return float(good.sum() / (len(queries) * k))


def nprobe_sweep(retriever: PatchRetriever, store: CodeStore | None, queries: np.ndarray, k: int = 10,
                 values: tuple[int, ...] | None = None) -> list[dict]:
    """Recall@k and queries/s (batch 16) at several nprobe values of an IVF index; the retriever's own nprobe is
    restored afterwards. Default values: powers of 4 from 1 to nlist, plus the current setting.

    With the code store, recall is against exact search; without it (the original prebuilt database), it is
    the share of the hits found by probing every list ("recall_vs_all_lists").
    """
    nlist = retriever.manifest.get("nlist")
    if not nlist:
        return []
    current = retriever.nprobe
    if values is None:
        values = tuple(sorted({min(4 ** i, nlist) for i in range(12) if 4 ** i <= 4 * nlist} | {current or 1}))
    q = np.ascontiguousarray(queries, dtype=np.float32)
    exact = exact_distances(retriever, store, q, k) if store is not None else None
    rows = []
    try:
        if store is None:
            retriever.set_nprobe(nlist)
            full_ids = retriever.search_ids(q, k)[1]
        for nprobe in values:
            retriever.set_nprobe(nprobe)
            if store is not None:
                row = {"nprobe": retriever.nprobe, "recall": recall_at_k(retriever, store, q, k, exact=exact)}
            else:
                ids = retriever.search_ids(q, k)[1]
                same = [len(set(a[a >= 0]) & set(b[b >= 0])) / max(1, (b >= 0).sum())
                        for a, b in zip(ids, full_ids, strict=True)]
                row = {"nprobe": retriever.nprobe, "recall_vs_all_lists": float(np.mean(same))}
            row["queries_per_s"] = queries_per_second(retriever, q, k, 16, min_seconds=0.2)
            rows.append(row)
    finally:
        if current is not None:
            retriever.set_nprobe(current)
    return rows


def queries_per_second(retriever: PatchRetriever, queries: np.ndarray, k: int, batch: int,
                       min_seconds: float = 0.5) -> float:
    """Throughput of retriever.search at a given batch size (queries/s), timed for at least min_seconds."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    done, t0, i = 0, time.perf_counter(), 0
    while True:
        s = (i * batch) % max(1, len(q) - batch + 1)
        retriever.search(q[s:s + batch], k)
        done += batch
        i += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds and i >= 3:
            return done / elapsed


def list_balance(retriever: PatchRetriever) -> dict | None:
    """IVF list sizes of a CPU FAISS index: {'imbalance_factor': nlist * sum(n_i^2) / N^2 (1 = even lists),
    'largest_list': the biggest list's entries}; None for other indexes. Uneven lists make searches slow,
    since a probe of a crowded list scans most of the index."""
    if retriever.backend != "faiss-cpu" or not retriever.manifest.get("nlist"):
        return None
    try:
        sizes = faiss_index.list_sizes(retriever.index).astype(np.float64)
    except ArragError:  # not a plain IVF index (e.g. shards)
        return None
    total = sizes.sum()
    factor = len(sizes) * (sizes ** 2).sum() / total ** 2 if total else 1.0
    return {"imbalance_factor": round(float(factor), 3), "largest_list": int(sizes.max(initial=0))}


def distinct_codes_per_topk(retriever: PatchRetriever, queries: np.ndarray, k: int) -> float:
    """The mean number of different codes among a query's k nearest hits (what DAiD can spread p_ret over)."""
    codes = retriever.search(np.ascontiguousarray(queries, dtype=np.float32), k)[1]
    return float(np.mean([len(np.unique(row[row >= 0])) for row in codes])) if len(codes) else 0.0
