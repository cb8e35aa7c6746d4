"""The one definition of which neighbours form a retrieval key, and which grid cells are valid targets.

Shapes (offsets (dr, dc) from the target cell, in key order):
  L      causal, the released AR-RAG key: upper-left, up, upper-right, left. Valid targets at 24x24:
         1 <= r < h and 1 <= c <= w-2, i.e. 506 of 576.
  2hop   causal window of two rows above (5 wide) and two cells to the left: 12 neighbours.
  ring   the 8 surrounding cells, for non-causal (parallel) decoders such as Show-o.
A target is valid when every neighbour lies inside the grid. Index building, DAiD queries, FAiD
training-set construction and FAiD inference all call this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from arrag.errors import ArragError


@dataclass(frozen=True)
class Neighborhood:
    name: str
    offsets: tuple[tuple[int, int], ...]
    causal: bool

    @property
    def size(self) -> int:
        return len(self.offsets)

    def key_dim(self, embed_dim: int) -> int:
        """Length of a key: neighbours x codebook vector size (4 x 8 = 32 for L with VQ-16)."""
        return self.size * embed_dim

    def valid_mask(self, h: int, w: int) -> np.ndarray:
        """bool [h, w]: True where every neighbour lies inside the grid."""
        r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        ok = np.ones((h, w), dtype=bool)
        for dr, dc in self.offsets:
            ok &= (r + dr >= 0) & (r + dr < h) & (c + dc >= 0) & (c + dc < w)
        return ok

    def positions(self, h: int, w: int) -> np.ndarray:
        """int64 [P]: flat raster indices of the valid targets, ascending."""
        return _positions(self, h, w).copy()

    def neighbour_index(self, h: int, w: int) -> np.ndarray:
        """int64 [P, n]: flat raster indices of each valid target's neighbours, in key order."""
        return _neighbour_index(self, h, w).copy()

    def step_table(self, h: int, w: int) -> np.ndarray:
        """int64 [h*w, n]: neighbour flat indices for each raster step, -1 rows where the target is invalid.

        For causal shapes every listed neighbour precedes the target, so a decoder can build the query of
        step t from the codes it has already sampled.
        """
        table = np.full((h * w, self.size), -1, dtype=np.int64)
        table[_positions(self, h, w)] = _neighbour_index(self, h, w)
        return table


@lru_cache(maxsize=64)
def _positions(nb: Neighborhood, h: int, w: int) -> np.ndarray:
    return np.flatnonzero(nb.valid_mask(h, w))


@lru_cache(maxsize=64)
def _neighbour_index(nb: Neighborhood, h: int, w: int) -> np.ndarray:
    pos = _positions(nb, h, w)
    r, c = pos // w, pos % w
    return np.stack([(r + dr) * w + (c + dc) for dr, dc in nb.offsets], axis=1)


SHAPES: dict[str, Neighborhood] = {
    "L": Neighborhood("L", ((-1, -1), (-1, 0), (-1, 1), (0, -1)), causal=True),
    "2hop": Neighborhood("2hop", tuple((dr, dc) for dr in (-2, -1) for dc in range(-2, 3)) + ((0, -2), (0, -1)),
                         causal=True),
    "ring": Neighborhood("ring", ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)),
                         causal=False),
}


def causal_window_index(h: int, w: int, hop: int) -> np.ndarray:
    """int64 [h*w, 2*hop+1, 2*hop+1]: for each target cell, the flat index of every cell of the square window
    centred on it, or -1 where the cell is outside the grid, is the target itself, or comes after it in
    raster order (FAiD's causal window: the centre is filled by a retrieved candidate instead).
    """
    r, c = np.divmod(np.arange(h * w), w)
    d = np.arange(-hop, hop + 1)
    dr, dc = d[:, None], d[None, :]
    rr, cc = r[:, None, None] + dr, c[:, None, None] + dc
    inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
    before = (dr < 0) | ((dr == 0) & (dc < 0))
    return np.where(inside & before, rr * w + cc, -1).astype(np.int64)


