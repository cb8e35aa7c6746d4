"""Exact k-NN in torch over a FAISS Flat or IVF-Flat index's own vectors: GPU retrieval without faiss-gpu.

The index's stored vectors are copied once into tensors on the device: Flat as one [N, d] matrix; IVF-Flat as
its trained centroids plus the inverted lists laid out contiguously (CSR: vectors [N, d] grouped by list,
their entry ids [N], list offsets [nlist + 1]). A search probes the nprobe nearest centroids, gathers the
probed lists' vectors for every query at once and keeps the k smallest squared-L2 distances, which are
computed directly (sum of squared differences), as FAISS's IVF-Flat scanner does. The results are FAISS's:
the same ids and distances up to float rounding (tested against faiss-cpu). An IVF search reads no value back
to the host: each probed list is scanned padded to the longest list, so every shape is known in advance and a
GPU decoding loop never waits for it. Where lists are very unequal (the longest over PAD_IMBALANCE times the
mean, e.g. an index built with --no-dedup over flat backgrounds) padding would waste that factor, and the scan
gathers exactly the probed entries instead, which needs the candidate count on the host. A CodePQ index's
codes are decoded to its exact keys, so it is served as IVF-Flat (at IVF-Flat's memory on the device). PQ
indexes stay on FAISS.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch

from arrag.errors import ArragError
from arrag.retrieval.index import is_code_pq

FLAT_BLOCK = 1 << 18  # database rows scored per block in exact search (bounds the [Q, block] distance matrix)
SCAN_BYTES = 256 << 20  # padded IVF scan: queries per block so that the gathered vectors stay under this
PAD_IMBALANCE = 8  # padded IVF scan while the longest list is at most this many times the mean


class TorchIndex:
    """search(queries [Q, d], k) -> (distances float32 [Q, k], ids int64 [Q, k], -1 where fewer than k exist)."""

    def __init__(self, vectors: torch.Tensor, ids: torch.Tensor | None, centroids: torch.Tensor | None = None,
                 offsets: torch.Tensor | None = None, nprobe: int = 1):
        self.vectors, self.ids, self.centroids, self.offsets = vectors, ids, centroids, offsets
        self.d = vectors.shape[1]
        self.ntotal = vectors.shape[0]
        self.nlist = None if centroids is None else centroids.shape[0]
        self.nprobe = min(nprobe, self.nlist) if self.nlist else None
        if offsets is not None:
            self.sizes = offsets[1:] - offsets[:-1]
            # Read once here, so that searches need no host value: the longest list bounds every probe's scan.
            self.longest = int(self.sizes.max()) if len(self.sizes) else 0
            self.padded = self.longest <= PAD_IMBALANCE * max(1.0, self.ntotal / len(self.sizes))

    @property
    def device(self) -> torch.device:
        return self.vectors.device

    @classmethod
    def from_faiss(cls, index: faiss.Index, device: str | torch.device = "cpu") -> TorchIndex:
        """Copy a faiss IndexFlatL2 or IndexIVFFlat (L2) to `device`; any other type is a one-line error."""
        index = faiss.downcast_index(index)
        if index.metric_type != faiss.METRIC_L2:
            raise ArragError("the torch search backend supports L2 indexes only")
        if isinstance(index, faiss.IndexFlat):
            vectors = index.reconstruct_n(0, index.ntotal) if index.ntotal else np.zeros((0, index.d), np.float32)
            return cls(torch.from_numpy(np.ascontiguousarray(vectors)).to(device), None)
        code_pq = is_code_pq(index)
        if isinstance(index, faiss.IndexIVFFlat) or code_pq:
            quantizer = faiss.downcast_index(index.quantizer)
            centroids = quantizer.reconstruct_n(0, index.nlist)
            lists = faiss.extract_index_ivf(index).invlists
            parts, id_parts, sizes = [], [], []
            for lst in range(index.nlist):
                n = lists.list_size(lst)
                sizes.append(n)
                if n == 0:
                    continue
                codes = faiss.rev_swig_ptr(lists.get_codes(lst), n * index.code_size)
                if code_pq:  # the keys themselves, decoded exactly from their codebook codes
                    parts.append(index.pq.decode(np.frombuffer(codes, dtype=np.uint8).reshape(n, index.code_size)))
                else:
                    parts.append(np.frombuffer(codes, dtype=np.float32).reshape(n, index.d).copy())
                id_parts.append(faiss.rev_swig_ptr(lists.get_ids(lst), n).copy())
            vectors = np.concatenate(parts) if parts else np.zeros((0, index.d), np.float32)
            ids = np.concatenate(id_parts).astype(np.int64) if id_parts else np.zeros(0, np.int64)
            offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
            return cls(t(vectors), t(ids), t(centroids), t(offsets), nprobe=int(index.nprobe))
        raise ArragError(f"the torch search backend handles Flat, IVF-Flat and CodePQ indexes, not "
                         f"{type(index).__name__}; install faiss-gpu for PQ indexes on the GPU, or search on the CPU")

    def search(self, queries, k: int):
        """Like faiss.Index.search; NumPy in gives NumPy out, torch in gives torch out on this device."""
        as_numpy = isinstance(queries, np.ndarray)
        q = torch.as_tensor(queries, dtype=torch.float32, device=self.device).reshape(-1, self.d)
        with torch.no_grad():
            if self.centroids is None:
                dist, ids = self._flat(q, k)
            else:
                dist, ids = self._ivf(q, k)
        return (dist.cpu().numpy(), ids.cpu().numpy()) if as_numpy else (dist, ids)

    def _flat(self, q: torch.Tensor, k: int):
        """Exact search in blocks of rows, keeping a running top-k."""
        best_d = torch.full((len(q), k), float("inf"), device=self.device)
        best_i = torch.full((len(q), k), -1, dtype=torch.long, device=self.device)
        q_sq = (q * q).sum(1, keepdim=True)
        for s in range(0, self.ntotal, FLAT_BLOCK):
            block = self.vectors[s:s + FLAT_BLOCK]
            d = (q_sq + (block * block).sum(1)[None] - 2 * q @ block.T).clamp_min_(0)
            d, i = torch.cat([best_d, d], 1), torch.cat([best_i, torch.arange(s, s + len(block), device=self.device)
                                                         .expand(len(q), -1)], 1)
            best_d, pick = d.topk(min(k, d.shape[1]), dim=1, largest=False)
            best_i = i.gather(1, pick)
        return _pad(best_d, best_i, k)

    def _ivf(self, q: torch.Tensor, k: int):
        c = self.centroids
        coarse = (q * q).sum(1, keepdim=True) + (c * c).sum(1)[None] - 2 * q @ c.T
        probe = coarse.topk(self.nprobe, dim=1, largest=False).indices       # [Q, P] lists to scan
        return self._scan_padded(q, probe, k) if self.padded else self._scan_exact(q, probe, k)

    def _scan_padded(self, q: torch.Tensor, probe: torch.Tensor, k: int):
        """Every probed list read as `longest` slots, the slots past its end masked: fixed shapes, no host sync."""
        n_q, nprobe, width = len(q), probe.shape[1], self.longest
        if width == 0:
            return _pad(q.new_zeros(n_q, 0), torch.zeros(n_q, 0, dtype=torch.long, device=self.device), k)
        slot = torch.arange(width, device=self.device)
        per_block = max(1, SCAN_BYTES // (2 * nprobe * width * self.d * 4))  # the gathered vectors and differences
        found_d, found_i = [], []
        for s in range(0, n_q, per_block):
            p = probe[s:s + per_block]
            inside = slot < self.sizes[p][..., None]                             # [q, P, W]
            rows = torch.where(inside, self.offsets[:-1][p][..., None] + slot, 0)
            diff = self.vectors[rows] - q[s:s + per_block, None, None]           # [q, P, W, d]
            dist = torch.where(inside, (diff * diff).sum(-1), float("inf")).flatten(1)
            best_d, pick = dist.topk(min(k, dist.shape[1]), dim=1, largest=False)
            found_d.append(best_d)
            found_i.append(torch.where(inside, self.ids[rows], -1).flatten(1).gather(1, pick))
        return _pad(torch.cat(found_d), torch.cat(found_i), k)

    def _scan_exact(self, q: torch.Tensor, probe: torch.Tensor, k: int):
        """Exactly the probed entries, laid out per query (for very unequal lists; reads the count to the host)."""
        n_q, nprobe = len(q), probe.shape[1]
        lens = self.sizes[probe].reshape(-1)                                   # [Q*P]
        starts = self.offsets[:-1][probe].reshape(-1)
        per_query = lens.reshape(n_q, nprobe).sum(1)                           # candidates per query
        total = int(per_query.sum())
        if total == 0:
            return _pad(q.new_zeros(n_q, 0), torch.zeros(n_q, 0, dtype=torch.long, device=self.device), k)
        seg = torch.repeat_interleave(torch.arange(n_q * nprobe, device=self.device), lens)
        seg_start = torch.cumsum(lens, 0) - lens
        within = torch.arange(total, device=self.device) - seg_start[seg]
        rows = starts[seg] + within                                            # stored vector of each candidate
        owner = seg // nprobe                                                  # its query
        col = torch.arange(total, device=self.device) - (torch.cumsum(per_query, 0) - per_query)[owner]
        diff = self.vectors[rows] - q[owner]
        dist = torch.full((n_q, int(per_query.max())), float("inf"), device=self.device)
        dist[owner, col] = (diff * diff).sum(1)
        cand = torch.full(dist.shape, -1, dtype=torch.long, device=self.device)
        cand[owner, col] = self.ids[rows]
        best_d, pick = dist.topk(min(k, dist.shape[1]), dim=1, largest=False)
        return _pad(best_d, cand.gather(1, pick), k)


def _pad(dist: torch.Tensor, ids: torch.Tensor, k: int):
    """Fill to k columns as FAISS does where no entry was found: id -1, distance the largest float32."""
    if dist.shape[1] < k:
        extra = k - dist.shape[1]
        dist = torch.cat([dist, dist.new_full((len(dist), extra), float("inf"))], 1)
        ids = torch.cat([ids, ids.new_full((len(ids), extra), -1)], 1)
    missing = torch.isinf(dist)
    ids = torch.where(missing, torch.full_like(ids, -1), ids)
    dist = torch.where(missing, torch.full_like(dist, torch.finfo(torch.float32).max), dist)
    return dist.float(), ids


def supports(index: faiss.Index) -> bool:
    """True for the index types the torch backend can serve (Flat, IVF-Flat and CodePQ, L2)."""
    index = faiss.downcast_index(index)
    return index.metric_type == faiss.METRIC_L2 and (isinstance(index, (faiss.IndexFlat, faiss.IndexIVFFlat))
                                                     or is_code_pq(index))
