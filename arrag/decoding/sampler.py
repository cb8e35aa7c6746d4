"""The sampling loop: the one place where image tokens are decoded. DAiD and FAiD plug in as hooks.

All prompts x samples decode as one batch (or in chunks of `batch_size` images). Each image has two
rows, conditional and unconditional, in the same forward pass (CFG). Each step:
  logits = uncond + w * (cond - uncond); p = softmax(logits / T); hooks may reshape p (DAiD);
  optional top-k / top-p on p; sample by inverse CDF with the image's own pre-drawn uniform.
Image i's uniforms come from a generator seeded with (seed, i), so an image depends only on its seed,
index and prompt, not on which other images share its batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from arrag.errors import ArragError
from arrag.image_io import to_uint8

METHODS = ("base", "daid", "faid", "faid+daid")


@dataclass
class DecodeState:
    """What a hook can see: the model, the grid, and the codes sampled so far ([N, h*w], -1 = not yet)."""

    model: Any
    grid: tuple[int, int]
    codes: torch.Tensor
    cond_rows: torch.Tensor  # Long [N]: the conditional row of each image in the 2N-row batch
    extras: dict = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return self.codes.shape[0]


class DecodingHook:
    """Plug-in points of the loop. Every method is optional; the default does nothing.

    begin(state)                    once, before the prompt prefill
    before_forward(state, target)   before the forward pass whose last position predicts token `target`
    adjust_probs(state, target, p)  p: fp32 [N, V] after CFG and temperature; return the distribution to sample
    end(state)                      once, after the last token (also when decoding fails)
    """

    def begin(self, state: DecodeState) -> None:
        pass

    def before_forward(self, state: DecodeState, target: int) -> None:
        pass

    def adjust_probs(self, state: DecodeState, target: int, probs: torch.Tensor) -> torch.Tensor:
        return probs

    def end(self, state: DecodeState) -> None:
        pass


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


@torch.no_grad()
def sample_codes(model, prompts: Sequence[str], *, parallel_size: int = 1, cfg_weight: float = 5.0,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 0, image_size: int = 384, hooks: Sequence[DecodingHook] = (), prompter=None,
                 batch_size: int | None = None, image_index_offset: int = 0,
                 prompt_indices: Sequence[int] | None = None, progress: bool = True) -> torch.Tensor:
    """Sample code grids for every prompt x parallel_size: Long [len(prompts) * parallel_size, h, w].

    Image j*parallel_size + s is sample s of prompt j; its random draws come from (seed, image_index_offset +
    that index), or, with `prompt_indices` (each prompt's index in a larger list), from (seed, index *
    parallel_size + s): a prompt's images do not depend on which other prompts share the run or the batch.
    `batch_size` caps images per forward pass (default: all at once); results do not depend on it.
    """
    from arrag.janus.prompting import Prompter

    if parallel_size < 1:
        raise ArragError(f"--parallel-size must be >= 1, got {parallel_size}")
    if not prompts:
        raise ArragError("no prompts given")
    h = w = model.vq.grid_size(image_size)
    if prompter is None:
        if getattr(model, "source_folder", None) is None:
            raise ArragError("the model was not loaded from a folder; pass prompter=Prompter.from_folder(...)")
        prompter = Prompter.from_folder(model.source_folder)
    captions = [p for p in prompts for _ in range(parallel_size)]
    if prompt_indices is not None:
        if len(prompt_indices) != len(prompts):
            raise ValueError("prompt_indices needs one index per prompt")
        seeds = image_seeds(seed, [j * parallel_size + s for j in prompt_indices for s in range(parallel_size)])
    else:
        seeds = image_seeds(seed, range(image_index_offset, image_index_offset + len(captions)))
    chunk = batch_size or len(captions)
    out = []
    for s in range(0, len(captions), chunk):
        out.append(_sample_chunk(model, prompter, captions[s:s + chunk], seeds[s:s + chunk], (h, w), cfg_weight,
                                 temperature, top_k, top_p, hooks, progress))
    return torch.cat(out).reshape(len(captions), h, w)


def _sample_chunk(model, prompter, captions, seeds, grid, cfg_weight, temperature, top_k, top_p, hooks, progress):
    device = model.device
    n, steps = len(captions), grid[0] * grid[1]
    batch = prompter.batch(captions, device)
    uniforms = image_uniforms(seeds, steps)
    max_pos = model.config.language.max_position_embeddings
    if batch.input_ids.shape[1] + steps > max_pos:
        raise ArragError(f"prompt ({batch.input_ids.shape[1]} tokens) + {steps} image tokens exceed the model's "
                         f"max_position_embeddings {max_pos}; shorten the prompt or lower --image-size")
    state = DecodeState(model, grid, torch.full((n, steps), -1, dtype=torch.long, device=device),
                        torch.arange(0, 2 * n, 2, device=device))
    cache = model.llm.new_cache(2 * n, batch.input_ids.shape[1] + steps)
    for hook in hooks:
        hook.begin(state)
    try:
        _decode_loop(model, state, batch, cache, uniforms, steps, cfg_weight, temperature, top_k, top_p, hooks,
                     progress)
    finally:  # hooks release what they hold (FAiD's per-forward context) even when decoding fails
        for hook in hooks:
            hook.end(state)
    return state.codes


def _decode_loop(model, state, batch, cache, uniforms, steps, cfg_weight, temperature, top_k, top_p, hooks,
                 progress):
    for hook in hooks:
        hook.before_forward(state, 0)
    hidden = model.llm(model.text_embeddings(batch.input_ids), batch.attention_mask, cache)[:, -1]
    bar = tqdm(range(steps), desc="decoding", unit="tok", disable=not progress, leave=False)
    for t in bar:
        logits = model.image_logits(hidden)
        cond, uncond = logits[0::2], logits[1::2]
        logits = uncond + cfg_weight * (cond - uncond)
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
        else:
            probs = torch.softmax(logits, dim=-1)
        for hook in hooks:
            probs = hook.adjust_probs(state, t, probs)
        if temperature > 0:
            tokens = sample_from(filter_probs(probs, top_k, top_p), uniforms[:, t])
        else:
            tokens = probs.argmax(-1)
        state.codes[:, t] = tokens
        if t == steps - 1:
            break
        for hook in hooks:
            hook.before_forward(state, t + 1)
        emb = model.image_embeddings(tokens.repeat_interleave(2))[:, None]  # same token for cond and uncond rows
        hidden = model.llm(emb, None, cache)[:, -1]


@torch.no_grad()
def decode_images(model, codes: torch.Tensor, batch_size: int = 8) -> np.ndarray:
    """Code grids Long [N, h, w] -> uint8 images [N, H, W, 3] through the model's VQ, in chunks (converted as
    Janus-Pro's generation script does: (x + 1) / 2 * 255, clipped, truncated)."""
    return np.concatenate([to_uint8(model.vq.decode_codes(codes[s:s + batch_size]).float(), "janus")
                           for s in range(0, len(codes), batch_size)])


