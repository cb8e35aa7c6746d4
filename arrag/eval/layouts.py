"""Where benchmark images go: exactly the files each official evaluator reads.

  geneval  <out>/<5-digit index>/metadata.jsonl (that prompt's line of evaluation_metadata.jsonl) and
           samples/<4-digit>.png, plus grid.png with --grid; metadata.jsonl is written last, so it marks a
           finished prompt (GenEval's evaluate_images.py reads both).
  dpg      <out>/<id>.png: the samples tiled without gaps into a square grid (4 samples -> 2x2), which
           DPG-Bench's compute_dpg_bench.py cuts back into --pic-num crops of --resolution pixels.
  flat     <out>/<name>.png, or <name>_<2-digit sample>.png with several samples (FID folders); the name is the
           5-digit index, or the CSV's id (MJHQ-30K's image ids).
Every image is written under a temporary name and renamed, so a prompt's files exist only when complete.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from arrag.errors import ArragError
from arrag.eval.prompts import PromptItem
from arrag.fileops import write_text
from arrag.image_io import make_grid, save_image
from arrag.provenance import write_json

LAYOUTS = ("geneval", "dpg", "flat")


CLAIMS = ".claims"  # markers of prompts being generated (see batch_generate.Claims)
# Files every layout folder may hold besides the images: the run's records and the claims.
RECORD_FILES = (r"settings\.json", r"prompts\.json", r"\.claims/\d{8}")


class Layout:
    """Paths of a prompt's outputs, whether they are all there, and how to write them."""

    name = ""
    owned: tuple[str, ...] = RECORD_FILES  # regexes of every file the layout writes (what arrag may remove)

    def __init__(self, out: str | Path, parallel_size: int, fmt: str = "png", grid: bool = False):
        self.out, self.parallel_size, self.fmt, self.grid = Path(out), parallel_size, fmt, grid

    def paths(self, item: PromptItem) -> list[Path]:
        raise NotImplementedError

    def done(self, item: PromptItem) -> bool:
        return all(p.is_file() for p in self.paths(item))

    def has_results(self) -> bool:
        """True once any image of this layout exists in the folder."""
        return self.out.is_dir() and any(p.suffix.lower() in (".png", ".jpg", ".webp") for p in self.out.rglob("*"))

    def write(self, item: PromptItem, images: np.ndarray) -> None:
        """images: uint8 [parallel_size, H, W, 3], the prompt's samples in order."""
        raise NotImplementedError


class GenevalLayout(Layout):
    name = "geneval"
    owned = (*RECORD_FILES, r"\d{5}/metadata\.jsonl", r"\d{5}/samples/\d{4}\.png", r"\d{5}/grid\.png")

    def __init__(self, out: str | Path, parallel_size: int, fmt: str = "png", grid: bool = False):
        if fmt != "png":
            raise ArragError(f"--layout geneval needs --format png (GenEval reads samples/NNNN.png only); got {fmt}")
        super().__init__(out, parallel_size, fmt, grid)

    def folder(self, item: PromptItem) -> Path:
        return self.out / f"{item.index:05d}"

    def paths(self, item: PromptItem) -> list[Path]:
        f = self.folder(item)
        return [f / "samples" / f"{s:04d}.{self.fmt}" for s in range(self.parallel_size)] + [f / "metadata.jsonl"]

    def write(self, item: PromptItem, images: np.ndarray) -> None:
        *samples, meta = self.paths(item)
        for path, image in zip(samples, images, strict=True):
            save_image(image, path)
        if self.grid:
            save_image(make_grid(images, ncol=min(len(images), 4)), self.folder(item) / f"grid.{self.fmt}")
        record = item.metadata if item.metadata is not None else json.dumps({"prompt": item.text})
        write_text(meta, record + "\n")


class DpgLayout(Layout):
    name = "dpg"
    owned = (*RECORD_FILES, r"[^/]+\.(png|jpg|webp)")

    def __init__(self, out: str | Path, parallel_size: int, fmt: str = "png", grid: bool = False):
        side = math.isqrt(parallel_size)
        if side * side != parallel_size:
            raise ArragError(f"--layout dpg tiles the samples into a square grid: --parallel-size must be 1, 4, 9, "
                             f"...; got {parallel_size} (DPG-Bench uses 4)")
        super().__init__(out, parallel_size, fmt, grid)
        self.side = side

    def paths(self, item: PromptItem) -> list[Path]:
        return [self.out / f"{item.name}.{self.fmt}"]

    def write(self, item: PromptItem, images: np.ndarray) -> None:
        save_image(make_grid(images, ncol=self.side, pad=0), self.paths(item)[0])


class FlatLayout(Layout):
    name = "flat"
    owned = (*RECORD_FILES, r"[^/]+\.(png|jpg|webp)")

    def paths(self, item: PromptItem) -> list[Path]:
        if self.parallel_size == 1:
            return [self.out / f"{item.name}.{self.fmt}"]
        return [self.out / f"{item.name}_{s:02d}.{self.fmt}" for s in range(self.parallel_size)]

    def write(self, item: PromptItem, images: np.ndarray) -> None:
        for path, image in zip(self.paths(item), images, strict=True):
            save_image(image, path)


PLAIN_IMAGE = re.compile(r"\d{4,}_\d{2}\.(png|jpg|webp)")


def check_plain_out(out: str | Path, overwrite: bool) -> None:
    """Refuse to write plain output over the images of an earlier run, unless `overwrite` (which removes them)."""
    out = Path(out)
    earlier = sorted(p for p in out.iterdir() if PLAIN_IMAGE.fullmatch(p.name)) if out.is_dir() else []
    if earlier and not overwrite:
        raise ArragError(f"{out} holds {len(earlier)} images of an earlier run ({earlier[0].name}, ...); pass "
                         "--overwrite to replace them, or another --out")
    for p in earlier:
        p.unlink()


def write_plain(images: np.ndarray, out: str | Path, parallel_size: int, fmt: str = "png",
                grid: str | Path | None = None) -> list[str]:
    """Plain `arrag generate` output: <out>/<prompt 4 digits>_<sample 2 digits>.<fmt>, plus an optional grid of
    all images (one row per prompt); returns the file names."""
    out = Path(out)
    files = []
    for i, image in enumerate(images):
        j, s = divmod(i, parallel_size)
        files.append(save_image(image, out / f"{j:04d}_{s:02d}.{fmt}").name)
    if grid:
        save_image(make_grid(images, ncol=parallel_size), grid)
    return files


def make_layout(name: str, out: str | Path, parallel_size: int, fmt: str = "png", grid: bool = False) -> Layout:
    classes = {"geneval": GenevalLayout, "dpg": DpgLayout, "flat": FlatLayout}
    if name not in classes:
        raise ArragError(f"--layout must be one of {', '.join(LAYOUTS)}; got {name!r}")
    return classes[name](out, parallel_size, fmt, grid)


def write_prompt_list(layout: Layout, items: list[PromptItem]) -> None:
    """`prompts.json` beside the outputs: index, name and text of every prompt (for reading results back)."""
    write_json(layout.out / "prompts.json", [{"index": it.index, "name": it.name, "prompt": it.text} for it in items])
