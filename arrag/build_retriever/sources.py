"""Image sources for `arrag encode`, behind one interface: units (what becomes one code shard) read as streams.

  folder     images under a folder (recursive, sorted; a same-named .txt is the caption); units: ranges of
             --shard-size images
  webdataset .tar shards (a file, a folder of .tar, or a brace pattern); one unit per tar, streamed member by
             member (tarfile's stream mode), opened once and closed; the members of a sample (same key, the name up
             to the first dot) follow each other, as webdataset writes them
  parquet    img2dataset's parquet output (an image bytes column such as `jpg`, a caption column such as `txt`);
             one unit per file, read a row group at a time with pyarrow
  hf_disk    a Hugging Face dataset saved with save_to_disk; units: ranges of --shard-size rows
  hf_stream  a Hugging Face hub dataset streamed (`streaming=True`); one unit per data shard of the dataset, the
             way `datasets.distributed.split_dataset_by_node` gives ranks whole shards

Listing the units reads no image (time to the first encoded batch does not grow with the number of tars), a rank
takes whole units, and a finished unit is a finished code shard, so a rerun resumes by unit. Reading a unit yields
Items with the image's encoded bytes (or a decoded image, from datasets): decoding happens later, so bytes that
are not a decodable image are skipped and counted by the caller, while an OSError reading the source itself (no
file handles left, an I/O error, a file that vanished) is a SourceError: fatal, one line naming the file.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from arrag.errors import ArragError, one_line
from arrag.image_io import IMAGE_SUFFIXES

CAPTION_KEYS = ("caption", "text", "txt", "prompt")
IMAGE_KEYS = ("image", "jpg", "jpeg", "png", "webp", "img")
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


class SourceError(ArragError):
    """Reading the source itself failed (not an image that cannot be decoded): the run stops."""


@dataclass(frozen=True)
class Unit:
    """What becomes code shard `index`: a range of items of a random-access source, or one file of a streamed one."""

    index: int
    label: str
    start: int = 0
    stop: int = 0
    path: str = ""  # a file's path or URL (streamed units)
    source: int = 0  # which of several sources (MultiSource) the unit belongs to
    local: int = 0  # the unit's index within that source


class Item(NamedTuple):
    """One source item: its id, its encoded bytes (or an already decoded image), its caption (None if it has none;
    `caption_error` says why when a caption exists but could not be read as text) and its file format."""

    key: str
    data: bytes | None
    image: Image.Image | None
    caption: str | None
    caption_error: str | None
    fmt: str


def _fmt(name: str) -> str:
    suffix = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return {"jpeg": "jpg", "tiff": "tif"}.get(suffix, suffix) or "unknown"


def _text(raw: bytes) -> tuple[str | None, str | None]:
    """(caption, error) from a caption file's bytes: UTF-8 text, stripped; undecodable bytes keep the image."""
    try:
        return raw.decode("utf-8").strip(), None
    except UnicodeDecodeError as e:
        return None, f"caption is not UTF-8 ({e.reason} at byte {e.start})"


def _caption_from_json(raw: bytes) -> tuple[str | None, str | None]:
    text, err = _text(raw)
    if text is None:
        return None, err
    try:
        d = json.loads(text)
    except json.JSONDecodeError:
        return None, "caption .json is not JSON"
    return (next((str(d[k]) for k in CAPTION_KEYS if k in d), None), None) if isinstance(d, dict) else (None, None)


def _read_error(path, e: BaseException) -> SourceError:
    return SourceError(f"cannot read {path} ({one_line(e, 160)}); fix the file or the machine (for 'too many open "
                       "files' raise `ulimit -n`) and rerun: finished shards are kept")


# -- random-access sources: units are ranges -------------------------------------------------------------------


