"""Demo-world splits rendered to folders, and a demo retriever built from one with the real encode/build-index."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from arrag.build_retriever.build_index import build_index
from arrag.build_retriever.encode import encode
from arrag.demo.worlds import get_world
from arrag.fileops import remove_owned_dir, sweep_stale_temps, temp_path
from arrag.image_io import save_image
from arrag.provenance import read_json_dict
from arrag.retrieval.codestore import STORE_FILES
from arrag.vq import load_vq

DEMO_RETRIEVER = Path("data/retriever/demo_L")


def render_split(folder: Path, split: str, count: int, size: int, seed: int, world: str = "shapes",
                 start: int = 0, progress: bool = True, **params) -> Path:
    """Render items start..start+count-1 of a world's split as PNGs (named from 000000) with same-named .txt captions
    (for `arrag encode`); `params` are the world's own settings (TailWorld: zipf_s)."""
    folder.mkdir(parents=True, exist_ok=True)
    world = get_world(world).split(split, seed=seed, size=size, **params)
    for i in tqdm(range(count), desc=f"render {split}", unit="img", leave=False,
                  disable=not progress):
        png = folder / f"{i:06d}.png"
        if not png.exists():
            (folder / f"{i:06d}.txt").write_text(world.scene(start + i).caption)
            save_image(world.image(start + i), png)
    return folder


def build_demo_retriever(vq_source: Path, folder: Path, images: int, image_size: int, seed: int = 0,
                         progress: bool = True, device: str = "auto", world: str = "shapes", split: str = "database",
                         shape: str = "L", **params) -> Path:
    """Render `images` images of a world's database split (or `split`, e.g. TailWorld's control_database), encode
    them and index them under `folder`/index with the `shape` neighbourhood (reused when up to date: same
    tokenizer, image count and neighbourhood; the code store is kept beside it, so another shape re-indexes only)."""
    vq = load_vq(vq_source)
    index = folder / "index"
    if (index / "manifest.json").exists():
        man = json.loads((index / "manifest.json").read_text())
        if vq.matches(man.get("vq_fingerprint")) and man.get("images") == images and man.get("dedup") and \
                man.get("neighborhood", {}).get("shape", "L") == shape:
            print(f"[demo] reusing the demo retriever {index} ({man.get('entries'):,} entries)", file=sys.stderr)
            return index
    # The rendered images live under a temporary name beside the index: removed when done or interrupted, and
    # swept by the next run if this process was killed outright.
    folder.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(folder)
    store = folder / "codes"
    made = read_json_dict(store / "manifest.json")
    if not (made and vq.matches(made.get("vq_fingerprint")) and made.get("num_images") == images):
        rendered = temp_path(folder / "render")
        try:
            render_split(rendered, split, images, image_size, seed, world, progress=progress, **params)
            remove_owned_dir(store, what="code store", owned=STORE_FILES)
            encode(str(rendered), store, vq_source, image_size=image_size, batch_size=64, num_workers=0, min_size=8,
                   device=device, progress=progress)
        finally:
            remove_owned_dir(rendered, what="rendered database", owned=(r"\d{6}\.(png|txt)",))
    build_index(store, index, shape=shape, overwrite=True, progress=progress)
    return index
