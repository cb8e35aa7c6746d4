"""Exact k-NN in torch over a FAISS Flat, IVF-Flat or CodePQ index: GPU retrieval without faiss-gpu, sharded.

The index's entries are copied once into tensors, split over the devices given (parts): Flat as blocks of rows;
an IVF index as its trained centroids (on the first device) plus its inverted lists laid out contiguously per
part (CSR: data grouped by list, entry ids, list offsets [nlist + 1]), every list split evenly between the parts,
so each part scans 1/P of every probed list. IVF-Flat data are the vectors [n, d] float32. CodePQ data stay
compact: each entry's M sub-codes (int16 for codebooks up to 32,768 rows) and its id (int32 below 2^31 entries),
12 bytes per entry for Janus-Pro's L keys, where decoded keys would take 136. A CodePQ search computes for each
query the squared distances from its M sub-vectors to every codebook row (a [M, K] table, "ADC") and sums M
table entries per candidate: the exact distance, since a CodePQ key is those codebook rows concatenated.

A search probes the nprobe nearest centroids (exactly, also for an HNSW coarse quantiser), scans the probed
lists in every part and keeps the k smallest squared-L2 distances, computed as FAISS's scanners do (sums of
squared differences, or of table entries). The results are FAISS's: the same ids and distances up to float
rounding (tested against faiss-cpu). An IVF search reads no value back to the host: each probed list is scanned
padded to the longest list, so every shape is known in advance and a GPU decoding loop never waits for it.
Where lists are very unequal (the longest over PAD_IMBALANCE times the mean, e.g. an index built with --no-dedup
over flat backgrounds) padding would waste that factor, and the scan gathers exactly the probed entries
instead, which needs the candidate count on the host. PQ indexes with residuals stay on FAISS.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch

from arrag.errors import ArragError
from arrag.retrieval.index import is_code_pq, unpack_codes

FLAT_BLOCK = 1 << 18  # database rows scored per block in exact search (bounds the [Q, block] distance matrix)
SCAN_BYTES = 256 << 20  # padded IVF scan: queries per block so that the gathered data stay under this
PAD_IMBALANCE = 8  # padded IVF scan while the longest list is at most this many times the mean
QUERY_BLOCK = 256  # queries searched at a time (bounds CodePQ's distance tables: Q x M x K floats)
TABLE_QUERIES = 8  # queries whose CodePQ tables are computed at once


def torch_devices(spec) -> list[str]:
    """The torch devices of a GPU spec, over which the torch backend splits the index: 'cuda' -> every GPU,
    'cuda:1' -> that one, '0,1' or [0, 1] -> those."""
    if isinstance(spec, (list, tuple)):
        return [f"cuda:{int(g)}" for g in spec]
    spec = str(spec)
    if spec in ("cuda", "gpu", "all", "auto"):
        return [f"cuda:{g}" for g in range(max(1, torch.cuda.device_count()))]
    if spec.startswith("cuda:"):
        return [spec]
    try:
        return [f"cuda:{int(g)}" for g in spec.split(",") if g.strip()]
    except ValueError:
        raise ArragError(f"device {spec!r}: expected cpu, cuda, cuda:N or GPU ids such as 0,1") from None


class _Part:
    """One device's share of the entries: data (vectors [n, d] float32, or CodePQ sub-codes [n, M]) and ids [n]
    (None for Flat: the rows base, base + 1, ...), and for IVF the CSR offsets [nlist + 1] of its lists."""

    def __init__(self, data: torch.Tensor, ids: torch.Tensor | None, offsets: torch.Tensor | None, base: int = 0):
        self.data, self.ids, self.offsets, self.base = data, ids, offsets, base
        if offsets is not None:
            self.sizes = offsets[1:] - offsets[:-1]
            # Read once here, so that searches need no host value: the longest list bounds every probe's scan.
            self.longest = int(self.sizes.max()) if len(self.sizes) else 0
            self.padded = self.longest <= PAD_IMBALANCE * max(1.0, len(data) / max(1, len(self.sizes)))

    @property
    def device(self) -> torch.device:
        return self.data.device

    def to(self, device) -> _Part:
        t = lambda a: None if a is None else a.to(device)  # noqa: E731
        part = _Part(t(self.data), t(self.ids), None, self.base)
        if self.offsets is not None:
            part.offsets, part.sizes = t(self.offsets), t(self.sizes)
            part.longest, part.padded = self.longest, self.padded
        return part

    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() for a in (self.data, self.ids, self.offsets) if a is not None)


class TorchIndex:
    """search(queries [Q, d], k) -> (distances float32 [Q, k], ids int64 [Q, k], -1 where fewer than k exist)."""

    def __init__(self, parts: list[_Part], d: int, centroids: torch.Tensor | None = None, nprobe: int = 1,
                 codebook: torch.Tensor | None = None):
        self.parts, self.d, self.centroids, self.codebook = parts, d, centroids, codebook
        self.ntotal = sum(len(p.data) for p in parts)
        self.nlist = None if centroids is None else centroids.shape[0]
        self.nprobe = min(nprobe, self.nlist) if self.nlist else None

    @property
    def device(self) -> torch.device:
        """Where queries are probed and results gathered: the first part's device."""
        return self.parts[0].device

    @property
    def devices(self) -> list[torch.device]:
        return [p.device for p in self.parts]

    @property
    def padded(self) -> bool:
        return all(p.padded for p in self.parts)

    @padded.setter
    def padded(self, value: bool) -> None:
        for p in self.parts:
            p.padded = value

    @property
    def longest(self) -> int:
        return max(p.longest for p in self.parts)

    def bytes_per_entry(self) -> float:
        """Device memory per entry of the parts (data, ids and list offsets; not the centroids)."""
        return sum(p.nbytes() for p in self.parts) / max(1, self.ntotal)

    def to(self, device) -> TorchIndex:
        """Every part and table moved to one `device` (e.g. 'meta' to check that a search needs no host value)."""
        t = lambda a: None if a is None else a.to(device)  # noqa: E731
        return TorchIndex([p.to(device) for p in self.parts], self.d, t(self.centroids), self.nprobe or 1,
                          t(self.codebook))

    @classmethod
    def from_faiss(cls, index: faiss.Index, device: str | torch.device | list = "cpu") -> TorchIndex:
        """Copy a faiss IndexFlatL2, IndexIVFFlat or CodePQ (L2) to `device`, or split it over a list of devices
        (['cuda:0', 'cuda:1']; the same device twice is allowed); any other type is a one-line error."""
        devices = [torch.device(x) for x in (device if isinstance(device, (list, tuple)) else [device])]
        if not devices:
            raise ArragError("the torch search backend needs at least one device")
        owner, index = index, faiss.downcast_index(index)  # `owner` keeps the C++ index alive while it is read
        if index.metric_type != faiss.METRIC_L2:
            raise ArragError("the torch search backend supports L2 indexes only")
        if isinstance(index, faiss.IndexFlat):
            bounds = np.linspace(0, index.ntotal, len(devices) + 1).astype(np.int64)
            parts = []
            for dev, lo, hi in zip(devices, bounds[:-1], bounds[1:], strict=True):
                rows = index.reconstruct_n(int(lo), int(hi - lo)) if hi > lo else np.zeros((0, index.d), np.float32)
                parts.append(_Part(torch.from_numpy(np.ascontiguousarray(rows)).to(dev), None, None, int(lo)))
            return cls(parts, index.d)
        code_pq = is_code_pq(index)
        if not (isinstance(index, faiss.IndexIVFFlat) or code_pq):
            raise ArragError(f"the torch search backend handles Flat, IVF-Flat and CodePQ indexes, not "
                             f"{type(index).__name__}; install faiss-gpu for PQ indexes on the GPU, or search on "
                             "the CPU")
        made = cls._from_ivf(index, devices, code_pq)
        del owner
        return made

    @classmethod
    def _from_ivf(cls, index, devices: list[torch.device], code_pq: bool) -> TorchIndex:
        ivf = faiss.extract_index_ivf(index)
        centroids = faiss.downcast_index(ivf.quantizer).reconstruct_n(0, ivf.nlist)
        lists, n_parts = ivf.invlists, len(devices)
        sizes = np.array([lists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)
        # Part j holds the slice [size*j//P, size*(j+1)//P) of every list.
        cuts = (sizes[:, None] * np.arange(n_parts + 1)[None]) // n_parts           # [nlist, P + 1]
        part_sizes = np.diff(cuts, axis=1)                                           # [nlist, P]
        offsets = np.concatenate([np.zeros((1, n_parts), np.int64), np.cumsum(part_sizes, 0)])  # [nlist + 1, P]
        if code_pq:
            m, nbits, k = index.pq.M, index.pq.nbits, index.pq.ksub
            width, dtype = m, (np.int16 if k <= 1 << 15 else np.int32)
            codebook = faiss.vector_to_array(index.pq.centroids).reshape(m, k, index.pq.dsub)
        else:
            width, dtype, codebook = index.d, np.float32, None
        id_dtype = np.int32 if index.ntotal < 1 << 31 else np.int64
        data = [np.empty((offsets[-1, j], width), dtype) for j in range(n_parts)]
        ids = [np.empty(offsets[-1, j], id_dtype) for j in range(n_parts)]
        for lst in np.flatnonzero(sizes):  # one list at a time: memory stays at the parts plus one list
            n = int(sizes[lst])
            raw = np.frombuffer(faiss.rev_swig_ptr(lists.get_codes(int(lst)), n * ivf.code_size), dtype=np.uint8)
            rows = (unpack_codes(raw.reshape(n, ivf.code_size), m, nbits) if code_pq
                    else raw.view(np.float32).reshape(n, index.d))
            list_ids = faiss.rev_swig_ptr(lists.get_ids(int(lst)), n)
            for j in range(n_parts):
                lo, hi = cuts[lst, j], cuts[lst, j + 1]
                at = offsets[lst, j]
                data[j][at:at + hi - lo] = rows[lo:hi]
                ids[j][at:at + hi - lo] = list_ids[lo:hi]
        t = torch.from_numpy
        parts = [_Part(t(data[j]).to(dev), t(ids[j]).to(dev), t(np.ascontiguousarray(offsets[:, j])).to(dev))
                 for j, dev in enumerate(devices)]
        book = None if codebook is None else t(np.ascontiguousarray(codebook)).to(devices[0])
        return cls(parts, index.d, t(np.ascontiguousarray(centroids)).to(devices[0]), int(ivf.nprobe), book)

    def search(self, queries, k: int):
        """Like faiss.Index.search; NumPy in gives NumPy out, torch in gives torch out on the first device."""
        as_numpy = isinstance(queries, np.ndarray)
        q = torch.as_tensor(queries, dtype=torch.float32, device=self.device).reshape(-1, self.d)
        with torch.no_grad():
            found = [self._search_block(q[s:s + QUERY_BLOCK], k) for s in range(0, len(q), QUERY_BLOCK)]
            dist = torch.cat([f[0] for f in found]) if found else q.new_zeros(0, k)
            ids = torch.cat([f[1] for f in found]) if found else torch.zeros(0, k, dtype=torch.long,
                                                                             device=self.device)
        return (dist.cpu().numpy(), ids.cpu().numpy()) if as_numpy else (dist, ids)

    def probe(self, q: torch.Tensor) -> torch.Tensor:
        """The lists an IVF search of queries [Q, d] scans: Long [Q, nprobe], the nearest centroids in float32 (a
        centroid within rounding of the nprobe-th may be chosen differently than by FAISS's BLAS)."""
        c = self.centroids
        coarse = (q * q).sum(1, keepdim=True) + (c * c).sum(1)[None] - 2 * q @ c.T
        return coarse.topk(self.nprobe, dim=1, largest=False).indices

    def _search_block(self, q: torch.Tensor, k: int):
        probe = tables = None
        if self.centroids is not None:
            probe = self.probe(q)                                                # [Q, P] lists to scan
        if self.codebook is not None:
            m, _, dsub = self.codebook.shape
            sub = q.reshape(len(q), m, 1, dsub)
            # Differences, as FAISS computes its tables, a few queries at a time ([q, M, K, dsub] is large).
            tables = torch.cat([((sub[s:s + TABLE_QUERIES] - self.codebook[None]) ** 2).sum(-1)
                                for s in range(0, len(q), TABLE_QUERIES)])       # [Q, M, K]
        found = []
        for part in self.parts:
            dev = part.device
            move = lambda a, dev=dev: None if a is None else a.to(dev, non_blocking=True)  # noqa: E731
            if self.centroids is None:
                found.append(_flat(part, move(q), k))
            elif part.padded:
                found.append(_scan_padded(part, move(q), move(probe), move(tables), k))
            else:
                found.append(_scan_exact(part, move(q), move(probe), move(tables), k))
        if len(found) == 1:
            return _pad(*found[0], k)
        dist = torch.cat([f[0].to(self.device) for f in found], 1)
        ids = torch.cat([f[1].to(self.device) for f in found], 1)
        best, pick = dist.topk(min(k, dist.shape[1]), dim=1, largest=False)
        return _pad(best, ids.gather(1, pick), k)


def _flat(part: _Part, q: torch.Tensor, k: int):
    """Exact search of a part's rows in blocks, keeping a running top-k."""
    dev = part.device
    best_d = torch.full((len(q), k), float("inf"), device=dev)
    best_i = torch.full((len(q), k), -1, dtype=torch.long, device=dev)
    q_sq = (q * q).sum(1, keepdim=True)
    for s in range(0, len(part.data), FLAT_BLOCK):
        block = part.data[s:s + FLAT_BLOCK]
        d = (q_sq + (block * block).sum(1)[None] - 2 * q @ block.T).clamp_min_(0)
        rows = torch.arange(part.base + s, part.base + s + len(block), device=dev).expand(len(q), -1)
        d, i = torch.cat([best_d, d], 1), torch.cat([best_i, rows], 1)
        best_d, pick = d.topk(min(k, d.shape[1]), dim=1, largest=False)
        best_i = i.gather(1, pick)
    return best_d, best_i


def _distances(part: _Part, q: torch.Tensor, tables: torch.Tensor | None, rows: torch.Tensor,
               owner: torch.Tensor) -> torch.Tensor:
    """Squared-L2 distances from queries q[owner] to stored rows `rows` (`owner` broadcasts to the shape of `rows`):
    sums of squared differences (IVF-Flat) or of the queries' distance-table entries at the rows' sub-codes
    (CodePQ)."""
    if tables is None:
        diff = part.data[rows] - q[owner]
        return (diff * diff).sum(-1)
    m, k = tables.shape[1], tables.shape[2]
    codes = part.data[rows].long() + torch.arange(m, device=rows.device) * k      # [..., M] into the flat table
    flat = tables.reshape(len(tables), m * k)
    return flat[owner[..., None], codes].sum(-1)


def _scan_padded(part: _Part, q: torch.Tensor, probe: torch.Tensor, tables: torch.Tensor | None, k: int):
    """Every probed list read as `longest` slots, the slots past its end masked: fixed shapes, no host sync."""
    n_q, nprobe, width, dev = len(q), probe.shape[1], part.longest, part.device
    if width == 0:
        return q.new_zeros(n_q, 0), torch.zeros(n_q, 0, dtype=torch.long, device=dev)
    slot = torch.arange(width, device=dev)
    per_slot = 2 * part.data.shape[1] * (4 if tables is None else 12)  # gathered data, differences or indices
    per_block = max(1, SCAN_BYTES // (nprobe * width * per_slot))
    found_d, found_i = [], []
    for s in range(0, n_q, per_block):
        p = probe[s:s + per_block]
        inside = slot < part.sizes[p][..., None]                              # [q, P, W]
        rows = torch.where(inside, part.offsets[:-1][p][..., None] + slot, 0)
        owner = torch.arange(s, s + len(p), device=dev)[:, None, None]        # broadcast, not copied
        dist = torch.where(inside, _distances(part, q, tables, rows, owner), float("inf")).flatten(1)
        best_d, pick = dist.topk(min(k, dist.shape[1]), dim=1, largest=False)
        found_d.append(best_d)
        found_i.append(torch.where(inside, part.ids[rows].long(), -1).flatten(1).gather(1, pick))
    return torch.cat(found_d), torch.cat(found_i)


def _scan_exact(part: _Part, q: torch.Tensor, probe: torch.Tensor, tables: torch.Tensor | None, k: int):
    """Exactly the probed entries, laid out per query (for very unequal lists; reads the count to the host)."""
    n_q, nprobe, dev = len(q), probe.shape[1], part.device
    lens = part.sizes[probe].reshape(-1)                                       # [Q*P]
    starts = part.offsets[:-1][probe].reshape(-1)
    per_query = lens.reshape(n_q, nprobe).sum(1)                               # candidates per query
    total = int(per_query.sum())
    if total == 0:
        return q.new_zeros(n_q, 0), torch.zeros(n_q, 0, dtype=torch.long, device=dev)
    seg = torch.repeat_interleave(torch.arange(n_q * nprobe, device=dev), lens)
    seg_start = torch.cumsum(lens, 0) - lens
    within = torch.arange(total, device=dev) - seg_start[seg]
    rows = starts[seg] + within                                                # stored row of each candidate
    owner = seg // nprobe                                                      # its query
    col = torch.arange(total, device=dev) - (torch.cumsum(per_query, 0) - per_query)[owner]
    dist = torch.full((n_q, int(per_query.max())), float("inf"), device=dev)
    dist[owner, col] = _distances(part, q, tables, rows, owner)
    cand = torch.full(dist.shape, -1, dtype=torch.long, device=dev)
    cand[owner, col] = part.ids[rows].long()
    best_d, pick = dist.topk(min(k, dist.shape[1]), dim=1, largest=False)
    return best_d, cand.gather(1, pick)


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