class _RangeSource:
    """A source with a known length whose units are ranges of `shard_size` items."""

    def __init__(self, shard_size: int):
        self.shard_size = shard_size
        self.limit: int | None = None  # --max-images

    def __len__(self) -> int:
        raise NotImplementedError

    def units(self) -> list[Unit]:
        n = len(self) if self.limit is None else min(len(self), self.limit)
        return [Unit(k, f"items {s}-{min(s + self.shard_size, n) - 1}", s, min(s + self.shard_size, n))
                for k, s in enumerate(range(0, n, self.shard_size))]

    def read(self, unit: Unit) -> Iterator[Item]:
        for i in range(unit.start, unit.stop):
            yield self.item(i)

    def item(self, i: int) -> Item:
        raise NotImplementedError


class FolderSource(_RangeSource):
    """Images under a folder (recursive, sorted); a same-named .txt beside an image is its caption. The file list
    is one NumPy array of byte strings, not a Python object per image."""

    def __init__(self, root: Path, shard_size: int):
        super().__init__(shard_size)
        self.root = root
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not names:
            raise ArragError(f"no images (jpg, png, webp) under {root}")
        self.files = np.array([n.encode("utf-8", "surrogateescape") for n in names])

    def __len__(self) -> int:
        return len(self.files)

    def describe(self) -> dict:
        return {"type": "folder", "path": str(self.root), "count": len(self)}

    def item(self, i: int) -> Item:
        rel = self.files[i].decode("utf-8", "surrogateescape")
        path = self.root / rel
        try:
            data = path.read_bytes()
            txt = path.with_suffix(".txt")
            caption, error = _text(txt.read_bytes()) if txt.exists() else (None, None)
        except OSError as e:
            raise _read_error(path, e) from None
        return Item(rel, data, None, caption, error, _fmt(rel))


class HFDiskSource(_RangeSource):
    """A Hugging Face datasets.Dataset (saved with save_to_disk): image and caption columns found by name."""

    def __init__(self, dataset, description: dict, shard_size: int):
        super().__init__(shard_size)
        self.ds = dataset
        self.image_col, self.caption_col = _columns(list(dataset.column_names))
        self.description = description

    def __len__(self) -> int:
        return len(self.ds)

    def describe(self) -> dict:
        return {**self.description, "count": len(self), "image_column": self.image_col,
                "caption_column": self.caption_col}

    def item(self, i: int) -> Item:
        return _row_item(str(i), self.ds[i], self.image_col, self.caption_col)


def _columns(cols: list[str]) -> tuple[str, str | None]:
    image = next((c for c in IMAGE_KEYS if c in cols), None)
    if image is None:
        raise ArragError(f"dataset has no image column (looked for {', '.join(IMAGE_KEYS)}; has {cols})")
    return image, next((c for c in CAPTION_KEYS if c in cols), None)


def _row_item(key: str, row: dict, image_col: str, caption_col: str | None) -> Item:
    """A dataset or parquet row: the image as a PIL image, a {'bytes': ...} struct or raw bytes."""
    value = row[image_col]
    image = value if isinstance(value, Image.Image) else None
    data = None if image is not None else (value.get("bytes") if isinstance(value, dict) else value)
    caption = row.get(caption_col) if caption_col else None
    fmt = image_col if image_col in ("jpg", "jpeg", "png", "webp") else "dataset"
    return Item(key, data, image, None if caption is None else str(caption), None, _fmt("x." + fmt))


# -- streamed sources: one unit per file -----------------------------------------------------------------------


def is_url(spec: str) -> bool:
    """A remote or piped location (http(s)://, s3:// and the like, or a `pipe:` command), not a local path."""
    return spec.startswith("pipe:") or "://" in spec