def get_neighborhood(shape: str | Neighborhood = "L") -> Neighborhood:
    if isinstance(shape, Neighborhood):
        return shape
    if shape not in SHAPES:
        raise ArragError(f"unknown neighbourhood shape {shape!r}; choose one of {', '.join(SHAPES)}")
    return SHAPES[shape]


def valid_mask(h: int, w: int, shape: str | Neighborhood = "L") -> np.ndarray:
    """bool [h, w] of valid target cells for `shape`."""
    return get_neighborhood(shape).valid_mask(h, w)


def keys_for_grid(codes: np.ndarray | torch.Tensor, shape: str | Neighborhood = "L"):
    """Neighbour codes of every valid target of every grid, vectorised (no loop over positions).

    codes [N, h, w] -> (positions int64 [P] flat raster indices, neighbour codes [N, P, n], same type/dtype
    as `codes`). The values (the codes at the targets) are codes.reshape(N, -1)[:, positions].
    Trailing dims are carried along: latents [N, h, w, e] give neighbour latents [N, P, n, e].
    """
    nb = get_neighborhood(shape)
    if codes.ndim < 3:
        raise ArragError(f"codes must be [N, h, w]; got shape {tuple(codes.shape)}")
    n, h, w = codes.shape[:3]
    pos, idx = _positions(nb, h, w), _neighbour_index(nb, h, w)
    flat = codes.reshape(n, h * w, *codes.shape[3:])
    if isinstance(codes, torch.Tensor):
        return torch.from_numpy(pos), flat[:, torch.from_numpy(idx).to(codes.device)]
    return pos.copy(), flat[:, idx]


def grid_key_vectors(codes: np.ndarray, codebook: np.ndarray, shape: str | Neighborhood = "L"):
    """Keys of every valid target of every grid in one pass: codes [N, h, w] -> (positions [P], keys [N, P, n*e]).

    Same numbers as key_vectors(keys_for_grid(codes)[1], codebook), about 1.5x faster: each cell is
    embedded once, and the valid targets form a rectangle, so each run of horizontally adjacent
    neighbours (L: the three cells above) is one strided block copy from a sliding window, not a gather.
    """
    nb = get_neighborhood(shape)
    n, h, w = codes.shape
    pos = _positions(nb, h, w)
    book = np.asarray(codebook, dtype=np.float32)
    e = book.shape[1]
    cells = np.take(book, codes.astype(np.intp), axis=0)  # [N, h, w, e]
    drs, dcs = [dr for dr, _ in nb.offsets], [dc for _, dc in nb.offsets]
    r0, r1 = max(0, -min(drs)), h - max(0, max(drs))
    c0, c1 = max(0, -min(dcs)), w - max(0, max(dcs))
    out = np.empty((n, max(0, r1 - r0), max(0, c1 - c0), nb.size, e), dtype=np.float32)
    if out.size:
        j = 0
        while j < nb.size:  # a run: same row offset, consecutive column offsets
            dr, dc = nb.offsets[j]
            run = 1
            while j + run < nb.size and nb.offsets[j + run] == (dr, dc + run):
                run += 1
            rows = cells[:, r0 + dr:r1 + dr, c0 + dc:c1 + dc + run - 1]
            window = np.lib.stride_tricks.sliding_window_view(rows, run, axis=2)  # [N, H', W', e, run]
            out[:, :, :, j:j + run] = window.transpose(0, 1, 2, 4, 3)
            j += run
    return pos.copy(), out.reshape(n, len(pos), nb.size * e)


def key_vectors(neighbour_codes: np.ndarray | torch.Tensor, codebook: np.ndarray | torch.Tensor):
    """Concatenated codebook rows: neighbour codes [..., n] -> float32 keys [..., n * e_dim].

    `codebook` is the normalised VQ codebook [K, e_dim] (VQModel.quantize.codebook()).
    """
    if isinstance(neighbour_codes, torch.Tensor):
        book = torch.as_tensor(codebook, device=neighbour_codes.device, dtype=torch.float32)
        return book[neighbour_codes.long()].flatten(-2)
    book = np.asarray(codebook, dtype=np.float32)
    return book[neighbour_codes.astype(np.int64)].reshape(*neighbour_codes.shape[:-1],
                                                          neighbour_codes.shape[-1] * book.shape[1])
