"""How one decode step runs: the work of one token, from the sampled codes to the CFG-combined logits.

  eager   the ordinary forward over the KV cache: the reference, on every device
  static  the same work with fixed shapes and tensor-only indices (LlamaModel.decode_static, FAiD's step
          context): runs anywhere, and is what a CUDA graph records
  graph   the static step captured once as a torch.cuda.CUDAGraph and replayed every step: the token, the
          cache slot and FAiD's per-step inputs are copied into static buffers first (CUDA only)
A step takes the previous codes Long [N] (one per image), the target index and the hooks' context, and
returns logits fp32 [N, V] = uncond + w * (cond - uncond). With the same seed, every mode gives the same
tokens (static vs eager is tested on the CPU; graph vs eager on CUDA).
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from arrag.errors import ArragError

STEP_MODES = ("auto", "eager", "static", "graph")


def cfg_logits(model, hidden: torch.Tensor, cfg_weight: float) -> torch.Tensor:
    """Last hidden states of the 2N interleaved rows [2N, D] -> CFG-combined logits fp32 [N, V]."""
    logits = model.image_logits(hidden)
    cond, uncond = logits[0::2], logits[1::2]
    return uncond + cfg_weight * (cond - uncond)


class EagerStep:
    """The ordinary forward pass over the cache (the reference)."""

    def __init__(self, model, cache, cfg_weight: float):
        self.model, self.cache, self.cfg_weight = model, cache, cfg_weight

    def __call__(self, tokens: torch.Tensor, target: int, context=None) -> torch.Tensor:
        emb = self.model.image_embeddings(tokens.repeat_interleave(2))[:, None]  # one token for cond and uncond
        return cfg_logits(self.model, self.model.llm(emb, None, self.cache, context=context)[:, -1], self.cfg_weight)


class StaticStep:
    """The fixed-shape step; with capture=True recorded as a CUDA graph on the first call and replayed after.

    `start` is the cache slot of the first image token (the prompt length): target t writes slot start+t-1.
    fallback: if the capture fails, warn and go on uncaptured (same tokens) instead of raising ('auto' mode).
    """

    def __init__(self, model, cache, cfg_weight: float, n_images: int, start: int, capture: bool = False,
                 fallback: bool = False):
        if capture and model.device.type != "cuda":
            raise ArragError("CUDA graphs need the model on a CUDA device; use the eager or static step on "
                             f"{model.device}")
        self.model, self.cache, self.cfg_weight, self.start, self.capture = model, cache, cfg_weight, start, capture
        self.fallback = fallback
        device = model.device
        self.tokens = torch.zeros(n_images, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.context = None  # static copy of the hooks' context, made on the first call
        self.graph, self.out = None, None

    def _run(self) -> torch.Tensor:
        if self.context is not None:
            self.context.carry = None  # each pass starts from the retrieved codes, not a previous pass's outputs
        emb = self.model.image_embeddings(self.tokens.repeat_interleave(2))[:, None]
        hidden = self.model.llm.decode_static(emb, self.cache, self.slot, self.context)[:, -1]
        return cfg_logits(self.model, hidden, self.cfg_weight)

    def _load_inputs(self, tokens: torch.Tensor, target: int, context) -> None:
        self.tokens.copy_(tokens)
        self.slot.fill_(self.start + target - 1)
        if context is None:
            return
        if self.context is None:  # our own buffers for what changes per step; the rest is shared as it is
            self.context = dataclasses.replace(context, carry=None,
                                               **{n: getattr(context, n).clone() for n in context.STEP_INPUTS})
        for name in context.STEP_INPUTS:
            getattr(self.context, name).copy_(getattr(context, name))

    def __call__(self, tokens: torch.Tensor, target: int, context=None) -> torch.Tensor:
        self._load_inputs(tokens, target, context)
        if not self.capture:
            return self._run()
        if self.graph is None:
            next_pos = self.cache.next_pos.clone()
            stream = torch.cuda.current_stream(self.model.device) if self.model.device.type == "cuda" else None
            try:
                self._record()
            except RuntimeError as e:  # CUDA reports a failed capture as a RuntimeError
                if not self.fallback:
                    raise
                self._give_up_capture(e, next_pos, stream)
                return self._run()
        self.graph.replay()
        return self.out

    def _give_up_capture(self, error: RuntimeError, next_pos: torch.Tensor, stream) -> None:
        """Undo what a failed capture may have left (a half-recorded graph, a moved position counter, the
        capture's stream left current when ending the capture raised) and decode uncaptured from here on; the
        KV cache writes of the warm-up are this step's own, so they stay."""
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)  # the warm-up's side stream may still be writing
            torch.cuda.set_stream(stream)
        self.capture, self.graph, self.out = False, None, None
        self.cache.next_pos.copy_(next_pos)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(f"CUDA graph capture failed ({reason}); decoding with the uncaptured fixed-shape step, "
                      "which gives the same tokens more slowly (--decode-step static or eager skips the capture)",
                      stacklevel=3)

    def _record(self) -> None:
        """Warm up on a side stream (as CUDA graphs require), then capture. The warm-up runs compute this
        step's real writes (same inputs), so only the rotary position counter needs restoring."""
        next_pos = self.cache.next_pos.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.cache.next_pos.copy_(next_pos)
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        self.cache.next_pos.copy_(next_pos)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._run()
        self.cache.next_pos.copy_(next_pos)  # capture records without running; the replay advances it


def make_step(mode: str, model, cache, cfg_weight: float, n_images: int, start: int):
    """The step runner for `mode` ('auto': a CUDA graph on CUDA, going on uncaptured if the capture fails;
    eager elsewhere)."""
    if mode not in STEP_MODES:
        raise ArragError(f"--decode-step {mode!r}: choose {', '.join(STEP_MODES)}")
    fallback = mode == "auto"
    if mode == "auto":
        mode = "graph" if model.device.type == "cuda" else "eager"
    if mode == "eager":
        return EagerStep(model, cache, cfg_weight)
    return StaticStep(model, cache, cfg_weight, n_images, start, capture=mode == "graph", fallback=fallback)