class TarSource:
    """webdataset shards, one unit each, streamed: each tar (a path, an http(s):// URL or a `pipe:` command) is
    opened once through webdataset's gopen, read front to back with its tar iterator, and closed."""

    def __init__(self, tars: list):
        self.tars = [str(t) for t in tars]

    def describe(self) -> dict:
        return {"type": "webdataset", "shards": self.tars, "count": None}

    def units(self) -> list[Unit]:
        return [Unit(k, t, path=t, local=k) for k, t in enumerate(self.tars)]

    def read(self, unit: Unit) -> Iterator[Item]:
        import webdataset as wds
        from webdataset.tariterators import tar_file_iterator

        where = unit.path
        sample: dict[str, bytes] = {}
        key = None
        stream = None
        try:
            stream = wds.gopen(where, "rb")
            for member in tar_file_iterator(stream, skip_meta=None):
                name = member["fname"].split("/")[-1]
                if "." not in name:
                    continue
                ext = name.split(".", 1)[1].lower()
                this = member["fname"][: len(member["fname"]) - len(ext) - 1]
                if this != key:
                    if sample:
                        yield self._item(where, key, sample)
                    sample, key = {}, this
                if ext in TAR_IMAGE_EXTS or ext in CAPTION_KEYS or ext == "json":
                    sample[ext] = member["data"]
            if sample:
                yield self._item(where, key, sample)
            stream.close()  # a pipe's command that failed says so here
            stream = None
        except (OSError, tarfile.TarError, EOFError, ValueError) as e:
            raise _read_error(where, e) from None
        finally:
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass

    @staticmethod
    def _item(where: str, key: str, sample: dict[str, bytes]) -> Item:
        image_ext = next((e for e in TAR_IMAGE_EXTS if e in sample), None)
        caption, error = None, None
        text_ext = next((e for e in CAPTION_KEYS if e in sample), None)
        if text_ext is not None:
            caption, error = _text(sample[text_ext])
        elif "json" in sample:
            caption, error = _caption_from_json(sample["json"])
        data = sample[image_ext] if image_ext else None
        name = where.rstrip("/").split("/")[-1].split()[-1]  # a file's name, also of a URL or a pipe's last word
        return Item(f"{name}/{key}", data, None, caption, error, _fmt("x." + (image_ext or "none")))


class ParquetSource:
    """img2dataset parquet files (image bytes + caption columns), one unit each, read a row group at a time."""

    def __init__(self, files: list):
        self.files = [str(f) for f in files]
        cols = self._columns_of(self.files[0])
        try:
            self.image_col, self.caption_col = _columns(cols)
        except ArragError as e:
            raise SourceError(f"{files[0]}: {e}") from None
        self.key_col = "key" if "key" in cols else None

    @staticmethod
    def _open(where: str):
        """A local parquet file as it is; a URL opened through fsspec (http(s):// needs fsspec[http])."""
        if not is_url(where):
            return where
        try:
            import fsspec
        except ImportError:
            raise ArragError("parquet over URLs needs fsspec: pip install 'arrag[data]'") from None
        try:
            return fsspec.open(where, "rb").open()
        except ImportError as e:
            raise ArragError(f"{where}: {one_line(e)}; pip install 'arrag[data]'") from None

    @classmethod
    def _columns_of(cls, where: str) -> list[str]:
        """The column names of a parquet file (its footer only); a file that is not whole parquet is one line."""
        pq = _pyarrow()
        try:
            return list(pq.read_schema(cls._open(where)).names)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid (no footer: truncated) is a ValueError
            raise _read_error(where, e) from None

    def describe(self) -> dict:
        return {"type": "parquet", "files": self.files, "count": None,
                "image_column": self.image_col, "caption_column": self.caption_col}

    def units(self) -> list[Unit]:
        return [Unit(k, f, path=f, local=k) for k, f in enumerate(self.files)]

    def read(self, unit: Unit) -> Iterator[Item]:
        pq = _pyarrow()
        path = unit.path
        columns = [c for c in (self.image_col, self.caption_col, self.key_col) if c]
        has = self._columns_of(path)  # every file of the set must have the columns the first one gave
        lacking = [c for c in columns if c not in has]
        if lacking:
            raise SourceError(f"{path} has no {', '.join(map(repr, lacking))} column (it has {', '.join(has)}), "
                              f"which {self.files[0].split('/')[-1]} gave this source; pass parquet files of one "
                              "layout")
        row = 0
        name = path.rstrip("/").split("/")[-1]
        try:
            with pq.ParquetFile(self._open(path)) as f:
                for batch in f.iter_batches(batch_size=256, columns=columns):
                    for record in batch.to_pylist():
                        key = str(record[self.key_col]) if self.key_col else f"{name}/{row}"
                        yield _row_item(key, record, self.image_col, self.caption_col)
                        row += 1
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid/ArrowIOError are ValueError/OSError
            raise _read_error(path, e) from None


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ArragError("parquet sources need pyarrow: pip install 'arrag[data]'") from None
    return pq


