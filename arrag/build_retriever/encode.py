"""`arrag encode`: images -> resize + centre crop -> VQ codes, written as a resumable, sharded code store.

Sources (build_retriever.sources): a folder of images, webdataset tar shards, img2dataset parquet files, a
Hugging Face dataset saved with `save_to_disk`, or a hub dataset streamed. Each source unit (a range of
--shard-size images, one tar, one parquet file, one data shard) becomes one code shard; `--shard i/n`, or the
process group of `torchrun` and `accelerate launch`, give each process whole units, and a rerun skips the units
whose shards are finished. DataLoader workers (the CPUs shared among this machine's processes) read whole
units, decode and resize; a batch never spans two units, so a shard's codes do not depend on the worker or process
count. The encoder runs in batches on the GPU when there is one. Under torchrun, the ranks meet at a monitored
barrier and rank 0 writes the manifest; the processes of a job array wait for nothing, and the one that finds
every shard done writes it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from arrag import fileops
from arrag.build_retriever.sources import SourceError, Unit, decode, local_workers, open_sources
from arrag.distributed import DEFAULT_TIMEOUT, join
from arrag.errors import ArragError
from arrag.image_io import RESIZE_MODES, ImageRejected, psnr, resize_crop, to_tensor, to_uint8
from arrag.provenance import SettingsLock
from arrag.retrieval import codestore

# decode(encode(x)) is measured on each shard's first images: a function of the store alone (a resumed or
# several-process run records the same), and ~0.2% of encoding's work at 4096 images a shard.
ROUND_TRIP_PER_SHARD = 8
POOR_ROUND_TRIP_DB = 20.0  # below this mean PSNR a tokenizer does not represent the images: a warning


# -- reading in workers ----------------------------------------------------------------------------------------


class _Units(torch.utils.data.IterableDataset):
    """This process's units as messages {"shard", "rows", "end"} of at most `batch` decoded-and-resized rows (never
    two units' rows in one message), or {"shard", "fatal"}. A streamed unit (a tar, a parquet file) is read whole
    by one DataLoader worker, which says when it ends; the batches of a range unit are shared among the workers."""

    def __init__(self, source, units: list[Unit], image_size: int, min_size: int, resize: str, batch: int):
        self.source, self.units = source, units
        self.image_size, self.min_size, self.resize, self.batch = image_size, min_size, resize, batch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        b = 0
        for j, unit in enumerate(self.units):
            if unit.stop:  # a range: batch b of all of them goes to worker b mod nw
                for s in range(unit.start, unit.stop, self.batch):
                    if b % nw == wid:
                        part = dataclasses.replace(unit, start=s, stop=min(s + self.batch, unit.stop))
                        try:
                            items = enumerate(self.source.read(part), start=s - unit.start)
                            rows = [self._row(p, item) for p, item in items]
                        except SourceError as e:
                            yield {"shard": unit.index, "fatal": str(e)}
                            return
                        yield {"shard": unit.index, "rows": rows, "end": False}
                    b += 1
                continue
            if j % nw != wid:
                continue
            rows = []
            try:
                for pos, item in enumerate(self.source.read(unit)):
                    rows.append(self._row(pos, item))
                    if len(rows) == self.batch:
                        yield {"shard": unit.index, "rows": rows, "end": False}
                        rows = []
            except SourceError as e:
                yield {"shard": unit.index, "fatal": str(e)}
                return
            yield {"shard": unit.index, "rows": rows, "end": True}

    def _row(self, pos: int, item) -> dict:
        row = {"pos": pos, "id": item.key, "array": None, "caption": item.caption, "caption_error": item.caption_error,
               "format": item.fmt}
        try:
            image = decode(item)
        except ImageRejected as e:  # absurd sizes are refused from the header, before decoding
            return {**row, "reason": f"refused: {e}"[:200]}
        except Exception as e:  # bytes that are not a decodable image: skipped and counted, never fatal
            why = re.sub(r" ?<[^<>]* at 0x[0-9a-f]+>", "", str(e))  # PIL names the in-memory file by its address
            return {**row, "reason": f"unreadable: {why}"[:200]}
        if min(image.size) < self.min_size:
            return {**row, "reason": f"too small: {image.size[0]}x{image.size[1]}"}
        return {**row, "array": np.asarray(resize_crop(image, self.image_size, self.resize))}


# -- the job -------------------------------------------------------------------------------------------------


@dataclass
class EncodeResult:
    folder: Path
    encoded: int = 0
    skipped: int = 0
    shards_written: list[int] = field(default_factory=list)
    complete: bool = False
    formats: dict = field(default_factory=dict)            # images read, by file format
    skipped_by_reason: dict = field(default_factory=dict)  # unreadable, too small, refused
    without_caption: int = 0
    caption_undecodable: int = 0                           # images kept whose caption file was not text
    round_trip_psnr: list = field(default_factory=list)    # dB of decode(encode(x)), first images of each shard

    def summary(self) -> str:
        """One line: what was read, what was skipped and why, how many images lack a caption."""
        fmts = ", ".join(f"{n} {f}" for f, n in sorted(self.formats.items())) or "none"
        why = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped_by_reason.items()))
        bad = f" ({self.caption_undecodable} of them not UTF-8)" if self.caption_undecodable else ""
        trip = (f"; the tokenizer's round trip {np.mean(self.round_trip_psnr):.1f} dB PSNR on "
                f"{len(self.round_trip_psnr)} of them" if self.round_trip_psnr else "")
        return (f"encoded {self.encoded} images ({fmts}) into {len(self.shards_written)} new shards; skipped "
                f"{self.skipped}" + (f" ({why})" if why else "") + f"; {self.without_caption} without a caption{bad}"
                + trip)


def encode(source: str | list[str], out: str | Path, vq_path: str | Path, *, vq_preset: str | None = None,
           image_size: int | None = None,
           batch_size: int = 32, shard_size: int = 4096, num_workers: int | None = None, save_latents: bool = False,
           shard: str | None = None, device: str = "auto", min_size: int = 64, progress: bool = True,
           max_images: int | None = None, resize: str = "original", trust_checkpoint: bool = False,
           dist_timeout: float = DEFAULT_TIMEOUT) -> EncodeResult:
    """Encode every image of `source` (one, or a list of several: their units numbered one after the other) into a
    code store at `out` (resumable; see the module docstring).

    image_size: the crop size; None takes the tokenizer's (its config's image_size: 384 for VQ-16, the size
    Janus-Pro generates at), so the store's grid matches the models that will use it.
    resize: 'original' (Resize + CenterCrop, as AR-RAG built its database) or 'adm' (LlamaGen's crop).
    num_workers: DataLoader processes decoding images (default: this machine's CPUs shared among its processes,
    LOCAL_WORLD_SIZE, at most 16 each).
    """
    from arrag.runtime import available_cpus, kill_with_parent, resolve_device
    from arrag.vq import load_vq

    for flag, value, low in (("--batch-size", batch_size, 1), ("--shard-size", shard_size, 1),
                             ("--image-size", image_size or 1, 1), ("--min-size", min_size, 0)):
        if value < low:
            raise ArragError(f"{flag} must be >= {low}, got {value}")
    if num_workers is not None and num_workers < 0:
        raise ArragError(f"--workers must be >= 0, got {num_workers}")
    if max_images is not None and max_images < 1:
        raise ArragError(f"--max-images must be >= 1, got {max_images}")
    if resize not in RESIZE_MODES:
        raise ArragError(f"--resize {resize!r}: choose {' or '.join(RESIZE_MODES)}")
    fileops.check_out_dir(out, what="code store", is_ours=codestore.is_store_folder(out))  # before any loading
    group, rank, world = join(shard, dist_timeout)
    num_workers = local_workers(num_workers, available_cpus())
    src = open_sources(source, shard_size)
    if max_images is not None:
        if not hasattr(src, "limit"):
            raise ArragError("--max-images needs a source of known length (a folder or a saved dataset); pass fewer "
                             "tar or parquet shards instead")
        src.limit = max_images
    units = src.units()
    if device == "auto" and world > 1 and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    dev = resolve_device(device)
    vq = load_vq(vq_path, preset=vq_preset, device=dev, trust_checkpoint=trust_checkpoint)
    if image_size is None:
        image_size = vq.config.image_size
    elif image_size != vq.config.image_size:
        warnings.warn(f"--image-size {image_size} differs from the {vq.config.image_size} px this tokenizer's models "
                      f"generate at: the store's {image_size // vq.downsample}x{image_size // vq.downsample} grid "
                      "will only serve models run at that size", stacklevel=2)
    grid = vq.grid_size(image_size)
    num_shards = len(units)
    folder = Path(out)
    info = {"vq_fingerprint": vq.fingerprint(), "vq_path": str(vq_path), "vq_config": vq.config.__dict__,
            "image_size": image_size, "resize": resize, "grid": [grid, grid], "shard_size": shard_size,
            "num_shards": num_shards, "source": src.describe(), "save_latents": save_latents, "min_size": min_size,
            "max_images": max_images}
    lock = SettingsLock(folder / "encode.json", info, what="encoded shards", ignore=("vq_path",),
                        has_results=lambda: any(folder.glob("shard-*.json")),
                        start_over=f"choose a new --out (or delete {folder} to start over)", kind="encode")
    lock.check()
    folder.mkdir(parents=True, exist_ok=True)
    fileops.sweep_stale_temps(folder)
    lock.record()  # first: the folder is marked as a store being encoded before anything else is written there
    # The manifest records the codebook's hash (not the lock: it follows from the VQ fingerprint).
    info["codebook_sha256"] = codestore.write_codebook(folder, vq.quantize.codebook().detach().cpu().numpy())

    mine = [u for u in units if u.index % world == rank and not codestore.shard_done(folder, u.index)]
    result = EncodeResult(folder)
    if mine:
        known = [u.stop - u.start for u in mine] if all(u.stop for u in mine) else None
        workers = num_workers if known else min(num_workers, len(mine))  # a streamed unit is read by one worker
        loader = torch.utils.data.DataLoader(_Units(src, mine, image_size, min_size, resize, batch_size),
                                             batch_size=None, num_workers=workers, collate_fn=_as_is,
                                             persistent_workers=False, worker_init_fn=kill_with_parent)
        with tqdm(total=sum(known) if known else None, desc=f"encode [{rank}/{world}]", unit="img",
                  disable=not progress) as bar:
            _encode_stream(loader, mine, vq, dev, lock, bar, grid, save_latents, result)
    if result.round_trip_psnr and np.mean(result.round_trip_psnr) < POOR_ROUND_TRIP_DB:
        warnings.warn(f"the tokenizer reconstructs these images poorly ({np.mean(result.round_trip_psnr):.1f} dB PSNR "
                      f"on {len(result.round_trip_psnr)} of them): their codes will not look like them, and neither "
                      "will a database built from them; use a tokenizer trained on such images (LlamaGen's "
                      "vq_ds16_t2i.pt for photographs; the demo's knows only ShapesWorld)", stacklevel=2)
    if group is None:  # a job array's process, or the only one: the manifest once every shard is done
        empty = codestore.empty_source_error(folder, num_shards, info["source"])
        if empty:
            raise ArragError(empty)
        result.complete = codestore.finalize(folder, num_shards, info)
        return result
    group.barrier("encode: every rank's shards")
    empty = group.broadcast(codestore.empty_source_error(folder, num_shards, info["source"]) if rank == 0 else None)
    if empty:
        raise ArragError(empty)
    result.complete = group.broadcast(codestore.finalize(folder, num_shards, info) if rank == 0 else None)
    return result


def _as_is(message: dict) -> dict:
    """The DataLoader's collate: messages pass as they are (its default would turn NumPy arrays into tensors)."""
    return message


def _encode_stream(loader, units: list[Unit], vq, dev, lock: SettingsLock, bar, grid: int, save_latents: bool,
                   result: EncodeResult) -> None:
    """Encode the loader's rows in its batches and write each unit's shard once all its rows are in (a range
    unit's count is known; a streamed unit's worker says when it ends)."""
    from arrag.runtime import trim_heap

    expected = {u.index: u.stop - u.start for u in units if u.stop}
    pending: dict[int, list[dict]] = {}
    for msg in loader:
        if "fatal" in msg:
            raise ArragError(msg["fatal"])
        rows = msg["rows"]
        good = [b for b in rows if b["array"] is not None]
        if good:
            x = to_tensor(np.stack([b["array"] for b in good])).to(dev)
            with torch.no_grad():
                codes, lat = vq.encode_to_codes(x, return_latents=True)
                first = [i for i, b in enumerate(good) if b["pos"] < ROUND_TRIP_PER_SHARD]
                if first:  # how well the tokenizer represents these images, on each shard's first few
                    rec = to_uint8(vq.decode_codes(codes[first]))
                    trip = psnr(rec, np.stack([good[i]["array"] for i in first])).tolist()
                    result.round_trip_psnr += trip
                    for i, db in zip(first, trip, strict=True):
                        good[i]["round_trip_psnr"] = db
            del x
            trim_heap()  # memory flat over millions of images (see runtime.trim_heap)
            for b, c, la in zip(good, codes.cpu().numpy(), lat.cpu().numpy(), strict=True):
                b["codes"], b["latents"] = c, la
        for b in rows:
            b.pop("array")
        k = msg["shard"]
        pending.setdefault(k, []).extend(rows)
        bar.update(len(rows))
        if msg["end"] or len(pending[k]) == expected.get(k):
            lock.record()  # the folder now holds results: later runs must match these settings
            _flush(result.folder, k, pending.pop(k), grid, save_latents, result)


def _flush(folder: Path, k: int, rows: list[dict], grid: int, save_latents: bool, result: EncodeResult) -> None:
    rows.sort(key=lambda b: b["pos"])
    good = [b for b in rows if "codes" in b]
    skipped = [{"id": b["id"], "reason": b["reason"]} for b in rows if "codes" not in b]
    codes = np.stack([b["codes"] for b in good]) if good else np.zeros((0, grid, grid), np.uint16)
    latents = None
    if save_latents:
        latents = np.stack([b["latents"] for b in good]) if good else np.zeros((0, grid, grid, 8), np.float16)
    caps = [b.get("caption") for b in good]
    formats: dict = {}
    for b in good:
        formats[b["format"]] = formats.get(b["format"], 0) + 1
    # Captions are kept per image: a missing one is null, and does not drop the others.
    captions = caps
    undecodable = [{"id": b["id"], "reason": b["caption_error"]} for b in good if b.get("caption_error")]
    trip = [b["round_trip_psnr"] for b in good if "round_trip_psnr" in b]
    codestore.write_shard(folder, k, codes, [b["id"] for b in good], latents, captions, skipped, formats,
                          caption_errors=undecodable, round_trip_psnr=trip)
    result.encoded += len(good)
    result.skipped += len(skipped)
    result.shards_written.append(k)
    result.without_caption += sum(c is None for c in caps)
    result.caption_undecodable += len(undecodable)
    for fmt, n in formats.items():
        result.formats[fmt] = result.formats.get(fmt, 0) + n
    for s in skipped:
        why = s["reason"].split(":")[0]
        result.skipped_by_reason[why] = result.skipped_by_reason.get(why, 0) + 1
