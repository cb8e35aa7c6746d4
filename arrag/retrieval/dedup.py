"""Entries as rows of codes, their de-duplication with counts, and the expansion that undoes it in search results.

An entry of a code-keyed index is fully described by its row of uint16 codes: the neighbours in key order,
then the value (the code at the target). Identical rows are identical (key, value) pairs: flat backgrounds
repeat them endlessly. De-duplicated, each distinct row is stored once with its count and the images it
came from (CSR: offsets per entry into a list of image ids, in image order; an image appears once per
occurrence). Searching a de-duplicated index and expanding every hit by its count gives the results of the
full index (the same k nearest (distance, code) pairs), so DAiD, FAiD and construct-train see no difference.
Rows are partitioned across build processes by a hash of the row, so every copy of a row meets in the same
process and de-duplication across processes needs no exchange.
"""

from __future__ import annotations

import numpy as np
import torch

from arrag.retrieval.neighborhood import Neighborhood, keys_for_grid

_MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x2545F4914F6CDD1D, 0x94D049BB133111EB],
                dtype=np.uint64)


def entry_rows(codes: np.ndarray, nb: Neighborhood, first_image: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Code grids [c, h, w] -> (rows uint16 [c*P, n+1]: neighbours then value, images int64 [c*P])."""
    pos, nbr = keys_for_grid(codes, nb)
    values = codes.reshape(len(codes), -1)[:, pos]
    rows = np.concatenate([nbr.astype(np.uint16), values[..., None].astype(np.uint16)], -1)
    images = np.repeat(np.arange(first_image, first_image + len(codes), dtype=np.int64), len(pos))
    return rows.reshape(-1, rows.shape[-1]), images


def row_hash(rows: np.ndarray) -> np.ndarray:
    """A deterministic 64-bit hash per row (the same on every machine): uint64 [N]."""
    h = np.zeros(len(rows), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(rows.shape[1]):
            h = (h ^ rows[:, j].astype(np.uint64)) * _MIX[j % len(_MIX)]
            h ^= h >> np.uint64(29)
    return h


def place(rows: np.ndarray, world: int, buckets: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(build process 0..world-1, bucket 0..buckets-1) of each row, from its hash: every copy of a row lands
    in the same process and bucket, so each bucket can be de-duplicated on its own."""
    h = row_hash(rows)
    return (h % np.uint64(world)).astype(np.int64), ((h // np.uint64(world)) % np.uint64(buckets)).astype(np.int64)


def dedup(rows: np.ndarray, images: np.ndarray):
    """Occurrences (rows [N, m] uint16, images [N], any order) -> (distinct rows [U, m] in lexicographic order,
    counts int64 [U], offsets int64 [U+1], image ids uint32 [N]: occurrences of entry u are
    image_ids[offsets[u]:offsets[u+1]], ascending). The result depends only on the multiset of occurrences, not
    on their order (rows exchanged between ranks arrive in any order)."""
    if len(rows) == 0:
        return rows, np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.uint32)
    order = np.lexsort((images, *rows.T[::-1]))  # rows in lexicographic order, each row's images ascending
    srt = rows[order]
    starts = np.flatnonzero(np.concatenate([[True], (srt[1:] != srt[:-1]).any(1)]))
    offsets = np.concatenate([starts, [len(rows)]]).astype(np.int64)
    return rows[order[starts]], np.diff(offsets), offsets, images[order].astype(np.uint32)


def expand(dist, ids, counts, k: int, weights_per_hit: bool = False):
    """Hits of a de-duplicated index -> the hits of the full one: each hit repeated by its count, cut at k.

    dist, ids [Q, k'] (ids -1 = none), counts [U] per entry (NumPy, or torch on the ids' device), or with
    weights_per_hit one count per hit ([Q * k'], e.g. with some copies excluded) -> (dist, ids) [Q, k], -1 and
    the largest float where fewer than k copies exist. NumPy in, NumPy out; torch in, torch out (one torch
    implementation serves both: NumPy arrays are wrapped without copying).
    """
    numpy_in = not isinstance(ids, torch.Tensor)
    if numpy_in:
        c = counts.reshape(ids.shape) if weights_per_hit else np.asarray(counts[np.maximum(ids, 0)])
        dist, ids, c = torch.from_numpy(np.asarray(dist)), torch.from_numpy(np.asarray(ids)), torch.from_numpy(c)
    else:
        c = counts.reshape(ids.shape) if weights_per_hit else counts[ids.clamp(min=0)]
    c = torch.where(ids >= 0, c.long(), 0)
    slots = torch.arange(k, device=ids.device).expand(len(ids), k).contiguous()
    pick = torch.searchsorted(c.cumsum(1), slots, right=True)  # the hit holding copy number `slot`
    valid = pick < ids.shape[1]
    pick = pick.clamp(max=ids.shape[1] - 1)
    out_ids = torch.where(valid, ids.gather(1, pick), -1)
    out_d = torch.where(valid, dist.gather(1, pick), float(np.finfo(np.float32).max))
    return (out_d.numpy(), out_ids.numpy()) if numpy_in else (out_d, out_ids)


def copies_in_top(ids, counts, k: int):
    """How many copies of each raw hit of a de-duplicated index the full index's top k holds: [Q, k'] int64.

    ids [Q, k'] nearest first (-1 = none), counts [U] (NumPy, or torch on the ids' device). A hit holds
    min(count, k - copies of the nearer hits) copies, 0 once k are filled: the weights that let DAiD work on
    the raw hits, equal to expanding them (`expand`) and aggregating the copies, at a fraction of the cost.
    NumPy in, NumPy out; torch in, torch out.
    """
    # Written once for both array kinds (NumPy ops are several times cheaper per call on a decoding step's
    # small arrays than wrapping them as tensors): c = count of each hit (0 for none), as int64.
    c = counts[ids.clip(min=0)] * (ids >= 0) + 0 * ids
    nearer = c.cumsum(1) - c
    return (k - nearer).clip(max=c).clip(min=0)