class HFStreamSource:
    """A streamed Hugging Face dataset (datasets.IterableDataset): one unit per data shard of the dataset, read
    with `IterableDataset.shard`, so ranks take whole shards as `split_dataset_by_node` gives them."""

    def __init__(self, dataset, description: dict):
        self.ds = dataset
        self.image_col, self.caption_col = _columns(list(dataset.column_names or dataset.features or []))
        self.description = description

    def describe(self) -> dict:
        return {**self.description, "count": None, "data_shards": self.ds.n_shards, "image_column": self.image_col,
                "caption_column": self.caption_col}

    def units(self) -> list[Unit]:
        return [Unit(k, f"{self.description.get('name', 'dataset')} shard {k}") for k in range(self.ds.n_shards)]

    def read(self, unit: Unit) -> Iterator[Item]:
        part = self.ds.shard(num_shards=self.ds.n_shards, index=unit.index)
        try:
            for row, record in enumerate(part):
                yield _row_item(f"{unit.index}/{row}", record, self.image_col, self.caption_col)
        except OSError as e:
            raise _read_error(unit.label, e) from None


# -- opening a source from the command line --------------------------------------------------------------------


def _expand_braces(spec: str) -> list[str]:
    """'shard-{000..009}.tar' -> the ten names; 'a-{x,y}.tar' too (webdataset's notation, by braceexpand)."""
    try:
        from braceexpand import braceexpand
    except ImportError:  # without the data extra: numeric ranges only
        m = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
        if not m:
            return [spec]
        lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
        return [n for i in range(lo, hi + 1)
                for n in _expand_braces(spec[:m.start()] + f"{i:0{width}d}" + spec[m.end():])]
    return list(braceexpand(spec))


def open_sources(specs: str | list[str], shard_size: int = 4096):
    """One source (open_source) or, for several, a MultiSource over them in the order given."""
    if isinstance(specs, (str, Path)):
        return open_source(str(specs), shard_size)
    if not specs:
        raise ArragError("no image source given")
    sources = [open_source(str(s), shard_size) for s in specs]
    return sources[0] if len(sources) == 1 else MultiSource(sources)


class MultiSource:
    """Several sources encoded into one store: their units numbered one after the other (resume and --shard i/n
    work over the union), each read by its own source; the manifest lists each source with its image count."""

    def __init__(self, sources: list):
        self.sources = sources
        self._units: list[Unit] = []
        for i, src in enumerate(sources):
            for u in src.units():
                self._units.append(dataclasses.replace(u, index=len(self._units), source=i, local=u.index))

    def units(self) -> list[Unit]:
        return list(self._units)

    def describe(self) -> dict:
        out, first = [], 0
        for i, src in enumerate(self.sources):
            n = sum(1 for u in self._units if u.source == i)
            out.append({**src.describe(), "units": [first, first + n]})
            first += n
        counts = [d.get("count") for d in out]
        return {"type": "multi", "sources": out, "count": sum(counts) if None not in counts else None}

    def read(self, unit: Unit) -> Iterator[Item]:
        return self.sources[unit.source].read(dataclasses.replace(unit, index=unit.local))


