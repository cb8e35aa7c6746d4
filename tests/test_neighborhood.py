"""The neighbourhood definition against brute-force loops over positions."""

import numpy as np
import pytest
import torch

from arrag.errors import ArragError
from arrag.retrieval.neighborhood import (
    SHAPES,
    get_neighborhood,
    grid_key_vectors,
    key_vectors,
    keys_for_grid,
    valid_mask,
)


def brute_force(codes: np.ndarray, offsets):
    """Loop over every cell; keep those whose neighbours are all inside the grid."""
    n, h, w = codes.shape
    positions, keys, values = [], [], []
    for r in range(h):
        for c in range(w):
            cells = [(r + dr, c + dc) for dr, dc in offsets]
            if all(0 <= rr < h and 0 <= cc < w for rr, cc in cells):
                positions.append(r * w + c)
                keys.append([[codes[i, rr, cc] for rr, cc in cells] for i in range(n)])
                values.append(codes[:, r, c])
    return np.array(positions), np.array(keys).transpose(1, 0, 2), np.array(values).T


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("hw", [(24, 24), (7, 5)])
def test_keys_match_brute_force(shape, hw):
    codes = np.random.default_rng(0).integers(0, 16384, (3, *hw)).astype(np.uint16)
    pos, nbr = keys_for_grid(codes, shape)
    ref_pos, ref_keys, ref_vals = brute_force(codes, SHAPES[shape].offsets)
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(nbr, ref_keys)
    np.testing.assert_array_equal(codes.reshape(3, -1)[:, pos], ref_vals)
    tpos, tnbr = keys_for_grid(torch.from_numpy(codes.astype(np.int64)), shape)  # torch in, torch out
    np.testing.assert_array_equal(tpos.numpy(), pos)
    np.testing.assert_array_equal(tnbr.numpy(), nbr)


def test_L_shape_is_the_released_one():
    nb = get_neighborhood("L")
    assert nb.offsets == ((-1, -1), (-1, 0), (-1, 1), (0, -1))
    m = valid_mask(24, 24)
    assert m.sum() == 506
    assert not m[0].any() and not m[:, 0].any() and not m[:, 23].any() and m[1:, 1:23].all()
    assert nb.key_dim(8) == 32


@pytest.mark.parametrize("shape", ["L", "2hop"])
def test_causal_step_table(shape):
    nb = get_neighborhood(shape)
    table = nb.step_table(6, 6)
    for t in range(36):
        if (table[t] >= 0).any():
            assert (table[t] < t).all()  # only already-generated cells
    assert ((table >= 0).all(1)).sum() == len(nb.positions(6, 6))


def test_latents_carry_trailing_dims_and_key_vectors():
    lat = np.random.default_rng(1).normal(size=(2, 5, 5, 8)).astype(np.float32)
    pos, nbr = keys_for_grid(lat, "L")
    assert nbr.shape == (2, len(pos), 4, 8)
    book = np.random.default_rng(2).normal(size=(50, 8)).astype(np.float32)
    codes = np.random.default_rng(3).integers(0, 50, (2, 5, 5))
    _, n_codes = keys_for_grid(codes, "L")
    keys = key_vectors(n_codes, book)
    assert keys.shape == (2, len(pos), 32)
    np.testing.assert_array_equal(keys[1, 2, 8:16], book[n_codes[1, 2, 1]])
    tkeys = key_vectors(torch.from_numpy(n_codes), torch.from_numpy(book))
    np.testing.assert_allclose(tkeys.numpy(), keys)
    for shape in SHAPES:  # the fused path gives the same keys for every shape
        for hw in ((5, 5), (7, 4), (2, 2)):
            c = np.random.default_rng(4).integers(0, 50, (3, *hw))
            ref_pos, ref_nbr = keys_for_grid(c, shape)
            gpos, gkeys = grid_key_vectors(c, book, shape)
            np.testing.assert_array_equal(gpos, ref_pos)
            np.testing.assert_array_equal(gkeys, key_vectors(ref_nbr, book))


def test_unknown_shape_is_clear():
    with pytest.raises(ArragError, match="unknown neighbourhood shape 'X'"):
        get_neighborhood("X")
