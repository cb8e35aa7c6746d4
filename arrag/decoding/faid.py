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

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from arrag.decoding.sampler import DecodeState, DecodingHook
from arrag.errors import ArragError

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



# ----------------------------------------------------------------------------------------------------------
# Wiring into the decoder: one hook per blender layer, driven by a context set for each forward pass.


@dataclass
class FaidContext:
    """What the blender layers need for one forward pass.

    full mode (training, teacher forcing): `candidates` Long [B, T, K] for every cell of the image, the
    image tokens' inputs at sequence positions image_start .. image_start + T - 1.
    step mode (decoding): the forward consumes token target - 1 (one position per row) and predicts
    `target`; `candidates` Long [B, K] or None when the target gets no retrieval; `buffers` keep each
    blender layer's normed hidden states per cell, preallocated [B, h*w, D].
    Rows where `row_mask` is False (unconditional CFG rows) get no features.
    """

    mode: str
    grid: tuple[int, int]
    candidates: torch.Tensor | None
    row_mask: torch.Tensor
    targets: torch.Tensor | None = None   # full mode: Long [P] target cells that get features
    image_start: int = 0                  # full mode
    target: int = 0                       # step mode
    buffers: dict | None = None           # step mode
    carry: torch.Tensor | None = field(default=None, repr=False)  # per-candidate outputs of the previous blender


class FaidLayerHook:
    """The after-attention hook of a decoder layer that holds `blender` and `retrieval_layernorm`."""

    def __init__(self, model, layer_idx: int):
        self.model, self.layer_idx = model, layer_idx

    def __call__(self, h: torch.Tensor, normed: torch.Tensor, layer_idx: int) -> torch.Tensor:
        ctx: FaidContext | None = self.model.faid_context
        if ctx is None:
            return h
        layer = self.model.llm.layers[layer_idx]
        blender: SmoothPatchBlender = layer.blender
        index = self.model.faid_window_index(ctx.grid, max(blender.hops), h.device)
        if ctx.mode == "full":
            t = ctx.grid[0] * ctx.grid[1]
            if ctx.targets is None or len(ctx.targets) == 0:
                return h
            cells = normed[:, ctx.image_start:ctx.image_start + t]
            if cells.shape[1] < t:  # the last image token is never an input; no window reaches its cell
                cells = torch.cat([cells, cells.new_zeros(cells.shape[0], t - cells.shape[1], cells.shape[2])], 1)
            windows = gather_windows(cells, index[ctx.targets])
            cand = ctx.candidates[:, ctx.targets]  # [B, P, K]
            rows = (h.shape[0], len(ctx.targets))
        else:
            if ctx.target == 0:  # the prompt prefill: no image cell yet
                return h
            ctx.buffers[layer_idx][:, ctx.target - 1] = normed[:, -1]
            if ctx.candidates is None:
                return h
            windows = gather_windows(ctx.buffers[layer_idx], index[[ctx.target]])
            cand = ctx.candidates[:, None]  # [B, 1, K]
            rows = (h.shape[0], 1)
        if ctx.carry is None:
            feats = self.model.image_embeddings(cand.clamp_min(0)) * (cand >= 0)[..., None].to(h.dtype)
        else:
            feats = ctx.carry
        feats = layer.retrieval_layernorm(feats).reshape(rows[0] * rows[1], cand.shape[-1], -1)
        per_candidate, mean = blender(windows.to(h.dtype), feats)
        ctx.carry = per_candidate.reshape(*rows, *per_candidate.shape[1:])
        mean = mean.reshape(*rows, -1) * ctx.row_mask[:, None, None].to(h.dtype)
        h = h.clone()
        if ctx.mode == "full":
            h[:, ctx.image_start + ctx.targets - 1] += mean  # the position whose output predicts the target
        else:
            h[:, -1:] += mean
        return h


def attach_blenders(model) -> None:
    """Give the layers named by the config a SmoothPatchBlender, a retrieval_layernorm and the FAiD hook."""
    from arrag.janus.llama import RMSNorm

    cfg = model.config.language
    for i in cfg.blender_layers():
        layer = model.llm.layers[i]
        layer.blender = SmoothPatchBlender(cfg.hidden_size, tuple(cfg.hops))
        layer.retrieval_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        layer.after_attention = FaidLayerHook(model, i)


