"""Retrieval queries during decoding, shared by DAiD and FAiD: which steps retrieve, and with what query.

The query for target t is the already-sampled neighbours' normalised codebook vectors, concatenated,
for every row at once; the neighbourhood is the retriever's own (it must be causal).
"""

from __future__ import annotations

import torch

from arrag.errors import ArragError


class StepQueries:
    def __init__(self, retriever, state):
        nb = retriever.neighborhood
        if not nb.causal:
            raise ArragError(f"the retriever's {nb.name!r} neighbourhood is not causal; AR decoding needs L or 2hop")
        need = nb.key_dim(state.model.vq.config.codebook_embed_dim)
        if retriever.dim != need:
            raise ArragError(f"the retriever's keys have {retriever.dim} dims; this model's VQ and the "
                             f"{nb.name!r} neighbourhood give {need}")
        grid = retriever.manifest.get("grid")
        if grid is not None and tuple(grid) != tuple(state.grid):
            raise ArragError(f"the retriever {retriever.folder} was built from {grid[0]}x{grid[1]} code grids, but "
                             f"this model decodes {state.grid[0]}x{state.grid[1]} tokens; generate at the index's "
                             "image size (--image-size) or build an index from images encoded at this size")
        table = nb.step_table(*state.grid)
        self.table = torch.from_numpy(table).to(state.codes.device)
        self.valid: list[bool] = (table >= 0).all(1).tolist()  # valid[t]: target t gets a retrieval
        retriever.prepare(state.codes.device)

    def query(self, state, target: int) -> torch.Tensor:
        """[N, n * e] for target `target` (only valid targets have all their neighbours sampled)."""
        return state.model.vq.code_embeddings(state.codes[:, self.table[target]]).flatten(1)
