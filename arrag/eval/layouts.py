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
from arrag.fileops import check_out_dir, foreign_files, overwrite_hint, write_text
from arrag.image_io import make_grid, save_image
from arrag.provenance import made_by, read_json_dict, write_json

LAYOUTS = ("geneval", "dpg", "flat")


CLAIMS = ".claims"  # markers of prompts being generated, or of a plain run's folder (see batch_generate.Claims)
# Files every layout folder may hold besides the images: the run's records and the claims.
CLAIMS_FILE = r"\.claims/(\d{8}|folder)"
RECORD_FILES = (r"settings\.json", r"prompts\.json", CLAIMS_FILE)
LAYOUT_KIND = "generate --layout"  # the arrag_output of a layout folder's settings lock
PLAIN_KIND = "generate"  # ... and of plain generate's sidecar


class Layout:
    """Paths of a prompt's outputs, whether they are all there, and how to write them."""

    name = ""
    samples = ""  # regex of the sample images' paths inside the folder
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

    def is_ours(self) -> bool:
        """True when the folder's settings lock says a `--layout` run of this layout made it, or the folder holds
        only the prompt claims of a run that has not written its first images yet (arrag writes into, and counts
        finished prompts in, nothing else)."""
        if not (self.out / "settings.json").exists():
            return only_claims(self.out)
        return made_by(self.out / "settings.json", LAYOUT_KIND,
                       legacy=lambda r: r.get("layout") == self.name and "prompts_sha256" in r) and \
            read_json_dict(self.out / "settings.json").get("layout") == self.name

    def check_out(self) -> None:
        """Refuse a --out that is a file or a folder this layout's runs did not make (before any model loads)."""
        check_out_dir(self.out, what=f"--layout {self.name} folder", is_ours=self.is_ours())

    def sample_files(self) -> list[Path]:
        """Every sample image the folder holds (what FID reads), by the layout's own names: never grid.png."""
        pattern = re.compile(self.samples)
        return sorted(p for p in self.out.rglob("*") if p.is_file()
                      and pattern.fullmatch(p.relative_to(self.out).as_posix()))

    def write(self, item: PromptItem, images: np.ndarray) -> None:
        """images: uint8 [parallel_size, H, W, 3], the prompt's samples in order."""
        raise NotImplementedError


class GenevalLayout(Layout):
    name = "geneval"
    samples = r"\d{5}/samples/\d{4}\.png"
    owned = (*RECORD_FILES, r"\d{5}/metadata\.jsonl", samples, r"\d{5}/grid\.png")

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
    samples = r"[^/]+\.(png|jpg|webp)"
    owned = (*RECORD_FILES, samples)

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
    samples = r"[^/]+\.(png|jpg|webp)"
    owned = (*RECORD_FILES, samples)

    def paths(self, item: PromptItem) -> list[Path]:
        if self.parallel_size == 1:
            return [self.out / f"{item.name}.{self.fmt}"]
        return [self.out / f"{item.name}_{s:02d}.{self.fmt}" for s in range(self.parallel_size)]

    def write(self, item: PromptItem, images: np.ndarray) -> None:
        for path, image in zip(self.paths(item), images, strict=True):
            save_image(image, path)


def plain_names(prompts: int, parallel_size: int, fmt: str = "png") -> list[str]:
    """Plain `arrag generate` file names: <prompt 4 digits>_<sample 2 digits>.<fmt>."""
    return [f"{j:04d}_{s:02d}.{fmt}" for j in range(prompts) for s in range(parallel_size)]


def only_claims(out: str | Path) -> bool:
    """True when `out` holds nothing but the claims of a run that has not written its first files yet."""
    out = Path(out)
    return (out / CLAIMS).is_dir() and not foreign_files(out, (CLAIMS_FILE,))


def is_plain_folder(out: str | Path) -> bool:
    """True when plain `arrag generate` made `out` (its settings.json sidecar says so), or is making it."""
    return only_claims(out) or made_by(Path(out) / "settings.json", PLAIN_KIND,
                                       legacy=lambda r: "arrag_version" in r and "files" in r.get("settings", {}))


def check_plain_out(out: str | Path, names: list[str], overwrite: bool) -> list[Path]:
    """Check a plain run's --out before any model loads; returns the earlier run's files it will replace.

    The folder must be missing, empty or made by plain generate; the files of the earlier run there (those its
    sidecar lists) are replaced only with `overwrite`, and a file the new run would write that no sidecar lists
    (the user's own) is never replaced."""
    out = Path(out)
    check_out_dir(out, what="generated images folder", is_ours=is_plain_folder(out))
    if not out.is_dir():
        return []
    record = read_json_dict(out / "settings.json") or {}
    listed = set(record.get("settings", {}).get("files", [])) if is_plain_folder(out) else set()
    foreign = [n for n in names if (out / n).exists() and n not in listed]
    if foreign:
        raise ArragError(f"{out / foreign[0]} exists and no earlier arrag run wrote it; pass another --out")
    earlier = sorted(out / n for n in listed if (out / n).is_file())
    if earlier and not overwrite:
        raise ArragError(f"{out} holds {len(earlier)} images of an earlier run ({earlier[0].name}, ...); "
                         f"{overwrite_hint()} to replace them, or use another output")
    return earlier


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """uint8 [H, W, C] enlarged `factor` times by repeating pixels (nearest): small demo images made visible."""
    return image if factor == 1 else np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def write_plain(images: np.ndarray, out: str | Path, parallel_size: int, fmt: str = "png",
                grid: str | Path | None = None, replace: list[Path] = (), scale: int = 1) -> list[str]:
    """Plain `arrag generate` output: <out>/<prompt 4 digits>_<sample 2 digits>.<fmt>, plus an optional grid of
    all images (one row per prompt); returns the file names. `replace`: the earlier run's files (check_plain_out),
    removed first. `scale` (--upscale): every written image enlarged that many times (nearest)."""
    out = Path(out)
    for p in replace:
        p.unlink(missing_ok=True)
    files = []
    for name, image in zip(plain_names(len(images) // parallel_size, parallel_size, fmt), images, strict=True):
        files.append(save_image(upscale(image, scale), out / name).name)
    if grid:
        save_image(upscale(make_grid(images, ncol=parallel_size), scale), grid)
    return files


def make_layout(name: str, out: str | Path, parallel_size: int, fmt: str = "png", grid: bool = False) -> Layout:
    classes = {"geneval": GenevalLayout, "dpg": DpgLayout, "flat": FlatLayout}
    if name not in classes:
        raise ArragError(f"--layout must be one of {', '.join(LAYOUTS)}; got {name!r}")
    return classes[name](out, parallel_size, fmt, grid)


def layout_of(folder: str | Path) -> Layout | None:
    """The layout of a folder that `arrag generate --layout` made (its settings lock says which), else None."""
    record = read_json_dict(Path(folder) / "settings.json")
    if record is None or record.get("layout") not in LAYOUTS:
        return None
    layout = make_layout(record["layout"], folder, int(record.get("parallel_size") or 1))
    return layout if layout.is_ours() else None


def write_prompt_list(layout: Layout, items: list[PromptItem]) -> None:
    """`prompts.json` beside the outputs: index, name and text of every prompt (for reading results back)."""
    write_json(layout.out / "prompts.json", [{"index": it.index, "name": it.name, "prompt": it.text} for it in items])
