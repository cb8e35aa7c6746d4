"""Benchmark generation: every prompt of a source into a layout, resumable, shared by several processes.

Prompt j's sample s draws its randomness from (seed, j * parallel_size + s), so the images do not depend on
the batch, on which prompts were already done, or on how many processes share the work. Process r of W
(under `accelerate launch` or torchrun, from the environment) takes the prompts with j % W == r. Before a
prompt is generated it is claimed with a marker file created atomically, so independent runs started on
the same folder split the prompts instead of each doing all of them; a claim whose process has died on
this host (or that is older than a day, from another host) is taken over.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from arrag import fileops
from arrag.decoding.loop import SamplingConfig
from arrag.decoding.methods import Generator
from arrag.errors import ArragError
from arrag.eval.layouts import CLAIMS, LAYOUT_KIND, Layout, write_prompt_list
from arrag.eval.prompts import PromptItem
from arrag.provenance import SettingsLock

STALE_CLAIM_SECONDS = 24 * 3600  # a claim from another host is trusted this long


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


def prompts_digest(items: Sequence[PromptItem]) -> str:
    """sha256 of every prompt's index, name, text and record: an edited prompt file gives another digest."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.index, it.name, it.text, it.metadata]).encode())
    return h.hexdigest()[:16]


class Claims:
    """Marker files <out>/.claims/<index>: created with O_EXCL, so exactly one process takes each prompt."""

    def __init__(self, out: Path):
        self.folder = out / CLAIMS

    def _path(self, item: PromptItem | str) -> Path:
        return self.folder / (item if isinstance(item, str) else f"{item.index:08d}")

    def take(self, item: PromptItem | str) -> bool:
        """Claim a prompt (or, by name, the whole folder: plain runs take "folder"); False if another live run
        holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(item)
        for _ in range(2):
            if self._create(path):
                return True
            if not self._stale(path):
                return False
            path.unlink(missing_ok=True)  # its process is gone: take it over
        return False

    @staticmethod
    def _create(path: Path) -> bool:
        """Create `path` holding this process's identity, atomically: the claim never exists half-written
        (a hard link of a finished temporary file; link() fails if the name exists)."""
        tmp = fileops.temp_path(path)
        try:
            tmp.write_text(json.dumps({"host": fileops.HOST, "pid": os.getpid(), "time": time.time()}))
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ArragError(fileops.disk_full_message(path)) from None
            raise
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive creation, then the content
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(tmp.read_text())
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def release(self, item: PromptItem | str) -> None:
        self._path(item).unlink(missing_ok=True)

    def tidy(self) -> None:
        """Remove the claims folder once no run holds a claim (evaluators list every folder of the output)."""
        try:
            self.folder.rmdir()
        except OSError:  # not empty (another run is working) or already gone
            pass

    @staticmethod
    def _stale(path: Path) -> bool:
        try:
            owner = json.loads(path.read_text())
        except (OSError, ValueError):  # gone, or (without hard links) still being written
            return not path.exists() or time.time() - path.stat().st_mtime > 60
        if owner.get("host") == fileops.HOST:
            return not fileops.pid_alive(int(owner.get("pid", 0)))
        return time.time() - float(owner.get("time", 0)) > STALE_CLAIM_SECONDS


def generate_into_layout(generator: Generator, items: Sequence[PromptItem], layout: Layout,
                         sampling: SamplingConfig, *, prompts_per_batch: int = 1, slot: ProcessSlot = ProcessSlot(),
                         progress: bool = True, before_write: Callable[[], None] | None = None,
                         desc: str | None = None) -> dict:
    """Generate this process's unfinished, unclaimed prompts into `layout`; returns counts and timing.

    `before_write` runs once, just before the first images are written (the caller locks its settings then).
    """
    if layout.parallel_size != sampling.parallel_size:
        raise ValueError("the layout and the sampling config disagree on the samples per prompt")
    mine = slot.mine(items)
    todo = [it for it in mine if not layout.done(it)]
    claims = Claims(layout.out)
    bar = tqdm(total=len(todo), desc=desc or f"generate [{slot.rank + 1}/{slot.world}]", unit="prompt",
               disable=not progress)
    t0 = time.perf_counter()
    try:
        generated, elsewhere = _generate_pending(generator, list(todo), layout, sampling, claims, bar,
                                                 prompts_per_batch, before_write)
    finally:  # an empty claims folder would read as a prompt folder to GenEval's evaluator
        bar.close()
        claims.tidy()
    return {"prompts": len(mine), "skipped": len(mine) - len(todo), "generated": generated,
            "done_elsewhere": elsewhere, "seconds": round(time.perf_counter() - t0, 3)}


def _generate_pending(generator: Generator, pending: list[PromptItem], layout: Layout, sampling: SamplingConfig,
                      claims: Claims, bar, prompts_per_batch: int, before_write) -> tuple[int, int]:
    """Generate the pending prompts that no other run holds, a batch at a time; (generated, done elsewhere)."""
    p, generated, elsewhere = sampling.parallel_size, 0, 0
    while pending:
        batch = []
        while pending and len(batch) < prompts_per_batch:
            it = pending.pop(0)
            taken = not layout.done(it) and claims.take(it)
            if taken and layout.done(it):  # another run finished it (and let go of its claim) in between
                claims.release(it)
                taken = False
            if not taken:
                elsewhere += 1  # finished or being generated by another run on this folder
                bar.update(1)
                continue
            batch.append(it)
        if not batch:
            break
        try:
            images = generator.generate([it.text for it in batch], sampling, progress=False,
                                        image_indices=[it.index * p + s for it in batch for s in range(p)])
            if before_write is not None:  # the first results: lock the folder's settings now, not before
                before_write()
                before_write = None
            for k, it in enumerate(batch):
                layout.write(it, images[k * p:(k + 1) * p])
        finally:
            for it in batch:
                claims.release(it)
        generated += len(batch)
        bar.update(len(batch))
    return generated, elsewhere


def run_layout(generator: Generator, items: Sequence[PromptItem], layout: Layout, sampling: SamplingConfig, *,
               prompts_source: str | None, slot: ProcessSlot = ProcessSlot(), prompts_per_batch: int = 1,
               progress: bool = True, desc: str | None = None) -> dict:
    """`generate --layout`: lock the settings (checked now, recorded with the first images), write the prompt
    list, and generate this process's share. A rerun with the same settings resumes; other settings, another
    model or an edited prompt file are refused."""
    sampling = sampling.for_model(generator.model)
    settings = {**generator.settings(), **sampling.settings(), "layout": layout.name,
                "prompts": str(Path(prompts_source).resolve()) if prompts_source else None,
                "num_prompts": len(items), "prompts_sha256": prompts_digest(items)}
    settings.pop("device", None)  # processes of one run use different devices
    settings.pop("decode_step", None)  # eager, static and graph steps: the same images up to float rounding
    settings.pop("batch_size", None)  # does not change the images
    layout.check_out()
    lock = SettingsLock(layout.out / "settings.json", settings, what="images", has_results=layout.has_results,
                        start_over=f"use another --out (or delete {layout.out} to start over)", kind=LAYOUT_KIND)
    lock.check()

    def first_images() -> None:
        lock.record()
        if slot.rank == 0:
            write_prompt_list(layout, items)

    return generate_into_layout(generator, items, layout, sampling, prompts_per_batch=prompts_per_batch, slot=slot,
                                progress=progress, before_write=first_images, desc=desc)
