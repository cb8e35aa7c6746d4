"""Memory of `arrag encode` over many shards: RSS after every shard, growth per 1,000 images after the first.

    .venv/bin/python bench/encode_soak.py [--images 12288] [--size 384] [--shard-size 4096] [--vq-preset VQ-tiny-16]

Images: `--distinct` rendered ShapesWorld scenes saved as JPEG at --size px, repeated under new names (hard links)
up to --images, in bench/out/soak/ (kept for reruns). The tokenizer is a randomly initialised VQ of --vq-preset
(the encoder's work per image, not its weights, drives memory). Each run is its own process: once as arrag runs
(freed heap pages given back after every batch, `runtime.trim_heap`), and, with --compare, once without it,
alternating; the time of each is printed too. Target: under 5 MB of growth per 1,000 images after the first shard.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out" / "soak"


def make_images(folder: Path, n: int, distinct: int, size: int) -> Path:
    from arrag.demo.shapes import ShapesWorld
    from arrag.image_io import save_image

    folder.mkdir(parents=True, exist_ok=True)
    world = ShapesWorld("database", size=size)
    for i in range(n):
        path = folder / f"{i:07d}.jpg"
        if path.exists():
            continue
        if i < distinct:
            save_image(world.image(i), path)
        else:
            os.link(folder / f"{i % distinct:07d}.jpg", path)
    return folder


def one_run(images: str, out: str, vq: str, shard_size: int, workers: int | None, default_malloc: bool) -> dict:
    """Encode in this process, sampling RSS after each shard is written."""
    import psutil

    from arrag import runtime
    from arrag.build_retriever import encode as enc

    if default_malloc:  # the comparison: glibc left to itself
        runtime.trim_heap = lambda: None
    proc, rss = psutil.Process(), []
    flush = enc._flush

    def sampled(folder, k, rows, *a, **kw):
        flush(folder, k, rows, *a, **kw)
        rss.append(proc.memory_info().rss / 2**20)

    enc._flush = sampled
    t0 = time.perf_counter()
    result = enc.encode(images, out, vq, shard_size=shard_size, num_workers=workers, progress=False, device="cpu")
    return {"rss_mib_per_shard": [round(r, 1) for r in rss], "seconds": round(time.perf_counter() - t0, 1),
            "images": result.encoded}


def growth_per_1000(rss: list[float], shard_size: int) -> float:
    """MiB of RSS growth per 1,000 images from the end of the first shard to the end of the last."""
    if len(rss) < 2:
        return float("nan")
    return (rss[-1] - rss[0]) / ((len(rss) - 1) * shard_size / 1000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=3 * 4096)
    ap.add_argument("--distinct", type=int, default=1000, help="distinct rendered scenes (the rest repeat them)")
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--shard-size", type=int, default=4096)
    ap.add_argument("--vq-preset", default="VQ-tiny-16")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: encode's)")
    ap.add_argument("--compare", action="store_true", help="also run with glibc's default allocator settings")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--one", nargs=2, metavar=("OUT", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    images = OUT / f"img{args.size}"
    vq = OUT / f"{args.vq_preset}.safetensors"
    if args.one:
        out, mode = args.one
        print(json.dumps(one_run(str(images), out, str(vq), args.shard_size, args.workers, mode == "default")))
        return
    import torch

    from arrag.vq import VQModel

    t0 = time.perf_counter()
    make_images(images, args.images, args.distinct, args.size)
    print(f"[soak] {args.images:,} images of {args.size} px ready in {time.perf_counter() - t0:.0f} s", flush=True)
    if not vq.exists():
        torch.manual_seed(0)
        VQModel(args.vq_preset).save(vq)
    modes = ["arrag", "default"] if args.compare else ["arrag"]
    runs = []
    for r in range(args.repeats):
        for mode in modes:
            store = OUT / f"store-{mode}"
            subprocess.run(["rm", "-rf", str(store)], check=True)
            cmd = [sys.executable, __file__, "--one", str(store), mode, "--size", str(args.size),
                   "--shard-size", str(args.shard_size), "--vq-preset", args.vq_preset]
            if args.workers is not None:
                cmd += ["--workers", str(args.workers)]
            got = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            got.update(mode=mode, repeat=r, growth_mib_per_1000=round(growth_per_1000(got["rss_mib_per_shard"],
                                                                                      args.shard_size), 2))
            runs.append(got)
            print(f"[soak] {mode:8} run {r}: RSS per shard {got['rss_mib_per_shard']} MiB -> growth "
                  f"{got['growth_mib_per_1000']:+.2f} MiB per 1,000 images after the first shard "
                  f"({got['images']:,} images, {got['seconds']} s)", flush=True)
    worst = max(r["growth_mib_per_1000"] for r in runs if r["mode"] == "arrag")
    print(f"[soak] arrag: worst growth {worst:+.2f} MiB per 1,000 images (target < 5)")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "encode_soak.json").write_text(json.dumps({"settings": vars(args), "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