def open_source(spec: str, shard_size: int = 4096):
    """A source from a folder (images, .tar shards, .parquet files or a saved dataset), a file or brace pattern of
    tar or parquet shards, or a hub dataset name (streamed; needs network)."""
    if is_url(spec):  # remote shards (webdataset's gopen: http(s)://, pipe:..., s3 through pipe:) or parquet URLs
        urls = _expand_braces(spec)
        if all(".tar" in u for u in urls):
            return TarSource(urls)
        if all(".parquet" in u for u in urls):
            return ParquetSource(urls)
        raise ArragError(f"image source {spec}: a URL or pipe: source must name .tar or .parquet shards")
    path = Path(spec)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists() \
                or (path / "dataset_dict.json").exists():
            return _hf_from_disk(path, shard_size)
        return _folder_source(path, shard_size)
    for suffix, cls in ((".tar", TarSource), (".parquet", ParquetSource)):
        if path.suffix == suffix or (suffix in spec and "{" in spec):
            files = _expand_braces(spec)
            missing = [f for f in files if not Path(f).exists()]
            if missing:
                raise ArragError(f"{'webdataset' if suffix == '.tar' else 'parquet'} shard not found: {missing[0]}")
            return cls(files)
    if re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", spec) and not path.exists():
        return _hf_stream(spec)
    raise ArragError(f"image source not found: {spec} (a folder of images, .tar or .parquet shards, a saved HF "
                     "dataset, or a hub dataset name)")


def _folder_source(path: Path, shard_size: int):
    """The one kind of source a folder holds: images (anywhere under it), .tar shards or .parquet files. A folder
    with more than one kind is refused, naming what one source would leave out: nothing is dropped unsaid."""
    images = tars = parquets = 0
    for p in path.rglob("*"):
        suffix = p.suffix.lower()
        images += suffix in IMAGE_SUFFIXES
        tars += suffix == ".tar" and p.parent == path
        parquets += suffix == ".parquet" and p.parent == path
    kinds = [f"{n:,} {what}" for n, what in ((images, "images"), (tars, ".tar shards"), (parquets, ".parquet files"))
             if n]
    if len(kinds) > 1:
        raise ArragError(f"{path} holds {' and '.join(kinds)}: a source is one kind, and encoding one would leave "
                         "the others out; move each kind into a folder of its own (a brace pattern such as "
                         "shard-{000..009}.tar names tar or parquet shards directly)")
    if tars:
        return TarSource(sorted(path.glob("*.tar")))
    if parquets:
        return ParquetSource(sorted(path.glob("*.parquet")))
    return FolderSource(path, shard_size)


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ArragError("this source needs the 'datasets' package: pip install 'arrag[data]'") from None
    return datasets


def _hf_from_disk(path: Path, shard_size: int) -> HFDiskSource:
    ds = _datasets().load_from_disk(str(path))
    if hasattr(ds, "keys"):  # a DatasetDict: take 'train' or the first split
        ds = ds["train"] if "train" in ds else ds[next(iter(ds.keys()))]
    return HFDiskSource(ds, {"type": "hf_disk", "path": str(path)}, shard_size)


def _hf_stream(name: str) -> HFStreamSource:
    datasets = _datasets()
    repo, _, split = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, split=split or "train", streaming=True)
    except Exception as e:
        raise ArragError(f"cannot stream hub dataset {repo!r} ({one_line(e)}); on a machine without network, save "
                         "it as parquet or with Dataset.save_to_disk elsewhere and pass that folder") from None
    return HFStreamSource(ds, {"type": "hf_stream", "name": repo, "split": split or "train"})


def decode(item: Item) -> Image.Image:
    """The item's image as RGB (from its bytes, or the decoded image a dataset gave); raises what PIL raises for
    bytes that are not a decodable image, and ImageRejected for absurd sizes."""
    from arrag.image_io import open_rgb, to_rgb

    if item.image is not None:
        return to_rgb(item.image)
    if item.data is None:
        raise ValueError("no image in this sample")
    return open_rgb(io.BytesIO(item.data))


def local_workers(requested: int | None, cpus: int) -> int:
    """DataLoader workers for this process: the CPUs divided among the processes of this machine (LOCAL_WORLD_SIZE,
    set by torchrun and accelerate), at most 16, unless given."""
    if requested is not None:
        return requested
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(1, min(cpus // local, 16))
