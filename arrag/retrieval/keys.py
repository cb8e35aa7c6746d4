"""The one key builder: the (key, value) of every index entry, and the keys of chosen or sampled entries.

Entry e of an index built from a code store is image e // P at valid position e % P (P valid targets per
image). Its key is the neighbours' normalised codebook vectors, concatenated (key_source "code"), or their
stored pre-quantisation latents ("latent", as the original project); its value is the code at the target.
build-index, recall measurement and the training-key sample all call these functions.
"""

from __future__ import annotations

import numpy as np

from arrag.errors import ArragError
from arrag.retrieval.codestore import CodeStore
from arrag.retrieval.neighborhood import get_neighborhood, grid_key_vectors, keys_for_grid

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


def _per_entry(store: CodeStore, entries: np.ndarray, shape, of_images) -> np.ndarray:
    """Rows [len(entries), ...] for entry ids, from of_images(image ids) -> rows [images * P, ...] (each image
    read once, whatever the order and repeats of `entries`)."""
    p = len(get_neighborhood(shape).positions(*store.grid))
    entries = np.asarray(entries, dtype=np.int64)
    images, inverse = np.unique(entries // p, return_inverse=True)
    return of_images(images).reshape(len(images), p, -1)[inverse, entries % p]


def entry_keys(store: CodeStore, entries: np.ndarray, shape, key_source: str = "code") -> np.ndarray:
    """Keys [len(entries), d] of the given entry ids of `store` (any order, repeats allowed)."""
    def keys_of(images: np.ndarray) -> np.ndarray:
        latents = store.gather(images, "latents") if key_source == "latent" else None
        return grid_entries(store.gather(images), latents, shape, store.codebook(), key_source)[0]

    return _per_entry(store, entries, shape, keys_of)


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
    from arrag.retrieval.dedup import dedup, entry_rows

    nb = get_neighborhood(shape)
    rows = _per_entry(store, sample_entries(store, 2 * n, seed, nb), nb,
                      lambda images: entry_rows(store.gather(images), nb)[0])
    distinct = dedup(rows, np.zeros(len(rows), np.int64))[0]
    pick = np.random.default_rng(seed + 1).permutation(len(distinct))[:n]
    return distinct[np.sort(pick)], len(distinct) / max(1, len(rows))


def row_keys(rows: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """float32 keys [M, n*e] of entry rows [M, n+1] (the neighbours' normalised codebook vectors)."""
    from arrag.retrieval.neighborhood import key_vectors

    return np.ascontiguousarray(key_vectors(rows[:, :-1], codebook), dtype=np.float32)
