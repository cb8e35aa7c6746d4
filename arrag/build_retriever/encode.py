"""`arrag encode`: images -> resize + centre crop -> VQ codes, written as a resumable, sharded code store.

Sources: a folder of images (recursive; captions from same-named .txt files), webdataset tar shards
(a file, a folder of .tar, or a brace pattern), a Hugging Face dataset saved with `save_to_disk`, or a
hub dataset name (needs network). Decoding and resizing run in DataLoader workers; encoding runs in
batches on the GPU when there is one. `--shard i/n`, or the RANK/WORLD_SIZE that `torchrun` and
`accelerate launch` set, split the shards across processes; the last process to finish writes the manifest.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from arrag import fileops
from arrag.errors import ArragError, one_line
from arrag.image_io import IMAGE_SUFFIXES, RESIZE_MODES, ImageRejected, open_rgb, resize_crop, to_rgb, to_tensor
from arrag.provenance import SettingsLock
from arrag.retrieval import codestore

CAPTION_KEYS = ("caption", "text", "txt", "prompt")
IMAGE_KEYS = ("image", "jpg", "jpeg", "png", "webp", "img")


# -- sources -------------------------------------------------------------------------------------------------


class FolderSource:
    """Images under a folder (recursive, sorted); a same-named .txt beside an image is its caption."""

    def __init__(self, root: Path):
        self.root = root
        self.files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ArragError(f"no images (jpg, png, webp) under {root}")

    def __len__(self) -> int:
        return len(self.files)

    def describe(self) -> dict:
        return {"type": "folder", "path": str(self.root), "count": len(self)}

    def get(self, i: int) -> tuple[str, Image.Image, str | None]:
        rel = self.files[i]
        path = self.root / rel
        image = open_rgb(path)
        txt = path.with_suffix(".txt")
        return rel, image, (txt.read_text(encoding="utf-8").strip() if txt.exists() else None)


class TarSource:
    """webdataset shards: members grouped by key (name up to the first dot); image + optional caption."""

    def __init__(self, tars: list[Path]):
        self.tars = tars
        self.items: list[tuple[int, str, str, str | None]] = []  # (tar index, key, image member, caption member)
        for t, path in enumerate(tars):
            groups: dict[str, dict[str, str]] = {}
            try:
                with tarfile.open(path) as tf:
                    for m in tf.getmembers():
                        if m.isfile() and "." in Path(m.name).name:
                            ext = m.name.split("/")[-1].split(".", 1)[1]
                            key = m.name[: len(m.name) - len(ext) - 1]
                            groups.setdefault(key, {})[ext.lower()] = m.name
            except (tarfile.TarError, OSError) as e:
                raise ArragError(f"cannot read webdataset shard {path}: {e}") from None
            for key in sorted(groups):
                g = groups[key]
                img = next((g[e] for e in ("jpg", "jpeg", "png", "webp") if e in g), None)
                if img is not None:
                    self.items.append((t, key, img, next((g[e] for e in CAPTION_KEYS if e in g), None)))
        if not self.items:
            raise ArragError(f"no images in the webdataset shards {', '.join(map(str, tars[:3]))}")
        self._open: dict[int, tarfile.TarFile] = {}

    def __len__(self) -> int:
        return len(self.items)

    def describe(self) -> dict:
        return {"type": "webdataset", "shards": [str(t) for t in self.tars], "count": len(self)}

    def __getstate__(self):  # open tar handles stay per worker process
        return {**self.__dict__, "_open": {}}

    def get(self, i: int) -> tuple[str, Image.Image, str | None]:
        t, key, img, cap = self.items[i]
        tf = self._open.get(t)
        if tf is None:
            tf = self._open[t] = tarfile.open(self.tars[t])
        image = open_rgb(io.BytesIO(tf.extractfile(img).read()))
        caption = None
        if cap is not None:
            raw = tf.extractfile(cap).read().decode("utf-8")
            caption = _caption_from_json(raw) if cap.endswith("json") else raw.strip()
        return f"{self.tars[t].name}/{key}", image, caption


class HFSource:
    """A Hugging Face datasets.Dataset: image column and caption column found by name."""

    def __init__(self, dataset, description: dict):
        self.ds = dataset
        cols = list(dataset.column_names)
        self.image_col = next((c for c in IMAGE_KEYS if c in cols), None)
        if self.image_col is None:
            raise ArragError(f"dataset has no image column (looked for {', '.join(IMAGE_KEYS)}; has {cols})")
        self.caption_col = next((c for c in CAPTION_KEYS if c in cols), None)
        self.description = description

    def __len__(self) -> int:
        return len(self.ds)

    def describe(self) -> dict:
        return {**self.description, "count": len(self), "image_column": self.image_col,
                "caption_column": self.caption_col}

    def get(self, i: int) -> tuple[str, Image.Image, str | None]:
        row = self.ds[i]
        image = row[self.image_col]
        if isinstance(image, Image.Image):
            image = to_rgb(image)
        else:
            image = open_rgb(io.BytesIO(image["bytes"] if isinstance(image, dict) else image))
        caption = row[self.caption_col] if self.caption_col else None
        return str(i), image, (str(caption) if caption is not None else None)


def _caption_from_json(raw: str) -> str | None:
    try:
        d = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return next((str(d[k]) for k in CAPTION_KEYS if k in d), None) if isinstance(d, dict) else None


def _expand_braces(spec: str) -> list[str]:
    """'shard-{000..009}.tar' -> the ten names (webdataset's brace notation)."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if not m:
        return [spec]
    lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
    return [n for i in range(lo, hi + 1) for n in _expand_braces(spec[:m.start()] + f"{i:0{width}d}" + spec[m.end():])]


def open_source(spec: str):
    """A source from a path, a brace pattern of tar shards, or a hub dataset name."""
    path = Path(spec)
    if path.is_dir():
        tars = sorted(path.glob("*.tar"))
        if (path / "dataset_info.json").exists() or (path / "state.json").exists() \
                or (path / "dataset_dict.json").exists():
            return _hf_from_disk(path)
        if tars and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()):
            return TarSource(tars)
        return FolderSource(path)
    if path.suffix == ".tar" or "{" in spec:
        tars = [Path(p) for p in _expand_braces(spec)]
        missing = [str(t) for t in tars if not t.exists()]
        if missing:
            raise ArragError(f"webdataset shard not found: {missing[0]}")
        return TarSource(tars)
    if re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", spec) and not path.exists():
        return _hf_from_hub(spec)
    raise ArragError(f"image source not found: {spec} (a folder of images, .tar shards, a saved HF dataset, "
                     "or a hub dataset name)")


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ArragError("this source needs the 'datasets' package: pip install 'arrag[data]'") from None
    return datasets


