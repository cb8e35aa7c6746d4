"""Benchmark generation: every prompt of a source into a layout, resumable, split across processes.

Prompt j's sample s draws its randomness from (seed, j * parallel_size + s) (`sample_codes(prompt_indices=)`),
so the images do not depend on the batch, on which prompts were already done, or on how many processes
share the work. Process r of W takes the prompts with j % W == r; under `accelerate launch` (or torchrun)
the rank and world size come from the environment.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm import tqdm

from arrag.eval.layouts import Layout
from arrag.eval.prompts import PromptItem


@dataclass(frozen=True)
class ProcessSlot:
    """This process's share of the work: rank in 0..world-1 and the device it should use."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> ProcessSlot:
        """RANK / WORLD_SIZE / LOCAL_RANK as set by accelerate launch and torchrun (1 process otherwise)."""
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    def mine(self, items: Sequence[PromptItem]) -> list[PromptItem]:
        return [it for it in items if it.index % self.world == self.rank]


def generate_into_layout(model, items: Sequence[PromptItem], layout: Layout, *, seed: int, hooks=(),
                         prompts_per_batch: int = 1, slot: ProcessSlot = ProcessSlot(), progress: bool = True,
                         before_write=None, **sampling) -> dict:
    """Generate this process's unfinished prompts into `layout`; returns counts and timing.

    `sampling`: sample_codes keywords (cfg_weight, temperature, top_k, top_p, image_size, batch_size).
    """
    from arrag.decoding.sampler import decode_images, sample_codes

    mine = slot.mine(items)
    todo = [it for it in mine if not layout.done(it)]
    bar = tqdm(total=len(todo), desc=f"generate [{slot.rank + 1}/{slot.world}]", unit="prompt",
               disable=not progress)
    t0 = time.perf_counter()
    p = layout.parallel_size
    for start in range(0, len(todo), prompts_per_batch):
        batch = todo[start:start + prompts_per_batch]
        codes = sample_codes(model, [it.text for it in batch], parallel_size=p, seed=seed, hooks=hooks,
                             prompt_indices=[it.index for it in batch], progress=False, **sampling)
        images = decode_images(model, codes)
        if before_write is not None:  # the first results: lock the folder's settings now, not before
            before_write()
            before_write = None
        for k, it in enumerate(batch):
            layout.write(it, images[k * p:(k + 1) * p])
        bar.update(len(batch))
    bar.close()
    return {"prompts": len(mine), "skipped": len(mine) - len(todo), "generated": len(todo),
            "seconds": round(time.perf_counter() - t0, 3)}