def method_hooks(model, method: str, retriever=None, *, daid_lambda: float | None = None,
                 daid_tau: float | None = None, daid_k: int | None = None, daid_aggregate: str = "nearest",
                 faid_k: int = 10, allow_unknown_vq: bool = False) -> list[DecodingHook]:
    """The hooks a method needs, after checking the retriever against the model's tokenizer."""
    if method not in METHODS:
        raise ArragError(f"--method {method!r} is not available; choose one of {', '.join(METHODS)}")
    if method == "base":
        if retriever is not None:
            raise ArragError("a retriever was given, but --method base does not use one")
        return []
    if retriever is None:
        raise ArragError(f"--method {method} needs a retriever (--retriever DIR)")
    if method.startswith("faid") and not model.has_faid:
        raise ArragError(f"--method {method}: the model {model.source_folder or ''} has no FAiD blenders (its "
                         "config lacks num_SmoothPatchBlender/num_hop); pass a FAiD checkpoint")
    retriever.check_compatible(model.vq, allow_unknown=allow_unknown_vq)
    hooks: list[DecodingHook] = []
    if method.startswith("faid"):
        from arrag.decoding.faid import FAiD

        hooks.append(FAiD(retriever, k=faid_k))
    if method.endswith("daid"):
        from arrag.decoding.daid import DEFAULT_K, DEFAULT_LAMBDA, DEFAULT_TAU, DAiD

        hooks.append(DAiD(retriever, lam=DEFAULT_LAMBDA if daid_lambda is None else daid_lambda,
                          tau=DEFAULT_TAU if daid_tau is None else daid_tau, k=DEFAULT_K if daid_k is None else daid_k,
                          aggregate=daid_aggregate))
    return hooks


def generate(model, prompts: Sequence[str], *, method: str = "base", retriever=None, parallel_size: int = 1,
             cfg_weight: float = 5.0, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, image_size: int = 384,
             daid_lambda: float | None = None, daid_tau: float | None = None, daid_k: int | None = None,
             daid_aggregate: str = "nearest", faid_k: int = 10, allow_unknown_vq: bool = False,
             hooks: Sequence[DecodingHook] = (), prompter=None, batch_size: int | None = None,
             image_index_offset: int = 0, progress: bool = True) -> np.ndarray:
    """Generate uint8 images [len(prompts) * parallel_size, H, W, 3] (image j*parallel_size+s = prompt j, sample s).

    method: "base" or "daid" (needs `retriever`, a PatchRetriever built with this model's VQ).
    seed=None draws a fresh seed (callers that record settings should pick the seed themselves).
    Extra `hooks` run after the method's own, in the given order.
    """
    hooks = [*method_hooks(model, method, retriever, daid_lambda=daid_lambda, daid_tau=daid_tau, daid_k=daid_k,
                           daid_aggregate=daid_aggregate, faid_k=faid_k, allow_unknown_vq=allow_unknown_vq), *hooks]
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1)[0])
    codes = sample_codes(model, prompts, parallel_size=parallel_size, cfg_weight=cfg_weight,
                         temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, image_size=image_size,
                         hooks=hooks, prompter=prompter, batch_size=batch_size,
                         image_index_offset=image_index_offset, progress=progress)
    return decode_images(model, codes)
