"""The SmoothPatchBlender of FAiD: smooths retrieved patch features into their causal neighbourhood.

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
        self._cache: dict[int, tuple] = {}
        self.reset_parameters()

    @property
    def window(self) -> int:
        """Side of the largest window used: 2 * max(hops) + 1."""
        return 2 * max(self.hops) + 1

    def reset_parameters(self) -> None:
        """The original initialisation: Kaiming-normal weights (ReLU gain) and zero biases for every conv and
        both gate linears; conv_weights ones."""
        layers = [getattr(self, n) for names in CONV_NAMES.values() for n in names] + [self.mlp[0], self.mlp[2]]
        for layer in layers:
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        if hasattr(self, "conv_weights"):
            nn.init.ones_(self.conv_weights)

    def zero_output_(self) -> None:
        """Make the blender add exactly zero while keeping every gradient path open (train-faid --blender-init
        zero): the second conv of each hop starts at zero, so every per-candidate output is 0, and the gate's
        last linear starts at zero, so the gate is 0.5 rather than saturated. With the original initialisation
        a small model's gates can start saturated, and closing them is the quickest way to stop the random
        features from hurting; they then never reopen (sigmoid'(-large) = 0)."""
        with torch.no_grad():
            for names in CONV_NAMES.values():
                second = getattr(self, names[1])
                second.weight.zero_()
                second.bias.zero_()
            self.mlp[2].weight.zero_()
            self.mlp[2].bias.zero_()
        self._cache.clear()

    def _past_mask(self, windows: torch.Tensor) -> torch.Tensor:
        """[S, S] of ones before the centre (raster order), zeros at and after it."""
        s, c = self.window, self.window // 2
        key = ("mask", s, windows.device, windows.dtype)
        if key not in self._cache:
            r, q = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
            self._cache[key] = ((r < c) | ((r == c) & (q < c))).to(windows.device, windows.dtype)
        return self._cache[key]

    def hop_weights(self) -> torch.Tensor:
        if hasattr(self, "conv_weights"):
            return torch.softmax(self.conv_weights.float(), 0)
        return torch.ones(1, device=self.mlp[0].weight.device)

    def centre_map(self, hop: int) -> torch.Tensor:
        """M_h [D, D]: what the bias-free conv chain of hop h does to the centre cell of its window.

        Without autograd (decoding) it is cached until the conv weights change: (h+1)^2 D x D products per
        step would otherwise cost more than the rest of the blender.
        """
        a, b = (getattr(self, n).weight for n in CONV_NAMES[hop])
        key = (a._version, b._version, a.data_ptr(), b.data_ptr(), a.dtype, a.device)
        if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
            return self._centre_map(a, b, hop)
        cached = self._cache.get(hop)
        if cached is None or cached[0] != key:
            cached = self._cache[hop] = (key, self._centre_map(a, b, hop))
        return cached[1]

    @staticmethod
    def _centre_map(a: torch.Tensor, b: torch.Tensor, hop: int) -> torch.Tensor:
        return SmoothPatchBlender._cell_map(a, b, hop, hop, hop)

    @staticmethod
    def _cell_map(a: torch.Tensor, b: torch.Tensor, hop: int, u: int, v: int) -> torch.Tensor:
        """[D, D]: the bias-free conv chain's map from window cell (u, v) to the 1x1 output."""
        return sum(b[:, :, i, j] @ a[:, :, u - i, v - j] for i in range(hop + 1) for j in range(hop + 1)
                   if 0 <= u - i <= hop and 0 <= v - j <= hop)

    def past_maps(self, hop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The conv chain of hop h on a causal window as one linear map (used when decoding, no autograd).

        Returns the window cells before the centre (Long [2, n]: rows, columns), their stacked maps [n*D, D]
        and the constant [D] (the biases carried through): chain(window) = concat(cells) @ maps + constant. Cached until
        the weights change; per row it costs n*D^2 instead of the convolutions' ~(h+1)^2 (2h+2) D^2.
        """
        a_conv, b_conv = (getattr(self, n) for n in CONV_NAMES[hop])
        a, b = a_conv.weight, b_conv.weight
        key = ("past", a._version, b._version, a_conv.bias._version, b_conv.bias._version, a.data_ptr(), a.dtype)
        cached = self._cache.get(("past", hop))
        if cached is None or cached[0] != key:
            cells = [(u, v) for u in range(2 * hop + 1) for v in range(2 * hop + 1) if (u, v) < (hop, hop)]
            maps = torch.cat([self._cell_map(a, b, hop, u, v).T for u, v in cells], 0)
            const = b_conv.bias + b.sum((2, 3)) @ a_conv.bias
            # the cells as index tensors on the weights' device: no host-to-device copy per step (graph capture)
            where = torch.tensor(cells, dtype=torch.long, device=a.device).T
            cached = self._cache[("past", hop)] = (key, (where, maps, const))
        return cached[1]

    def _past_part(self, hop: int, crop: torch.Tensor) -> torch.Tensor:
        """chain(crop) with a zero centre and zero cells after it: [M, D, 2h+1, 2h+1] -> [M, D]."""
        where, maps, const = self.past_maps(hop)
        x = crop[:, :, where[0], where[1]].transpose(1, 2).reshape(crop.shape[0], -1)  # [M, n*D]
        return torch.addmm(const, x, maps)

    def _chain(self, hop: int, x: torch.Tensor) -> torch.Tensor:
        a, b = (getattr(self, n) for n in CONV_NAMES[hop])
        return _conv(_conv(x, a), b).flatten(1)

    def forward(self, windows: torch.Tensor, features: torch.Tensor, direct: bool = False, with_gates: bool = False):
        """windows [M, D, S, S] (causally masked; S = self.window), features [M, K, D]
        -> (per-candidate features [M, K, D], their mean [M, D]), and with_gates the candidates' gates [M, K]
        (attribution). Cells at and after the centre are ignored."""
        m, k, d = features.shape
        hw = self.hop_weights().to(features.dtype)
        outs = 0
        c = self.window // 2
        windows = windows * self._past_mask(windows)  # only cells before the centre count; it takes the candidate
        for weight, hop in zip(hw, self.hops, strict=True):
            crop = windows[:, :, c - hop:c + hop + 1, c - hop:c + hop + 1]
            if direct:
                full = crop[:, None].expand(m, k, *crop.shape[1:]).clone()
                full[:, :, :, hop, hop] = features
                out = self._chain(hop, full.reshape(m * k, d, 2 * hop + 1, 2 * hop + 1)).reshape(m, k, d)
            elif torch.is_grad_enabled():  # training: the convolutions themselves, autograd through them
                out = self._chain(hop, crop)[:, None] + features @ self.centre_map(hop).T
            else:  # decoding: the same linear function as precomputed per-cell maps
                out = self._past_part(hop, crop)[:, None] + features @ self.centre_map(hop).T
            outs = outs + weight * out
        gate = torch.sigmoid(self.mlp(outs))
        gated = gate * outs
        return (gated, gated.mean(1), gate[..., 0]) if with_gates else (gated, gated.mean(1))


def _conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A valid (unpadded, stride 1) Conv2d as unfold + one matmul: [M, D, S, S] -> [M, D', S-k+1, S-k+1].

    Same numbers as conv(x); for these tiny windows it avoids the per-call weight reordering of the CPU conv
    kernels (measured: 1.3 ms per call for D=256 at decode time, most of FAiD's step cost).
    """
    m, _, s, _ = x.shape
    k = conv.kernel_size[0]
    o = s - k + 1
    cols = torch.nn.functional.unfold(x, k).transpose(1, 2)  # [M, o*o, D*k*k]
    y = torch.addmm(conv.bias, cols.reshape(m * o * o, -1), conv.weight.reshape(conv.out_channels, -1).T)
    return y.reshape(m, o, o, -1).permute(0, 3, 1, 2)


def gather_windows(grid: torch.Tensor, window_index: torch.Tensor, zero_row: bool = False,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """grid [B, C, D] (C = h*w cells), window_index [T, S, S] (-1 = zero) -> windows [B*T, D, S, S].

    zero_row=True: grid already ends with an all-zero row (C = h*w + 1), so no padded copy is made. rows (Long
    [R]): the windows of those rows of grid only ([R*T, D, S, S]), gathered without copying the rows first.
    """
    b, c, d = grid.shape
    t, s, _ = window_index.shape
    if not zero_row:
        grid = torch.cat([grid, grid.new_zeros(b, 1, d)], 1)
        c += 1
    idx = torch.where(window_index >= 0, window_index, torch.full_like(window_index, c - 1))  # -1 -> zero row
    if rows is None:
        win = grid[:, idx.reshape(-1)]  # [B, T*S*S, D]
    else:
        win, b = grid[rows[:, None], idx.reshape(1, -1)], rows.shape[0]  # [R, T*S*S, D]
    return win.reshape(b * t, s, s, d).permute(0, 3, 1, 2)
