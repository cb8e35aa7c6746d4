"""FAiD blender: the linear split against the direct per-candidate form, windows, parameter names."""

import numpy as np
import pytest
import torch

from arrag.decoding.faid import SmoothPatchBlender, gather_windows
from arrag.retrieval.neighborhood import causal_window_index


def test_causal_window_index_by_hand():
    idx = causal_window_index(4, 5, 1)
    # Target (2, 2) = cell 12: the row above (6, 7, 8) and the left neighbour (11); the rest masked.
    np.testing.assert_array_equal(idx[12], [[6, 7, 8], [11, -1, -1], [-1, -1, -1]])
    np.testing.assert_array_equal(idx[0], -np.ones((3, 3)))  # first cell: nothing before it
    np.testing.assert_array_equal(idx[5], [[-1, 0, 1], [-1, -1, -1], [-1, -1, -1]])  # column 0: left edge
    big = causal_window_index(6, 6, 2)
    assert big.shape == (36, 5, 5) and (big[14] < 14).all()


@pytest.mark.parametrize("hops", [(1,), (2,), (1, 2), (1, 2, 3)])
def test_linear_split_equals_direct(hops):
    torch.manual_seed(0)
    d, k = 16, 4
    blender = SmoothPatchBlender(d, hops).double()
    with torch.no_grad():
        for p in blender.parameters():  # non-trivial biases and hop weights, so every term is exercised
            if p.ndim == 1:
                p.uniform_(-0.5, 0.5)
    grid = torch.randn(2, 6 * 6, d, dtype=torch.float64)
    idx = torch.from_numpy(causal_window_index(6, 6, max(hops)))
    windows = gather_windows(grid, idx[[7, 14, 21, 35]])
    feats = torch.randn(8, k, d, dtype=torch.float64)
    feats[0, 1] = 0  # a missing candidate is a zero vector
    fast, fast_mean = blender(windows, feats)
    ref, ref_mean = blender(windows, feats, direct=True)
    torch.testing.assert_close(fast, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(fast_mean, ref.mean(1))
    blender32 = blender.float()  # and in fp32, the dtype the tests elsewhere run in
    f32, _ = blender32(windows.float(), feats.float())
    r32, _ = blender32(windows.float(), feats.float(), direct=True)
    torch.testing.assert_close(f32, r32, atol=1e-5, rtol=1e-4)


def test_windows_hold_only_past_cells():
    grid = torch.arange(1, 17, dtype=torch.float32).reshape(1, 16, 1)  # cell i holds i + 1
    w = gather_windows(grid, torch.from_numpy(causal_window_index(4, 4, 1)))[5, 0]  # target (1, 1) = cell 5
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0, 3.0], [5.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))


def test_released_parameter_names_and_init():
    b = SmoothPatchBlender(8, (1, 2))
    names = set(b.state_dict())
    assert names == {f"{c}.{p}" for c in ("conv1", "conv12", "conv2", "conv22", "conv3", "conv32") for p in
                     ("weight", "bias")} | {"conv_weights", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight",
                                            "mlp.2.bias"}
    assert b.conv1.weight.shape == (8, 8, 2, 2) and b.conv22.weight.shape == (8, 8, 3, 3)
    assert b.conv32.weight.shape == (8, 8, 4, 4) and torch.equal(b.conv_weights, torch.ones(2))
    assert float(b.conv2.bias.detach().abs().sum()) == 0
    assert "conv_weights" not in SmoothPatchBlender(8, (1,)).state_dict()
    with pytest.raises(ValueError, match="subset of 1,2,3"):
        SmoothPatchBlender(8, (4,))