def _hf_from_disk(path: Path):
    ds = _datasets().load_from_disk(str(path))
    if hasattr(ds, "keys"):  # a DatasetDict: take 'train' or the first split
        ds = ds["train"] if "train" in ds else ds[next(iter(ds.keys()))]
    return HFSource(ds, {"type": "hf_disk", "path": str(path)})


def _hf_from_hub(name: str):
    datasets = _datasets()
    repo, _, split = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, split=split or "train")
    except Exception as e:
        raise ArragError(f"cannot fetch hub dataset {repo!r} ({one_line(e)}); on a machine without "
                         "network, save it with Dataset.save_to_disk elsewhere and pass that folder") from None
    return HFSource(ds, {"type": "hf_hub", "name": repo, "split": split or "train"})


# -- loading in workers --------------------------------------------------------------------------------------


class _Images(torch.utils.data.Dataset):
    def __init__(self, source, indices: list[int], image_size: int, min_size: int, resize: str):
        self.source, self.indices, self.size, self.min_size, self.resize = source, indices, image_size, min_size, resize

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict:
        i = self.indices[j]
        try:
            ident, image, caption = self.source.get(i)
        except ImageRejected as e:  # absurd sizes are refused from the header, before decoding
            return {"index": i, "id": _safe_id(self.source, i), "array": None, "reason": f"refused: {e}"[:200]}
        except Exception as e:  # unreadable: skipped and counted, never fatal
            return {"index": i, "id": _safe_id(self.source, i), "array": None, "reason": f"unreadable: {e}"[:200]}
        if min(image.size) < self.min_size:
            return {"index": i, "id": ident, "array": None, "reason": f"too small: {image.size[0]}x{image.size[1]}"}
        return {"index": i, "id": ident, "array": np.asarray(resize_crop(image, self.size, self.resize)),
                "caption": caption, "format": _format(self.source, i)}


def _format(source, i: int) -> str:
    """The file format of item i, by its name (folders and tar shards) or 'dataset' (Hugging Face)."""
    if isinstance(source, FolderSource):
        name = source.files[i]
    elif isinstance(source, TarSource):
        name = source.items[i][2]
    else:
        return "dataset"
    suffix = Path(name).suffix.lower().lstrip(".")
    return {"jpeg": "jpg", "tiff": "tif"}.get(suffix, suffix) or "unknown"


def _safe_id(source, i: int) -> str:
    if isinstance(source, FolderSource):
        return source.files[i]
    if isinstance(source, TarSource):
        return f"{source.tars[source.items[i][0]].name}/{source.items[i][1]}"
    return str(i)


