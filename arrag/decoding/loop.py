"""The sampling loop: the one place where image tokens are decoded. DAiD and FAiD plug in as hooks.

As in LlamaGen's generate.py, a few small functions: `prefill` (the prompts), `decode_one_token` (CFG,
temperature, hooks, filtering, sampling), `decode_n_tokens` (the raster loop), driven by a SamplingConfig.
All prompts x samples decode as one batch (or in chunks of `batch_size` images). Each image has two
rows, conditional and unconditional, in the same forward pass (CFG). Each step:
  logits = uncond + w * (cond - uncond); p = softmax(logits / T); hooks may reshape p (DAiD);
  optional top-k / top-p on p; sample by inverse CDF with the image's own pre-drawn uniform.
Image i's uniforms come from a generator seeded with (seed, i), so an image depends only on its seed,
index and prompt, not on which other images share its batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

from arrag.decoding.hooks import DecodeState, DecodingHook
from arrag.decoding.step import cfg_logits, make_step
from arrag.errors import ArragError
from arrag.image_io import MAX_IMAGE_SIZE, to_uint8


@dataclass
class SamplingConfig:
    """How images are sampled. Every default here is the CLI's default too."""

    parallel_size: int = 1          # samples per prompt
    cfg_weight: float = 5.0         # classifier-free guidance weight (Janus-Pro's)
    temperature: float = 1.0        # 0 = greedy
    top_k: int | None = None        # keep only the k most likely codes
    top_p: float | None = None      # nucleus mass in (0, 1]
    seed: int = 0                   # image i draws from a generator seeded with (seed, i)
    image_size: int | None = None   # pixels per side; None = the model's (384 = 24x24 tokens for Janus-Pro)
    batch_size: int | None = None   # images per forward pass (None = all); results do not depend on it

    def validate(self) -> None:
        """Refuse impossible settings with one line naming the flag, before any model is loaded."""
        finite = math.isfinite
        checks = [
            (self.parallel_size >= 1, "--parallel-size", self.parallel_size, "must be >= 1"),
            (finite(self.cfg_weight) and self.cfg_weight >= 0, "--cfg-weight", self.cfg_weight,
             "must be a finite number >= 0"),
            (finite(self.temperature) and self.temperature >= 0, "--temperature", self.temperature,
             "must be a finite number >= 0 (0 = greedy)"),
            (self.top_k is None or self.top_k >= 1, "--top-k", self.top_k, "must be >= 1 (leave it out for none)"),
            (self.top_p is None or 0 < self.top_p <= 1, "--top-p", self.top_p, "must be in (0, 1]"),
            (0 <= self.seed < 2**63, "--seed", self.seed, "must be in [0, 2^63)"),
            (self.image_size is None or 1 <= self.image_size <= MAX_IMAGE_SIZE, "--image-size", self.image_size,
             f"must be in [1, {MAX_IMAGE_SIZE}] pixels"),
            (self.batch_size is None or self.batch_size >= 1, "--batch-size", self.batch_size, "must be >= 1"),
        ]
        for ok, flag, value, what in checks:
            if not ok:
                raise ArragError(f"{flag} {value}: {what}")

    def settings(self) -> dict:
        return asdict(self)

    def for_model(self, model) -> SamplingConfig:
        """A copy with what the model decides filled in (the image size its tokenizer works at)."""
        return replace(self, image_size=self.image_size or model.vq.config.image_size)


