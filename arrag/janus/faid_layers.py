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
    `target` (Long [1], a tensor); `candidates` Long [B, K] (-1 = none); `has_centre` bool [1] is False
    when the target gets no retrieval (zero centre); `buffers` keep each blender layer's normed hidden
    states per cell, preallocated [B, h*w + 2, D] (row h*w is scratch, the last row stays zero). Everything
    is a tensor of fixed shape, so a decode step can be captured as a CUDA graph.
    `cells`: "all" adds the blender output at every image cell, as the original trains and decodes (a
    cell without retrieval still gets the gated neighbourhood part); "valid" only at centre cells.
    Rows where `row_mask` is False (unconditional CFG rows) get no features; `rows` (Long) may list the
    others once for all steps, which avoids a device-to-host sync per step.
    """

    mode: str
    grid: tuple[int, int]
    candidates: torch.Tensor | None
    row_mask: torch.Tensor
    centre_cells: torch.Tensor | None = None  # full mode
    cells: str = "all"
    image_start: int = 0                  # full mode
    target: torch.Tensor | None = None    # step mode: Long [1]
    has_centre: torch.Tensor | None = None  # step mode: bool [1]
    buffers: dict | None = None           # step mode
    rows: torch.Tensor | None = None      # the rows of row_mask, when known in advance
    carry: torch.Tensor | None = field(default=None, repr=False)  # per-candidate outputs of the previous blender
    gates: list | None = field(default=None, repr=False)  # attribution: each blender appends its gates [S, P, K]

    STEP_INPUTS = ("target", "candidates", "has_centre")  # what changes from one decode step to the next


class FaidLayerHook:
    """The after-attention hook of a decoder layer that holds `blender` and `retrieval_layernorm`."""

    def __init__(self, model, layer_idx: int):
        self.model, self.layer_idx = model, layer_idx

    def __call__(self, h: torch.Tensor, normed: torch.Tensor, layer_idx: int, ctx: FaidContext) -> torch.Tensor:
        layer = self.model.llm.layers[layer_idx]
        index = window_index(*ctx.grid, max(layer.blender.hops), str(h.device))
        # Only the rows that receive features are blended (unconditional CFG rows get none, so skip them).
        sel = ctx.rows if ctx.rows is not None else ctx.row_mask.nonzero().squeeze(1)
        if len(sel) == 0:
            return h
        if ctx.mode == "step":
            return self._step(h, normed, layer_idx, ctx, sel, index)
        if ctx.mode != "full":
            raise ValueError(f"FaidContext mode {ctx.mode!r}: full or step")
        t = ctx.grid[0] * ctx.grid[1]
        targets = torch.arange(t, device=h.device) if ctx.cells == "all" else ctx.centre_cells.nonzero().squeeze(1)
        if len(targets) == 0:
            return h
        cells = normed[sel, ctx.image_start:ctx.image_start + t]
        if cells.shape[1] < t:  # the last image token is never an input; no window reaches its cell
            cells = torch.cat([cells, cells.new_zeros(cells.shape[0], t - cells.shape[1], cells.shape[2])], 1)
        windows = gather_windows(cells, index[targets])
        positions = ctx.image_start + targets - 1  # the positions whose outputs predict the targets
        cand = ctx.candidates[sel][:, targets]  # [S, P, K]
        mean = self._blend(layer, ctx, windows, cand, ctx.centre_cells[targets], h.dtype)
        h = h.clone()
        h[sel[:, None], positions[None, :]] += mean
        return h

    def _step(self, h, normed, layer_idx: int, ctx: FaidContext, sel, index) -> torch.Tensor:
        """Decoding, one position per row; tensor indices only (no host values), so it can be graph-captured."""
        buf = ctx.buffers[layer_idx]
        scratch = buf.shape[1] - 2
        # The input at this step is image token target - 1, so its cell is now known (step 0: the prompt's
        # last position, which belongs to no cell, goes to the scratch row).
        cell = torch.where(ctx.target > 0, ctx.target - 1, torch.full_like(ctx.target, scratch))
        buf.index_copy_(1, cell, normed[:, -1:].to(buf.dtype))
        windows = gather_windows(buf, index.index_select(0, ctx.target), zero_row=True, rows=sel)
        mean = self._blend(self.model.llm.layers[layer_idx], ctx, windows, ctx.candidates.index_select(0, sel)[:, None],
                           ctx.has_centre, h.dtype)[:, 0]
        if ctx.cells == "valid":  # arrag's variant: nothing is added where there is no retrieval
            mean = mean * ctx.has_centre.to(mean.dtype)
        h = h.clone()
        h[:, -1].index_add_(0, sel, mean)
        return h

    def _blend(self, layer, ctx: FaidContext, windows, cand, has_centre, dtype) -> torch.Tensor:
        """The blender on windows [S*P, D, s, s] with candidates Long [S, P, K] -> mean feature [S, P, D]."""
        rows = (cand.shape[0], cand.shape[1])
        if ctx.carry is None:
            feats = self.model.image_embeddings(cand.clamp_min(0)) * (cand >= 0)[..., None].to(dtype)
        else:  # progressive: the previous blender's per-candidate outputs are this blender's candidates
            feats = ctx.carry
        # As the original trains: cells without retrieval get a zero centre in every blender, the later ones
        # included (its decoding instead passes the first blender's outputs on there; see the README).
        feats = layer.retrieval_layernorm(feats) * has_centre[None, :, None, None].to(dtype)
        found = layer.blender(windows.to(dtype), feats.reshape(rows[0] * rows[1], cand.shape[-1], -1),
                              with_gates=ctx.gates is not None)
        per_candidate, mean = found[:2]
        if ctx.gates is not None:
            ctx.gates.append(found[2].reshape(*rows, -1))
        ctx.carry = per_candidate.reshape(*rows, *per_candidate.shape[1:])
        return mean.reshape(*rows, -1)


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
                         row_mask: torch.Tensor | None = None, gates: list | None = None) -> torch.Tensor:
    """Teacher-forced logits for every image token: fp32 [B, T, V].

    input_ids/attention_mask [B, L]: left-padded prompts ending with <begin_of_image>; codes [B, T] the
    ground-truth image tokens; candidates Long [B, T, K] retrieved codes per cell (-1 = missing). Cells
    that are not valid targets for `shape` (row 0, first and last column for L) take a zero centre whatever
    their candidates; the model's `faid_cells` says whether they still get the blender output (the original
    does). Rows where `row_mask` [B] is False (training's caption-dropped rows, like decoding's
    unconditional CFG rows) get no features. With candidates None (or a model without blenders) this is
    plain teacher forcing: the base AR loss. `gates`, a list: each blender appends its gates [S, P, K] (the
    conditioned rows, every blended cell, each candidate).
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
                          cells=model.config.language.faid_cells, image_start=length, gates=gates)
    return model.image_logits(model.llm(embeds, mask, context=context)[:, length - 1:length - 1 + t])
