"""FAiD inside the decoder: blenders attached to their layers, and the per-forward context that feeds them.

A FAiD checkpoint's config names the layers (index % num_SmoothPatchBlender == 0) that hold a
SmoothPatchBlender and a retrieval_layernorm. Their after-attention hook blends the retrieved candidates
of a FaidContext, which the caller passes explicitly to each forward pass (nothing is stored on the model):
  full mode   teacher forcing over whole sequences (training; full_sequence_logits)
  step mode   one token per forward pass (decoding; the FAiD decoding hook builds the context)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch

from arrag.janus.blender import SmoothPatchBlender, gather_windows
from arrag.janus.llama import RMSNorm
from arrag.retrieval.neighborhood import causal_window_index, get_neighborhood


@lru_cache(maxsize=32)
def window_index(h: int, w: int, hop: int, device: str) -> torch.Tensor:
    """The causal window table [h*w, 2hop+1, 2hop+1] of retrieval.neighborhood, cached per device."""
    return torch.from_numpy(causal_window_index(h, w, hop)).to(device)


@dataclass
class FaidContext:
    """What the blender layers need for one forward pass.

    full mode (training, teacher forcing): `candidates` Long [B, T, K] for every cell of the image, the
    image tokens' inputs at sequence positions image_start .. image_start + T - 1; `centre_cells` bool [T]
    marks the cells that take a retrieved centre (the valid targets; elsewhere the centre is zero).
    step mode (decoding): the forward consumes token target - 1 (one position per row) and predicts
    `target`; `candidates` Long [B, K], or None when the target gets no retrieval (zero centre); `buffers`
    keep each blender layer's normed hidden states per cell, preallocated [B, h*w + 1, D] (last row zero).
    `cells`: "all" adds the blender output at every image cell, as the original trains and decodes (a
    cell without retrieval still gets the gated neighbourhood part); "valid" only at centre cells.
    Rows where `row_mask` is False (unconditional CFG rows) get no features.
    """

    mode: str
    grid: tuple[int, int]
    candidates: torch.Tensor | None
    row_mask: torch.Tensor
    centre_cells: torch.Tensor | None = None  # full mode
    cells: str = "all"
    image_start: int = 0                  # full mode
    target: int = 0                       # step mode
    buffers: dict | None = None           # step mode
    carry: torch.Tensor | None = field(default=None, repr=False)  # per-candidate outputs of the previous blender


class FaidLayerHook:
    """The after-attention hook of a decoder layer that holds `blender` and `retrieval_layernorm`."""

    def __init__(self, model, layer_idx: int):
        self.model, self.layer_idx = model, layer_idx

    def __call__(self, h: torch.Tensor, normed: torch.Tensor, layer_idx: int, ctx: FaidContext) -> torch.Tensor:
        layer = self.model.llm.layers[layer_idx]
        blender: SmoothPatchBlender = layer.blender
        index = window_index(*ctx.grid, max(blender.hops), str(h.device))
        # Only the rows that receive features are blended (unconditional CFG rows get none, so skip them).
        sel = ctx.row_mask.nonzero().squeeze(1)
        if len(sel) == 0:
            return h
        if ctx.mode == "full":
            t = ctx.grid[0] * ctx.grid[1]
            targets = (torch.arange(t, device=h.device) if ctx.cells == "all"
                       else ctx.centre_cells.nonzero().squeeze(1))
            if len(targets) == 0:
                return h
            cells = normed[sel, ctx.image_start:ctx.image_start + t]
            if cells.shape[1] < t:  # the last image token is never an input; no window reaches its cell
                cells = torch.cat([cells, cells.new_zeros(cells.shape[0], t - cells.shape[1], cells.shape[2])], 1)
            windows = gather_windows(cells, index[targets])
            positions = ctx.image_start + targets - 1  # the positions whose outputs predict the targets
            cand = ctx.candidates[sel][:, targets]  # [S, P, K]
            has_centre = ctx.centre_cells[targets]
        else:
            if ctx.target > 0:  # the input at this step is image token target - 1: its cell is now known
                ctx.buffers[layer_idx][:, ctx.target - 1] = normed[:, -1]
            if ctx.candidates is None and ctx.cells == "valid":
                return h
            windows = gather_windows(ctx.buffers[layer_idx][sel], index[[ctx.target]], zero_row=True)
            positions = torch.tensor([h.shape[1] - 1], device=h.device)
            if ctx.candidates is None:  # no retrieval: every candidate's centre is zero, so one stands for all K
                cand = torch.full((len(sel), 1, 1), -1, dtype=torch.long, device=h.device)
                has_centre = torch.zeros(1, dtype=torch.bool, device=h.device)
            else:
                cand = ctx.candidates[sel][:, None]  # [S, 1, K]
                has_centre = torch.ones(1, dtype=torch.bool, device=h.device)
        rows = (len(sel), cand.shape[1])
        if ctx.carry is None:
            feats = self.model.image_embeddings(cand.clamp_min(0)) * (cand >= 0)[..., None].to(h.dtype)
        else:  # progressive: the previous blender's per-candidate outputs are this blender's candidates
            feats = ctx.carry
        # As the original trains: cells without retrieval get a zero centre in every blender, the later ones
        # included (its decoding instead passes the first blender's outputs on there; see the README).
        feats = layer.retrieval_layernorm(feats) * has_centre[None, :, None, None].to(h.dtype)
        per_candidate, mean = blender(windows.to(h.dtype), feats.reshape(rows[0] * rows[1], cand.shape[-1], -1))
        ctx.carry = per_candidate.reshape(*rows, *per_candidate.shape[1:])
        h = h.clone()
        h[sel[:, None], positions[None, :]] += mean.reshape(*rows, -1)
        return h


def attach_blenders(model) -> None:
    """Give the layers named by the config a SmoothPatchBlender, a retrieval_layernorm and the FAiD hook."""
    cfg = model.config.language
    for i in cfg.blender_layers():
        layer = model.llm.layers[i]
        layer.blender = SmoothPatchBlender(cfg.hidden_size, tuple(cfg.hops))
        layer.retrieval_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        layer.after_attention = FaidLayerHook(model, i)


def full_sequence_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, codes: torch.Tensor,
                         candidates: torch.Tensor | None, grid: tuple[int, int], shape: str = "L",
                         row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher-forced logits for every image token: fp32 [B, T, V].

    input_ids/attention_mask [B, L]: left-padded prompts ending with <begin_of_image>; codes [B, T] the
    ground-truth image tokens; candidates Long [B, T, K] retrieved codes per cell (-1 = missing). Cells
    that are not valid targets for `shape` (row 0, first and last column for L) take a zero centre whatever
    their candidates; the model's `faid_cells` says whether they still get the blender output (the original
    does). Rows where `row_mask` [B] is False (training's caption-dropped rows, like decoding's
    unconditional CFG rows) get no features. With candidates None (or a model without blenders) this is
    plain teacher forcing: the base AR loss.
    """
    b, length = input_ids.shape
    t = grid[0] * grid[1]
    embeds = torch.cat([model.text_embeddings(input_ids), model.image_embeddings(codes[:, :-1])], 1)
    mask = torch.cat([attention_mask.bool(), attention_mask.new_ones(b, t - 1, dtype=torch.bool)], 1)
    if candidates is None:
        return model.image_logits(model.llm(embeds, mask)[:, length - 1:length - 1 + t])
    centre = torch.from_numpy(get_neighborhood(shape).valid_mask(*grid).reshape(-1)).to(input_ids.device)
    if row_mask is None:
        row_mask = torch.ones(b, dtype=torch.bool, device=embeds.device)
    context = FaidContext("full", grid, candidates, row_mask.to(embeds.device).bool(), centre_cells=centre,
                          cells=model.config.language.faid_cells, image_start=length)
    return model.image_logits(model.llm(embeds, mask, context=context)[:, length - 1:length - 1 + t])
