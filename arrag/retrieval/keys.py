"""The one key builder: the (key, value) of every index entry, and the keys of chosen or sampled entries.

Entry e of an index built from a code store is image e // P at valid position e % P (P valid targets per
image). Its key is the neighbours' normalised codebook vectors, concatenated (key_source "code"), or their
stored pre-quantisation latents ("latent", as the original project); its value is the code at the target.
build-index, recall measurement and the training-key sample all call these functions.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from arrag.errors import ArragError
from arrag.retrieval.codestore import CodeStore
from arrag.retrieval.neighborhood import get_neighborhood, grid_key_vectors, key_vectors, keys_for_grid

KEY_SOURCES = ("code", "latent")


def grid_entries(codes: np.ndarray, latents: np.ndarray | None, shape, codebook: np.ndarray, key_source: str):
    """Keys [c*P, d] float32 and values [c*P] uint16 of every valid target of the code grids [c, h, w]."""
    if key_source not in KEY_SOURCES:
        raise ArragError(f"--key-source {key_source!r}: choose code or latent")
    if key_source == "code":
        pos, keys = grid_key_vectors(codes, codebook, shape)
    else:
        pos, nbr_lat = keys_for_grid(latents, shape)
        keys = nbr_lat.astype(np.float32)
    values = codes.reshape(len(codes), -1)[:, pos]
    return np.ascontiguousarray(keys.reshape(len(codes) * len(pos), -1), dtype=np.float32), values.reshape(-1)


ENTRY_CHUNK = 1 << 18  # entries built at a time: their images' grids, not every position of them, are read


def entry_neighbours(store: CodeStore, entries: np.ndarray, shape, key: str = "codes") -> Iterator[tuple]:
    """(chunk slice, neighbours [c, n, ...], values [c]) for entry ids (image * P + position), chunk by chunk.

    Only the picked positions are built: a chunk reads its images' grids (`key`: codes, or latents for latent
    keys) and takes each entry's n neighbour cells and target, so memory is the sample plus one chunk whatever
    the store's size (building all P positions of every image touched cost ~3,000x the sample)."""
    nb = get_neighborhood(shape)
    h, w = store.grid
    pos, nbr_index = nb.positions(h, w), nb.neighbour_index(h, w)
    p = len(pos)
    entries = np.asarray(entries, dtype=np.int64)
    for s in range(0, len(entries), ENTRY_CHUNK):
        chunk = entries[s:s + ENTRY_CHUNK]
        images, local = np.unique(chunk // p, return_inverse=True)
        grids = store.gather(images, key)
        flat = grids.reshape(len(images), h * w, *grids.shape[3:])
        j = chunk % p
        values = None
        if key == "codes":
            values = flat[local, pos[j]]
        yield slice(s, s + len(chunk)), flat[local[:, None], nbr_index[j]], values


def entry_keys(store: CodeStore, entries: np.ndarray, shape, key_source: str = "code") -> np.ndarray:
    """Keys [len(entries), d] float32 of the given entry ids of `store` (any order, repeats allowed)."""
    if key_source not in KEY_SOURCES:
        raise ArragError(f"--key-source {key_source!r}: choose code or latent")
    nb = get_neighborhood(shape)
    codebook = store.codebook()
    d = nb.key_dim(codebook.shape[1])
    out = np.empty((len(entries), d), dtype=np.float32)
    for part, nbr, _ in entry_neighbours(store, entries, nb, "codes" if key_source == "code" else "latents"):
        out[part] = key_vectors(nbr, codebook) if key_source == "code" else nbr.reshape(len(nbr), d)
    return out


def sample_entries(store: CodeStore, n: int, seed: int, shape="L") -> np.ndarray:
    """A uniform sample of min(n, all) entry ids (image * P + position), sorted, without repeats; seeded."""
    total = store.num_images * len(get_neighborhood(shape).positions(*store.grid))
    return np.sort(np.random.default_rng(seed).choice(total, min(n, total), replace=False))


def sample_entry_keys(store: CodeStore, n: int, seed: int, shape="L", key_source: str = "code") -> np.ndarray:
    """Keys [min(n, entries), d] of a uniform sample of entries, without repeats; the same seed gives the same
    sample (quantizer training, recall queries)."""
    return entry_keys(store, sample_entries(store, n, seed, shape), shape, key_source)


def sample_distinct_rows(store: CodeStore, n: int, seed: int, shape="L") -> tuple[np.ndarray, float]:
    """Up to n distinct entry rows (neighbour codes, then value; see retrieval.dedup) from a seeded sample of
    2n entries, and the sample's distinct fraction (an estimate of the store's, for sizing the index)."""
    from arrag.retrieval.dedup import dedup

    nb = get_neighborhood(shape)
    entries = sample_entries(store, 2 * n, seed, nb)
    rows = np.empty((len(entries), nb.size + 1), dtype=np.uint16)
    for part, nbr, values in entry_neighbours(store, entries, nb):
        rows[part, :-1], rows[part, -1] = nbr, values
    distinct = dedup(rows, np.zeros(len(rows), np.int64))[0]
    pick = np.random.default_rng(seed + 1).permutation(len(distinct))[:n]
    return distinct[np.sort(pick)], len(distinct) / max(1, len(rows))


def row_keys(rows: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """float32 keys [M, n*e] of entry rows [M, n+1] (the neighbours' normalised codebook vectors)."""
    return np.ascontiguousarray(key_vectors(rows[:, :-1], codebook), dtype=np.float32)