# ----------------------------------------------------------------------------------------------------------
# The two modes: teacher forcing over whole sequences, and the decoding hook for the sampling loop.


def full_sequence_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, codes: torch.Tensor,
                         candidates: torch.Tensor, grid: tuple[int, int], shape: str = "L") -> torch.Tensor:
    """Teacher-forced logits for every image token: fp32 [B, T, V].

    input_ids/attention_mask [B, L]: left-padded prompts ending with <begin_of_image>; codes [B, T] the
    ground-truth image tokens; candidates Long [B, T, K] retrieved codes per cell (-1 = missing). Targets
    that are not valid for `shape` (row 0, first and last column for L) get no features.
    """
    from arrag.retrieval.neighborhood import get_neighborhood

    b, length = input_ids.shape
    t = grid[0] * grid[1]
    embeds = torch.cat([model.text_embeddings(input_ids), model.image_embeddings(codes[:, :-1])], 1)
    mask = torch.cat([attention_mask.bool(), attention_mask.new_ones(b, t - 1, dtype=torch.bool)], 1)
    targets = torch.from_numpy(get_neighborhood(shape).positions(*grid)).to(input_ids.device)
    model.faid_context = FaidContext("full", grid, candidates, torch.ones(b, dtype=torch.bool, device=embeds.device),
                                     targets=targets, image_start=length)
    try:
        hidden = model.llm(embeds, mask)
    finally:
        model.faid_context = None
    return model.image_logits(hidden[:, length - 1:length - 1 + t])


class FAiD(DecodingHook):
    """FAiD decoding: before each forward pass, retrieve K codes per row for the target and hand them to
    the blenders (one batched search per step; unconditional rows get no features)."""

    def __init__(self, retriever, k: int = 10):
        if k < 1:
            raise ArragError(f"--faid-k must be >= 1, got {k}")
        self.retriever, self.k = retriever, k
        self.stats = {"steps_augmented": 0}

    def begin(self, state: DecodeState) -> None:
        model = state.model
        if not model.has_faid:
            raise ArragError(f"model {model.source_folder or ''} has no FAiD blenders (its config lacks "
                             "num_SmoothPatchBlender/num_hop): pass a FAiD checkpoint (arrag train-faid)")
        nb = self.retriever.neighborhood
        if not nb.causal:
            raise ArragError(f"the retriever's {nb.name!r} neighbourhood is not causal; AR decoding needs L or 2hop")
        h, w = state.grid
        table = nb.step_table(h, w)
        self.table = torch.from_numpy(table).to(state.codes.device)
        self.valid = (table >= 0).all(1).tolist()
        rows, dim = 2 * state.n_images, model.config.hidden_size
        device, dtype = state.codes.device, model.dtype
        self.buffers = {i: torch.zeros(rows, h * w, dim, device=device, dtype=dtype)
                        for i in model.config.language.blender_layers()}
        self.row_mask = torch.zeros(rows, dtype=torch.bool, device=device)
        self.row_mask[state.cond_rows] = True
        self.active = self.retriever.entries > 0
        if not self.active:
            warnings.warn(f"retriever {self.retriever.folder} is empty: FAiD decodes without features", stacklevel=2)

    def before_forward(self, state: DecodeState, target: int) -> None:
        candidates = None
        if self.active and self.valid[target]:
            query = state.model.vq.code_embeddings(state.codes[:, self.table[target]]).flatten(1)
            _, codes = self.retriever.search(query, self.k)
            candidates = codes.to(state.codes.device).repeat_interleave(2, 0)  # one copy for each CFG row
            self.stats["steps_augmented"] += 1
        state.model.faid_context = FaidContext("step", state.grid, candidates, self.row_mask, target=target,
                                               buffers=self.buffers)

    def end(self, state: DecodeState) -> None:
        state.model.faid_context = None
        self.buffers = {}

    def settings(self) -> dict:
        return {"faid_k": self.k, "nprobe": self.retriever.nprobe, "retriever": str(self.retriever.folder),
                "retriever_entries": self.retriever.entries, "retriever_fingerprint": self.retriever.fingerprint}
