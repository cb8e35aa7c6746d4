"""FAiD: the SmoothPatchBlender, which blends retrieved patch features into the decoder's hidden states.

For a target cell and each retrieved candidate k (K per target):
  window_h   the (2h+1)^2 window of the layer's normed hidden states centred on the target, cells at or
             after the target in raster order zeroed, the centre replaced by the candidate's feature
  hop_h      conv_b(conv_a(window_h)): two Conv2d(D, D, kernel h+1) down to 1x1 (hops 1, 2, 3)
  out_k      sum_h softmax(conv_weights)_h * hop_h
  feature_k  sigmoid(mlp(out_k)) * out_k            (mlp: Linear(D, D), ReLU, Linear(D, 1))
  added      mean_k feature_k, added to the residual after attention at the position predicting the target
The conv chain has no nonlinearity, so hop_h = conv_b(conv_a(neighbourhood window)) + M_h @ feature, with
M_h = sum_ij Wb[:, :, i, j] @ Wa[:, :, h-i, h-j]: the neighbourhood part is computed once per target, not
K times. `direct=True` computes every candidate's window in full (the reference the tests compare with).
Parameter names are the released checkpoint's: conv1/conv12, conv2/conv22, conv3/conv32, conv_weights, mlp.0,
mlp.2 (plus the layer's retrieval_layernorm, which lives on the decoder layer).
"""

from __future__ import annotations

import torch
from torch import nn

CONV_NAMES = {1: ("conv1", "conv12"), 2: ("conv2", "conv22"), 3: ("conv3", "conv32")}


class SmoothPatchBlender(nn.Module):
    def __init__(self, dim: int, hops: tuple[int, ...] = (1, 2)):
        super().__init__()
        hops = tuple(sorted(set(int(h) for h in hops)))
        if not hops or any(h not in CONV_NAMES for h in hops):
            raise ValueError(f"num_hop must be a subset of 1,2,3; got {hops}")
        self.dim, self.hops = dim, hops
        for h, (a, b) in CONV_NAMES.items():  # all three exist, as in the released layout; unused hops stay idle
            setattr(self, a, nn.Conv2d(dim, dim, h + 1))
            setattr(self, b, nn.Conv2d(dim, dim, h + 1))
        if len(hops) > 1:
            self.conv_weights = nn.Parameter(torch.ones(len(hops)))
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 1))
        self.reset_convs()

    @property
    def window(self) -> int:
        """Side of the largest window used: 2 * max(hops) + 1."""
        return 2 * max(self.hops) + 1

    def reset_convs(self) -> None:
        """The original initialisation: Kaiming-normal conv weights, zero biases, conv_weights ones."""
        for a, b in CONV_NAMES.values():
            for conv in (getattr(self, a), getattr(self, b)):
                nn.init.kaiming_normal_(conv.weight)
                nn.init.zeros_(conv.bias)
        if hasattr(self, "conv_weights"):
            nn.init.ones_(self.conv_weights)

    def hop_weights(self) -> torch.Tensor:
        if hasattr(self, "conv_weights"):
            return torch.softmax(self.conv_weights.float(), 0)
        return torch.ones(1, device=self.mlp[0].weight.device)

    def centre_map(self, hop: int) -> torch.Tensor:
        """M_h [D, D]: what the bias-free conv chain of hop h does to the centre cell of its window."""
        a, b = (getattr(self, n).weight for n in CONV_NAMES[hop])
        return sum(b[:, :, i, j] @ a[:, :, hop - i, hop - j] for i in range(hop + 1) for j in range(hop + 1))

    def _chain(self, hop: int, x: torch.Tensor) -> torch.Tensor:
        a, b = (getattr(self, n) for n in CONV_NAMES[hop])
        return b(a(x)).flatten(1)

    def forward(self, windows: torch.Tensor, features: torch.Tensor, direct: bool = False):
        """windows [M, D, S, S] (causally masked, centre zero; S = self.window), features [M, K, D]
        -> (per-candidate features [M, K, D], their mean [M, D])."""
        m, k, d = features.shape
        hw = self.hop_weights().to(features.dtype)
        outs = 0
        c = self.window // 2
        for weight, hop in zip(hw, self.hops, strict=True):
            crop = windows[:, :, c - hop:c + hop + 1, c - hop:c + hop + 1]
            if direct:
                full = crop[:, None].expand(m, k, *crop.shape[1:]).clone()
                full[:, :, :, hop, hop] = features
                out = self._chain(hop, full.reshape(m * k, d, 2 * hop + 1, 2 * hop + 1)).reshape(m, k, d)
            else:
                out = self._chain(hop, crop)[:, None] + features @ self.centre_map(hop).T
            outs = outs + weight * out
        gated = torch.sigmoid(self.mlp(outs)) * outs
        return gated, gated.mean(1)


def gather_windows(grid: torch.Tensor, window_index: torch.Tensor) -> torch.Tensor:
    """grid [B, C, D] (C = h*w cells), window_index [T, S, S] (-1 = zero) -> windows [B*T, D, S, S]."""
    b, _, d = grid.shape
    t, s, _ = window_index.shape
    padded = torch.cat([grid, grid.new_zeros(b, 1, d)], 1)  # index -1 reads this zero row
    idx = torch.where(window_index >= 0, window_index, torch.full_like(window_index, grid.shape[1]))
    win = padded[:, idx.reshape(-1)]  # [B, T*S*S, D]
    return win.reshape(b * t, s, s, d).permute(0, 3, 1, 2)

