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


def entry_keys(store: CodeStore, entries: np.ndarray, shape, key_source: str = "code") -> np.ndarray:
    """Keys [len(entries), d] of the given entry ids of `store` (any order, repeats allowed)."""
    p = len(get_neighborhood(shape).positions(*store.grid))
    entries = np.asarray(entries, dtype=np.int64)
    images, inverse = np.unique(entries // p, return_inverse=True)
    codes = store.gather(images)
    latents = store.gather(images, "latents") if key_source == "latent" else None
    keys, _ = grid_entries(codes, latents, shape, store.codebook(), key_source)
    return keys.reshape(len(images), p, -1)[inverse, entries % p]


def sample_entry_keys(store: CodeStore, n: int, seed: int, shape="L", key_source: str = "code") -> np.ndarray:
    """Keys [min(n, entries), d] of a uniform sample of entries, without repeats; the same seed gives the same
    sample (quantizer training, recall queries)."""
    total = store.num_images * len(get_neighborhood(shape).positions(*store.grid))
    entries = np.sort(np.random.default_rng(seed).choice(total, min(n, total), replace=False))
    return entry_keys(store, entries, shape, key_source)