def image_seeds(seed: int, indices: Iterable[int]) -> list[int]:
    """Independent 63-bit seeds for the images with these indices in a run with `seed`."""
    return [int(np.random.SeedSequence([seed, int(i)]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)
            for i in indices]


def image_uniforms(seeds: Sequence[int], steps: int) -> torch.Tensor:
    """float64 [N, steps] in (0, 1]: one draw per image and step, from that image's own generator."""
    rows = [1.0 - torch.rand(steps, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in seeds]
    return torch.stack(rows)


def filter_probs(probs: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Keep the top_k most likely codes and/or the smallest set with mass >= top_p; renormalise. [N, V]."""
    if top_k is not None and 0 < top_k < probs.shape[-1]:
        kth = probs.topk(top_k, dim=-1).values[:, -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if top_p is not None and 0 < top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        cum = sorted_p.cumsum(-1)
        drop_sorted = (cum - sorted_p) > top_p * cum[:, -1:]  # mass before this code already reaches top_p
        probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), 0.0)
    return probs / probs.sum(-1, keepdim=True)


def sample_from(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: probs [N, V] (need not sum to 1), uniforms [N] in (0, 1] -> Long [N]."""
    cdf = probs.double().cumsum(-1)
    x = (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, x).squeeze(-1).clamp_max(probs.shape[-1] - 1)


def _context(hooks: Sequence[DecodingHook], state: DecodeState, target: int):
    """Call every hook's before_forward; the (at most one) context returned goes to the forward pass."""
    context = None
    for hook in hooks:
        got = hook.before_forward(state, target)
        if got is not None:
            if context is not None:
                raise ArragError("two decoding hooks both supply a decoder context; combine them into one")
            context = got
    return context


def prefill(model, batch, cache, cfg_weight: float, context=None) -> torch.Tensor:
    """Run the prompts (PromptBatch, 2N interleaved CFG rows) into the cache -> CFG logits of token 0 [N, V]."""
    hidden = model.llm(model.text_embeddings(batch.input_ids), batch.attention_mask, cache, context=context)[:, -1]
    return cfg_logits(model, hidden, cfg_weight)


def decode_one_token(state: DecodeState, logits: torch.Tensor, target: int, sampling: SamplingConfig,
                     uniforms: torch.Tensor, hooks: Sequence[DecodingHook]) -> torch.Tensor:
    """CFG logits [N, V] predicting `target` -> its sampled codes Long [N] (temperature, hooks, filters)."""
    probs = torch.softmax(logits / sampling.temperature if sampling.temperature > 0 else logits, dim=-1)
    for hook in hooks:
        probs = hook.adjust_probs(state, target, probs)
    if sampling.temperature == 0:
        return probs.argmax(-1)
    return sample_from(filter_probs(probs, sampling.top_k, sampling.top_p), uniforms[:, target])


def decode_n_tokens(model, state: DecodeState, batch, cache, sampling: SamplingConfig, uniforms: torch.Tensor,
                    hooks: Sequence[DecodingHook], progress: bool = True, step_mode: str = "auto") -> None:
    """The raster loop: prefill, then one token per step into state.codes [N, h*w] (see decoding.step for
    how a step runs: eagerly, or replayed as a CUDA graph)."""
    steps = state.codes.shape[1]
    logits = prefill(model, batch, cache, sampling.cfg_weight, _context(hooks, state, 0))
    step = make_step(step_mode, model, cache, sampling.cfg_weight, state.n_images, start=cache.length)
    uniforms = uniforms.to(state.codes.device)  # one copy, not one per step
    for t in tqdm(range(steps), desc="decoding", unit="tok", disable=not progress, leave=False):
        tokens = decode_one_token(state, logits, t, sampling, uniforms, hooks)
        state.codes[:, t] = tokens
        if t == steps - 1:
            break
        logits = step(tokens, t + 1, _context(hooks, state, t + 1))


@torch.no_grad()
def sample_codes(model, prompts: Sequence[str], sampling: SamplingConfig, *, hooks: Sequence[DecodingHook] = (),
                 prompter=None, image_indices: Sequence[int] | None = None, progress: bool = False,
                 step_mode: str = "auto") -> torch.Tensor:
    """Sample code grids for every prompt x parallel_size: Long [len(prompts) * parallel_size, h, w].

    Image j*parallel_size + s is sample s of prompt j. Its random draws come from (seed, image_indices[that
    image]) (default: its position), so callers that split a benchmark across runs give each image its index
    in the whole benchmark and get the same images whatever the split. step_mode: auto (a CUDA graph on
    CUDA, eager elsewhere), eager, static or graph (decoding.step).
    """
    from arrag.janus.prompting import Prompter

    sampling = sampling.for_model(model)
    sampling.validate()
    if not prompts:
        raise ArragError("no prompts given")
    h = w = model.vq.grid_size(sampling.image_size)
    if prompter is None:
        if getattr(model, "source_folder", None) is None:
            raise ArragError("the model was not loaded from a folder; pass prompter=Prompter.from_folder(...)")
        prompter = Prompter.from_folder(model.source_folder)
    captions = [p for p in prompts for _ in range(sampling.parallel_size)]
    indices = range(len(captions)) if image_indices is None else list(image_indices)
    if len(indices) != len(captions):
        raise ValueError(f"image_indices needs one index per image ({len(captions)}), got {len(indices)}")
    seeds = image_seeds(sampling.seed, indices)
    chunk = sampling.batch_size or len(captions)
    out = []
    for s in range(0, len(captions), chunk):
        out.append(_sample_chunk(model, prompter, captions[s:s + chunk], seeds[s:s + chunk], (h, w), sampling,
                                 hooks, progress, step_mode, indices[s:s + chunk]))
    return torch.cat(out).reshape(len(captions), h, w)


def _sample_chunk(model, prompter, captions: list[str], seeds: list[int], grid: tuple[int, int],
                  sampling: SamplingConfig, hooks: Sequence[DecodingHook], progress: bool,
                  step_mode: str, indices: Sequence[int]) -> torch.Tensor:
    device = model.device
    n, steps = len(captions), grid[0] * grid[1]
    batch = prompter.batch(captions, device)
    max_pos = model.config.language.max_position_embeddings
    if batch.input_ids.shape[1] + steps > max_pos:
        raise ArragError(f"prompt ({batch.input_ids.shape[1]} tokens) + {steps} image tokens exceed the model's "
                         f"max_position_embeddings {max_pos}; shorten the prompt or lower --image-size")
    uniforms = image_uniforms(seeds, steps)
    state = DecodeState(model, grid, torch.full((n, steps), -1, dtype=torch.long, device=device),
                        torch.arange(0, 2 * n, 2, device=device), uniforms, sampling,
                        torch.as_tensor(list(indices), dtype=torch.long))
    cache = model.llm.new_cache(2 * n, batch.input_ids.shape[1] + steps)
    for hook in hooks:
        hook.begin(state)
    try:
        decode_n_tokens(model, state, batch, cache, sampling, uniforms, hooks, progress, step_mode)
    finally:  # hooks release what they hold even when decoding fails
        for hook in hooks:
            hook.end(state)
    return state.codes


@torch.no_grad()
def decode_images(model, codes: torch.Tensor, batch_size: int = 8) -> np.ndarray:
    """Code grids Long [N, h, w] -> uint8 images [N, H, W, 3] through the model's VQ, in chunks (converted as
    Janus-Pro's generation script does: (x + 1) / 2 * 255, clipped, truncated)."""
    return np.concatenate([to_uint8(model.vq.decode_codes(codes[s:s + batch_size]).float(), "janus")
                           for s in range(0, len(codes), batch_size)])