def _collate(batch: list[dict]) -> list[dict]:
    return batch


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

    def summary(self) -> str:
        """One line: what was read, what was skipped and why, how many images lack a caption."""
        fmts = ", ".join(f"{n} {f}" for f, n in sorted(self.formats.items())) or "none"
        why = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped_by_reason.items()))
        return (f"encoded {self.encoded} images ({fmts}) into {len(self.shards_written)} new shards; skipped "
                f"{self.skipped}" + (f" ({why})" if why else "") + f"; {self.without_caption} without a caption")


def parse_shard(spec: str | None) -> tuple[int, int]:
    """'i/n' -> (i, n); None -> from RANK/WORLD_SIZE (torchrun, accelerate launch) or (0, 1)."""
    if spec is None:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    m = re.fullmatch(r"(\d+)/(\d+)", spec.strip())
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise ArragError(f"--shard {spec!r}: expected i/n with 0 <= i < n, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


def encode(source: str, out: str | Path, vq_path: str | Path, *, vq_preset: str | None = None,
           image_size: int | None = None,
           batch_size: int = 32, shard_size: int = 4096, num_workers: int | None = None, save_latents: bool = False,
           shard: str | None = None, device: str = "auto", min_size: int = 64, progress: bool = True,
           max_images: int | None = None, resize: str = "original", trust_checkpoint: bool = False) -> EncodeResult:
    """Encode every image of `source` into a code store at `out` (resumable; see the module docstring).

    image_size: the crop size; None takes the tokenizer's (its config's image_size: 384 for VQ-16, the size
    Janus-Pro generates at), so the store's grid matches the models that will use it.
    resize: 'original' (Resize + CenterCrop, as AR-RAG built its database) or 'adm' (LlamaGen's crop).
    num_workers: DataLoader processes decoding images (default: the CPUs available, at most 16).
    """
    from arrag.runtime import available_cpus, bound_heap_growth, kill_with_parent, resolve_device
    from arrag.vq import load_vq

    rank, world = parse_shard(shard)
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
    bound_heap_growth()  # memory flat over millions of images (see runtime.bound_heap_growth)
    num_workers = min(available_cpus(), 16) if num_workers is None else num_workers
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
    src = open_source(source)
    n_total = len(src) if max_images is None else min(len(src), max_images)
    num_shards = math.ceil(n_total / shard_size)
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

    mine = [k for k in range(num_shards) if k % world == rank and not codestore.shard_done(folder, k)]
    result = EncodeResult(folder)
    indices = [i for k in mine for i in range(k * shard_size, min((k + 1) * shard_size, n_total))]
    if indices:
        loader = torch.utils.data.DataLoader(_Images(src, indices, image_size, min_size, resize),
                                             batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                                             persistent_workers=False, worker_init_fn=kill_with_parent)
        bar = tqdm(total=len(indices), desc=f"encode [{rank}/{world}]", unit="img", disable=not progress)
        pending: dict[int, list[dict]] = {}
        for batch in loader:
            good = [b for b in batch if b["array"] is not None]
            if good:
                x = to_tensor(np.stack([b["array"] for b in good])).to(dev)
                with torch.no_grad():
                    codes, lat = vq.encode_to_codes(x, return_latents=True)
                for b, c, la in zip(good, codes.cpu().numpy(), lat.cpu().numpy(), strict=True):
                    b["codes"], b["latents"] = c, la
            for b in batch:
                b.pop("array")
                pending.setdefault(b["index"] // shard_size, []).append(b)
            bar.update(len(batch))
            for k in sorted(pending):
                expected = min((k + 1) * shard_size, n_total) - k * shard_size
                if len(pending[k]) == expected:
                    lock.record()  # the folder now holds results: later runs must match these settings
                    _flush(folder, k, pending.pop(k), grid, save_latents, result)
        bar.close()
    result.complete = codestore.finalize(folder, num_shards, info)
    return result


def _flush(folder: Path, k: int, rows: list[dict], grid: int, save_latents: bool, result: EncodeResult) -> None:
    rows.sort(key=lambda b: b["index"])
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
    codestore.write_shard(folder, k, codes, [b["id"] for b in good], latents, captions, skipped, formats)
    result.encoded += len(good)
    result.skipped += len(skipped)
    result.shards_written.append(k)
    result.without_caption += sum(c is None for c in caps)
    for fmt, n in formats.items():
        result.formats[fmt] = result.formats.get(fmt, 0) + n
    for s in skipped:
        why = s["reason"].split(":")[0]
        result.skipped_by_reason[why] = result.skipped_by_reason.get(why, 0) + 1
