"""Seeded k-means in torch, on the CPU or a GPU: the coarse quantiser's training where faiss-gpu is absent.

The same algorithm as FAISS's Clustering: Lloyd's iterations from k distinct points drawn with the seed, each
empty cluster split off the largest one by a small symmetric perturbation. Points are assigned in blocks, so
memory stays at the points, the centroids and one block of distances.
"""

from __future__ import annotations

import numpy as np
import torch

from arrag.errors import ArragError

ASSIGN_BYTES = 256 << 20  # distance block per assignment step
SPLIT_EPS = 1.0 / 1024  # relative perturbation when an empty cluster takes half of the largest (FAISS's value)


def assign(points: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(nearest centroid [n] int64, its squared-L2 distance [n]) of points [n, d] among centroids [k, d]."""
    c_sq = (centroids * centroids).sum(1)
    per_block = max(1, ASSIGN_BYTES // (4 * max(1, len(centroids))))
    labels, dists = [], []
    for s in range(0, len(points), per_block):
        x = points[s:s + per_block]
        d = (x * x).sum(1, keepdim=True) + c_sq[None] - 2 * x @ centroids.T
        best, label = d.min(1)
        labels.append(label)
        dists.append(best.clamp_min(0))
    return torch.cat(labels), torch.cat(dists)


def kmeans(points: np.ndarray, k: int, iters: int = 25, seed: int = 0, device: str | torch.device = "cpu"
           ) -> np.ndarray:
    """Centroids [k, d] float32 of points [n, d] (n >= k); the same seed, points and device give the same ones."""
    if len(points) < k:
        raise ArragError(f"k-means: {k:,} clusters need at least {k:,} training points, got {len(points):,}")
    device = torch.device(device)
    x = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32)).to(device)
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(len(x), generator=g)[:k].to(device)].clone()
    for _ in range(iters):
        labels, _ = assign(x, centroids)
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None].float()
        empty = (~filled).nonzero().flatten().tolist()
        if empty:
            sizes = counts.tolist()
            sign = torch.ones(x.shape[1], device=device)
            sign[1::2] = -1  # alternate coordinates move apart in opposite directions
            for j in empty:  # few, and only in early iterations
                big = max(range(k), key=sizes.__getitem__)
                centroids[j] = centroids[big] * (1 + SPLIT_EPS * sign)
                centroids[big] = centroids[big] * (1 - SPLIT_EPS * sign)
                sizes[j] = sizes[big] // 2
                sizes[big] -= sizes[j]
    return centroids.cpu().numpy()


TWO_LEVEL_LISTS = 32768  # on CPUs, coarse quantisers of this many lists or more train by two-level k-means


def two_level_kmeans(points: np.ndarray, k: int, iters: int = 10, seed: int = 0) -> np.ndarray:
    """Centroids [k, d] float32 by k-means in two levels (FAISS's k-means at each): first into g ~ sqrt(k) groups,
    then each group into a share of k proportional to its points. It costs n * (g + k / g) distance evaluations an
    iteration instead of n * k: 128x fewer for 2^16 lists, hours to a minute on a CPU, at a slightly higher
    quantisation error than one flat k-means."""
    import faiss

    n, d = points.shape
    if n < k:
        raise ArragError(f"k-means: {k:,} clusters need at least {k:,} training points, got {n:,}")
    x = np.ascontiguousarray(points, dtype=np.float32)
    groups = int(min(k, 2 ** round(np.log2(np.sqrt(k)))))
    top = faiss.Kmeans(d, groups, niter=iters, seed=seed, max_points_per_centroid=n)
    top.train(x)
    label = top.index.search(x, 1)[1].reshape(-1)
    sizes = np.bincount(label, minlength=groups)
    share = _shares(sizes, k)
    order = np.argsort(label, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    out = []
    for g in np.flatnonzero(share):
        members = x[order[starts[g]:starts[g + 1]]]
        if share[g] == len(members):
            out.append(members)
            continue
        sub = faiss.Kmeans(d, int(share[g]), niter=iters, seed=seed + 1 + int(g), max_points_per_centroid=n)
        sub.train(members)
        out.append(sub.centroids)
    return np.concatenate(out).astype(np.float32)


def _shares(sizes: np.ndarray, k: int) -> np.ndarray:
    """Centroids per group [g]: proportional to its points, summing to k, never more than its points."""
    total = sizes.sum()
    share = np.minimum(sizes, np.floor(sizes * k / total).astype(np.int64))
    while share.sum() < k:  # hand out the remainder to the groups with most points per centroid, with room left
        room = sizes - share
        pick = np.argmax(np.where(room > 0, sizes / np.maximum(share, 1), -1))
        share[pick] += 1
    return share
