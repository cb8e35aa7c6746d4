"""The FAiD decoding hook: one batched retrieval per step, handed to the blenders as the forward's context."""

from __future__ import annotations

import warnings

import torch

from arrag.decoding.hooks import DecodeState, DecodingHook
from arrag.decoding.step_queries import StepQueries
from arrag.errors import ArragError
from arrag.janus.faid_layers import FaidContext

DEFAULT_FAID_K = 10  # candidates per step, as the released model was trained and run


class FAiD(DecodingHook):
    """FAiD decoding: before each forward pass, retrieve K codes per row for the target and hand them to
    the blenders as that pass's context (one batched search per step; unconditional rows get no features)."""

    def __init__(self, retriever, k: int = DEFAULT_FAID_K):
        if k < 1:
            raise ArragError(f"--faid-k must be >= 1, got {k}")
        self.retriever, self.k = retriever, k
        self.stats = {"steps_augmented": 0}
        self.recorder = None  # an AttributionRecorder, when the run records attribution

    def begin(self, state: DecodeState) -> None:
        model = state.model
        if not model.has_faid:
            raise ArragError(f"model {model.source_folder or ''} has no FAiD blenders (its config lacks "
                             "num_SmoothPatchBlender/num_hop): pass a FAiD checkpoint (arrag train-faid)")
        # The blenders take at most the model's K candidates, the nearest ones, as the original's SmoothPatchBlender
        # keeps the first K it is given: a larger --faid-k searches for no more than K.
        model_k = model.config.language.retrieved_key_num
        self.k_used = min(self.k, model_k)
        if self.k > model_k:
            warnings.warn(f"--faid-k {self.k} is more than the {model_k} candidates the model's blenders take "
                          f"(language_config.retrieved_key_num); using the nearest {model_k}, as the original does",
                          stacklevel=2)
        self.queries = StepQueries(self.retriever, state)
        h, w = state.grid
        rows, dim = 2 * state.n_images, model.config.hidden_size
        device, dtype = state.codes.device, model.dtype
        # per blender layer, the normed hidden state of every cell, plus a scratch row and a zero row
        self.buffers = {i: torch.zeros(rows, h * w + 2, dim, device=device, dtype=dtype)
                        for i in model.config.language.blender_layers()}
        self.row_mask = torch.zeros(rows, dtype=torch.bool, device=device)
        self.row_mask[state.cond_rows] = True
        # Everything a step needs already on the device: steps pass views, never host values.
        self.targets = torch.arange(h * w, device=device)
        self.no_candidates = torch.full((rows, self.k_used), -1, dtype=torch.long, device=device)
        self.centre = torch.tensor([False, True], device=device)
        self.active = self.retriever.entries > 0
        self.gates: list | None = [] if self.recorder is not None else None  # the blenders' gates of a forward
        self.retrieved_at = -1
        if not self.active:
            warnings.warn(f"retriever {self.retriever.folder} is empty: FAiD decodes without features", stacklevel=2)

    def before_forward(self, state: DecodeState, target: int) -> FaidContext:
        candidates, retrieved = self.no_candidates, False
        if self.active and self.queries.valid[target]:
            query = self.queries.query(state, target)
            found = self.retriever.search(query, self.k_used, with_ids=self.recorder is not None)
            candidates = found[1].to(state.codes.device).repeat_interleave(2, 0)  # one copy for each CFG row
            retrieved = True
            self.stats["steps_augmented"] += 1
            if self.recorder is not None:
                self.recorder.faid_step(target, query, *found)
                self.retrieved_at = target
        return FaidContext("step", state.grid, candidates, self.row_mask, rows=state.cond_rows,
                           target=self.targets[target:target + 1], has_centre=self.centre[int(retrieved):][:1],
                           buffers=self.buffers, cells=state.model.config.language.faid_cells, gates=self.gates)

    def adjust_probs(self, state: DecodeState, target: int, probs: torch.Tensor) -> torch.Tensor:
        # The forward pass that predicted `target` has run: hand its blenders' gates to the recorder.
        if self.gates is not None:
            if self.retrieved_at == target and self.gates:
                self.recorder.faid_gates(target, torch.stack(self.gates).mean(0)[:, 0])  # [N, K]
            self.gates.clear()
        return probs

    def end(self, state: DecodeState) -> None:
        self.buffers = {}

    def settings(self) -> dict:
        return {"faid_k": self.k, **self.retriever.settings()}
