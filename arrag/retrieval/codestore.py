"""The code store: encoded images on disk, in shards, with a manifest.

Layout of a store folder:
  manifest.json          written last, once every shard is done (format, VQ fingerprint, codebook hash, sizes,
                         shards)
  codebook.npy           the VQ's normalised codebook [K, e] float32 (keys are built from it); its hash is in the
                         manifest and opening the store checks it, so codes and codebook cannot part
  codes-00000.npy        uint16 [n, h, w] code grids of shard 0
  latents-00000.npy      float16 [n, h, w, e] normalised pre-quantisation latents (optional)
  captions-00000.jsonl   one JSON string per image (optional)
  caption-offsets-00000.npy  int64 [n + 1]: where each caption's line starts in the .jsonl (written with it, or
                         built once on first use), so one caption is read without reading the others
  shard-00000.json       shard metadata (count, image ids, skipped items); its presence marks the shard done
Every file is written to a temporary name and renamed, so an interrupted run leaves only whole shards.

Random access (a training sample: one image's codes, its retrieved candidates, its caption) finds the shard by
binary search and reads the rows with pread through a pool of open files (RowReader), so a sample costs
the same with 30 or 3,000 shards and under the usual limit of 1,024 open files, and nothing per image is held in
Python objects.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from arrag import fileops
from arrag.errors import ArragError, one_line
from arrag.fileops import save_npy, write_text
from arrag.provenance import made_by, read_json_dict

STORE_FORMAT = "arrag-codestore/1"


# Every file a code store folder may hold (encode, construct-train): the only files arrag removes from one.
STORE_FILES = (r"manifest\.json", r"encode\.json", r"codebook\.npy", r"codes-\d{5}\.npy", r"latents-\d{5}\.npy",
               r"captions-\d{5}\.jsonl", r"caption-offsets-\d{5}\.npy", r"shard-\d{5}\.json",
               r"retrieved-\d{5}\.npy", r"retrieved\.json")


def caption_offsets(data: bytes | np.ndarray) -> np.ndarray:
    """int64 [lines + 1]: the start of every line of a .jsonl's bytes, then its length (one JSON value a line)."""
    raw = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else np.asarray(data)
    ends = np.flatnonzero(raw == ord("\n")) + 1
    return np.concatenate([[0], ends]).astype(np.int64)


POPULATE_BYTES = 1 << 20
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


class MapCache:
    """Memory maps kept open for random access, the least recently used dropped first. A map holds a file
    descriptor, so the capacity follows this process's open-file budget (runtime.open_file_budget)."""

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self._maps: OrderedDict = OrderedDict()

    def get(self, key, load):
        arr = self._maps.get(key)
        if arr is not None:
            self._maps.move_to_end(key)
            return arr
        if self.capacity is None:
            from arrag.runtime import open_file_budget

            self.capacity = open_file_budget()
        arr = self._maps[key] = load()
        mm = getattr(arr, "_mmap", None)  # a np.memmap's mapping
        if mm is not None and hasattr(mm, "madvise"):
            # Random reads of a few KB: without this the kernel reads ahead ~128 KB a fault (10x the I/O and the
            # page cache, measured on a 300k-image training set). A small file (a shard's caption offsets and
            # captions) is mapped in whole now, so the reads that follow never fault.
            mm.madvise(mmap.MADV_RANDOM)
            if len(mm) <= POPULATE_BYTES:
                try:
                    mm.madvise(MADV_POPULATE_READ)
                except OSError:  # kernels before 5.14
                    pass
        while len(self._maps) > self.capacity:
            self._maps.popitem(last=False)
        return arr

    def __len__(self) -> int:
        return len(self._maps)


class RowReader:
    """Rows of .npy files (and byte spans of other files) read with os.pread through a pool of open files, the
    least recently used closed first.

    For random access over thousands of shards (training samples): a memory map holds a file descriptor for as
    long as it lives, so under the usual limit of 1,024 open files a few hundred maps thrashed (every sample
    re-mapped its files: about 10x the cost at 3,000 shards). A pread needs the file open only in the pool, whose
    size follows the open-file budget; a file's .npy header (dtype, shape, where the data starts) is read once and
    kept, a few numbers per file. Files are opened with POSIX_FADV_RANDOM: no read-ahead for reads of a few KB."""

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self._fds: OrderedDict = OrderedDict()
        self._headers: dict = {}

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is not None:
            self._fds.move_to_end(path)
            return fd
        if self.capacity is None:
            from arrag.runtime import open_file_budget

            self.capacity = open_file_budget()
        while len(self._fds) >= self.capacity:
            os.close(self._fds.popitem(last=False)[1])
        fd = os.open(path, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        self._fds[path] = fd
        return fd

    def header(self, path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
        """(dtype, shape, data offset) of a C-ordered .npy file, read once."""
        got = self._headers.get(path)
        if got is None:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(f)
                if fortran or dtype.hasobject:
                    raise ValueError("not a C-ordered array of plain values")
                got = self._headers[path] = (dtype, shape, f.tell())
        return got

    def rows(self, path: Path, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` (ints, any order) of a .npy file: [len(rows), *row shape]; consecutive rows in one read."""
        dtype, shape, offset = self.header(path)
        row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        fd = self._fd(path)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and np.all(np.diff(rows) == 1):  # one training sample, or a run of rows: one pread
            data = os.pread(fd, row_bytes * len(rows), offset + int(rows[0]) * row_bytes)
            if len(data) != row_bytes * len(rows):
                raise EOFError(f"rows {rows[0]}-{rows[-1]} lie past the end of the file")
            return np.frombuffer(data, dtype).reshape(len(rows), *shape[1:])
        out = np.empty((len(rows), *shape[1:]), dtype=dtype)
        flat = out.reshape(len(rows), -1).view(np.uint8) if len(rows) else None
        for i, r in enumerate(rows.tolist()):
            data = os.pread(fd, row_bytes, offset + r * row_bytes)
            if len(data) != row_bytes:
                raise EOFError(f"row {r} lies past the end of the file")
            flat[i] = np.frombuffer(data, np.uint8)
        return out

    def span(self, path: Path, start: int, stop: int) -> bytes:
        """Bytes start..stop of a file."""
        data = os.pread(self._fd(path), stop - start, start)
        if len(data) != stop - start:
            raise EOFError(f"bytes {start}-{stop} lie past the end of the file")
        return data

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __len__(self) -> int:
        return len(self._fds)


def shard_meta_path(folder: Path, k: int) -> Path:
    return folder / f"shard-{k:05d}.json"


def shard_done(folder: str | Path, k: int) -> bool:
    """True when shard k is complete and intact: its metadata and every data file it lists, at full length."""
    folder = Path(folder)
    try:
        meta = json.loads(shard_meta_path(folder, k).read_text(encoding="utf-8"))
        for key in ("codes", "latents"):
            if key in meta and len(np.load(folder / meta[key], mmap_mode="r")) != meta["count"]:
                return False
        if "captions" in meta:
            lines = (folder / meta["captions"]).read_text(encoding="utf-8").splitlines()
            return len(lines) == meta["count"]
        return "codes" in meta
    except (OSError, ValueError, KeyError, TypeError):  # missing, truncated or unreadable: redo the shard
        return False


def write_shard(folder: str | Path, k: int, codes: np.ndarray, ids: list[str], latents: np.ndarray | None = None,
                captions: list[str | None] | None = None, skipped: list[dict] | None = None,
                formats: dict | None = None, caption_errors: list[dict] | None = None,
                round_trip_psnr: list[float] | None = None) -> None:
    """Write shard k (codes uint16 [n, h, w], optional latents and captions, None for an image without one);
    the metadata file goes last. caption_errors: {id, reason} of kept images whose caption file was unreadable;
    round_trip_psnr: dB of the tokenizer's decode(encode(x)) on some of the shard's images."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if codes.size and int(codes.max()) > np.iinfo(np.uint16).max:
        raise ValueError("codes do not fit in uint16")
    meta = {"shard": k, "count": int(len(codes)), "ids": list(ids), "skipped": list(skipped or []),
            "formats": dict(formats or {}), "caption_errors": list(caption_errors or []),
            "round_trip_psnr": [round(float(x), 2) for x in round_trip_psnr or []]}
    save_npy(folder / f"codes-{k:05d}.npy", codes.astype(np.uint16))
    meta["codes"] = f"codes-{k:05d}.npy"
    if latents is not None:
        save_npy(folder / f"latents-{k:05d}.npy", latents.astype(np.float16))
        meta["latents"] = f"latents-{k:05d}.npy"
    if captions is not None:
        data = "".join(json.dumps(c) + "\n" for c in captions).encode("utf-8")
        fileops.write_bytes(folder / f"captions-{k:05d}.jsonl", data)
        save_npy(folder / f"caption-offsets-{k:05d}.npy", caption_offsets(data))
        meta["captions"] = f"captions-{k:05d}.jsonl"
        meta["captioned"] = sum(c is not None for c in captions)
    write_text(shard_meta_path(folder, k), json.dumps(meta) + "\n")


def codebook_hash(codebook: np.ndarray) -> str:
    """16 hex digits of sha256 over a codebook [K, e] as stored (little-endian float32) and its shape."""
    arr = np.ascontiguousarray(codebook, dtype="<f4")
    return hashlib.sha256(f"arrag-codebook/1 {arr.shape}".encode() + arr.tobytes()).hexdigest()[:16]


def check_codebook(codebook: np.ndarray, path: Path | str) -> np.ndarray:
    """Refuse a codebook that cannot be the normalised rows of a VQ: not float32 [K, e], or NaN/inf rows."""
    if not isinstance(codebook, np.ndarray) or codebook.dtype != np.float32 or codebook.ndim != 2 \
            or min(codebook.shape) < 1:
        what = f"{codebook.dtype} {codebook.shape}" if isinstance(codebook, np.ndarray) else type(codebook).__name__
        raise ArragError(f"{path} holds {what}, not a float32 codebook [codes, dims]; rerun `arrag encode` into a "
                         "new --out")
    bad = ~np.isfinite(codebook).all(1)
    if bad.any():
        raise ArragError(f"{path}: codebook rows {', '.join(map(str, np.flatnonzero(bad)[:3]))} hold NaN or inf; "
                         "the tokenizer is damaged: encode with another checkpoint into a new --out")
    return codebook


def write_codebook(folder: str | Path, codebook: np.ndarray) -> str:
    """Write the store's codebook (unless the same one is there) and return its hash. A different codebook
    replaces the old one only while no shard exists: shards encoded with another codebook refuse it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "codebook.npy"
    codebook = check_codebook(np.asarray(codebook, dtype=np.float32), "the tokenizer's codebook")
    digest = codebook_hash(codebook)
    if path.exists():
        try:
            old = codebook_hash(np.load(path))
        except (ValueError, OSError, EOFError):  # damaged: replaced like a different one
            old = None
        if old == digest:
            return digest
        if any(folder.glob("shard-*.json")):
            raise ArragError(f"{folder} holds shards encoded with another codebook ({path}); encode into a new "
                             "--out, or rerun with the tokenizer that made them")
    save_npy(path, codebook)
    return digest


def empty_source_error(folder: str | Path, num_shards: int, source: dict) -> str | None:
    """When every shard is done and none holds an image: the one-line error for the source (whatever its kind),
    after removing those shards' records, so that a rerun reads the source again. None otherwise."""
    folder = Path(folder)
    if not all(shard_done(folder, k) for k in range(num_shards)):
        return None
    metas = [json.loads(shard_meta_path(folder, k).read_text()) for k in range(num_shards)]
    if any(m["count"] for m in metas):
        return None
    skipped = sum(len(m.get("skipped", [])) for m in metas)
    fileops.remove_files([shard_meta_path(folder, k) for k in range(num_shards)])
    def named(d: dict) -> str:
        return d.get("path") or ", ".join(d.get("shards") or d.get("files") or []) or d.get("name", "the source")

    where = "; ".join(named(d) for d in source["sources"]) if source.get("type") == "multi" else named(source)
    return (f"no images in {where} ({source.get('type', 'source')}" + (f"; {skipped:,} items could not be read as "
            "images" if skipped else "") + "): nothing to encode; pass a source that holds images")


def finalize(folder: str | Path, num_shards: int, info: dict) -> bool:
    """Write manifest.json when all `num_shards` shards are done; False (and nothing written) otherwise."""
    folder = Path(folder)
    if not all(shard_done(folder, k) for k in range(num_shards)):
        return False
    shards, skipped, formats, caption_errors, trips = [], [], {}, [], []
    for k in range(num_shards):
        meta = json.loads(shard_meta_path(folder, k).read_text())
        skipped += meta.pop("skipped")
        caption_errors += meta.pop("caption_errors", [])
        trips += meta.pop("round_trip_psnr", [])
        for fmt, n in meta.pop("formats", {}).items():
            formats[fmt] = formats.get(fmt, 0) + n
        meta.pop("ids")
        shards.append(meta)
    reasons: dict = {}
    for s in skipped:
        why = s["reason"].split(":")[0]
        reasons[why] = reasons.get(why, 0) + 1
    num_images = sum(s["count"] for s in shards)
    captioned = sum(s.get("captioned", s["count"] if "captions" in s else 0) for s in shards)
    if info.get("source", {}).get("type") == "multi":  # each source's images: its units are a run of shards
        info = {**info, "source": {**info["source"], "sources": [
            {**d, "images": sum(s["count"] for s in shards[d["units"][0]:d["units"][1]])}
            for d in info["source"]["sources"]]}}
    manifest = {
        "format": STORE_FORMAT,
        **info,
        "num_images": num_images,
        "formats": formats,
        "num_skipped": len(skipped),
        "skipped_by_reason": reasons,
        "skipped": skipped[:1000],  # the first 1000 with reasons; every shard file lists its own
        "has_latents": all("latents" in s for s in shards),
        "has_captions": captioned > 0 and all("captions" in s for s in shards if s["count"]),
        "num_without_caption": num_images - captioned,
        "num_caption_undecodable": len(caption_errors),  # kept images whose caption file was not text
        "caption_undecodable": caption_errors[:1000],
        # How well the tokenizer represents these images: decode(encode(x)) on the first images each process read.
        "vq_round_trip": {"images": len(trips), "psnr_db": round(float(np.mean(trips)), 2) if trips else None},
        "shards": shards,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_text(folder / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return True


def is_store_folder(folder: str | Path) -> bool:
    """True when `folder` holds a code store or the shards of one that `arrag encode` is writing."""
    folder = Path(folder)
    manifest = read_json_dict(folder / "manifest.json")
    if manifest is not None and manifest.get("format") == STORE_FORMAT:
        return True
    return made_by(folder / "encode.json", "encode", legacy=lambda r: "vq_fingerprint" in r and "shard_size" in r)


def write_store(folder: str | Path, codes: np.ndarray, codebook, shard_size: int = 4096,
                captions: list[str] | None = None, source: str = "arrays") -> CodeStore:
    """A finished code store from code grids already in memory ([N, h, w]).

    For codes that come from somewhere other than `arrag encode` (synthetic data, another tokenizer run).
    `codebook` is the VQModel the codes belong to (its normalised codebook and fingerprint are recorded), or
    a normalised codebook array [K, e], whose own hash is then the fingerprint.
    """
    from arrag.vq import codebook_fingerprint

    folder = Path(folder)
    if hasattr(codebook, "fingerprint"):  # a VQModel
        fingerprint = codebook.fingerprint()
        codebook = codebook.quantize.codebook().detach().cpu().numpy()
    else:
        fingerprint = codebook_fingerprint(np.asarray(codebook, np.float32))
    digest = write_codebook(folder, codebook)
    starts = range(0, len(codes), shard_size)
    for k, s in enumerate(starts):
        part = slice(s, s + shard_size)
        write_shard(folder, k, codes[part], [str(i) for i in range(s, min(s + shard_size, len(codes)))],
                    captions=captions[part] if captions is not None else None)
    finalize(folder, len(starts), {"vq_fingerprint": fingerprint, "codebook_sha256": digest,
                                   "grid": list(codes.shape[1:3]), "source": {"type": source}})
    return CodeStore.open(folder)


@dataclass
class CodeStore:
    """Read access to a finished code store (memory-mapped shards). Opening it checks the codebook: float32,
    finite, and the one whose hash the manifest recorded (stores written before arrag 0.3 record none)."""

    folder: Path
    manifest: dict
    _codebook: np.ndarray | None = None
    _bounds: np.ndarray | None = field(default=None, repr=False)
    _maps: MapCache = field(default_factory=MapCache, repr=False)
    _reader: RowReader = field(default_factory=RowReader, repr=False)
    _checked: set = field(default_factory=set, repr=False)  # (key, shard) already checked by this process
    # shard -> None (its caption offsets file is read by pread) or the offsets in memory (a read-only store)
    _offsets: dict = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, folder: str | Path) -> CodeStore:
        folder = Path(folder)
        path = folder / "manifest.json"
        if not path.is_file():
            hint = " (encoding unfinished: rerun `arrag encode` to complete it)" if any(folder.glob("shard-*.json")) \
                else ""
            raise ArragError(f"no code store at {folder}: manifest.json is missing{hint}")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ArragError(f"{path} is not valid JSON ({e}); rerun `arrag encode` with the same settings to "
                             "rewrite it") from None
        if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else None
            raise ArragError(f"{path}: format {found!r} is not {STORE_FORMAT!r}; is this an arrag code store?")
        store = cls(folder, manifest)
        store._codebook = store._read_codebook()
        first = next((k for k, s in enumerate(manifest.get("shards", [])) if s.get("count")), None)
        if first is not None:  # the grid every consumer reshapes by, against the codes (a header read)
            store.shard_array("codes", first)
        return store

    def _read_codebook(self) -> np.ndarray:
        path = self.folder / "codebook.npy"
        try:
            book = np.load(path)
        except FileNotFoundError:
            raise ArragError(f"{path} is missing; rerun `arrag encode` with the same settings to repair the "
                             "store") from None
        except (ValueError, OSError, EOFError) as e:
            raise ArragError(f"cannot read {path} ({one_line(e)}); rerun `arrag encode` into a new --out") from None
        check_codebook(book, path)
        recorded = self.manifest.get("codebook_sha256")
        if recorded is not None and codebook_hash(book) != recorded:
            raise ArragError(f"{path} is not the codebook the store's codes were encoded with (its manifest recorded "
                             f"{recorded}, the file hashes to {codebook_hash(book)}); re-encode into a new --out")
        return book

    @property
    def num_images(self) -> int:
        return int(self.manifest["num_images"])

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.manifest["grid"]
        return int(h), int(w)

    @property
    def fingerprint(self) -> str:
        return self.manifest["vq_fingerprint"]

    @property
    def has_latents(self) -> bool:
        return bool(self.manifest.get("has_latents"))

    @property
    def has_captions(self) -> bool:
        return bool(self.manifest.get("has_captions"))

    def codebook(self) -> np.ndarray:
        """The normalised VQ codebook [K, e] float32 the codes refer to (checked when the store was opened)."""
        if self._codebook is None:
            self._codebook = self._read_codebook()
        return self._codebook

    @property
    def codebook_size(self) -> int:
        return len(self.codebook())

    def _check_codes(self, codes: np.ndarray, k: int) -> np.ndarray:
        """Refuse codes of shard k outside the codebook (codes assembled from another tokenizer's store)."""
        if codes.size and int(codes.max()) >= self.codebook_size:
            where = self.folder / self.manifest["shards"][k]["codes"]
            raise ArragError(f"{where} holds code {int(codes.max())}, but the store's codebook has "
                             f"{self.codebook_size} codes; it was not encoded with this codebook: re-encode it")
        return codes

    @property
    def bounds(self) -> np.ndarray:
        """int64 [shards + 1]: image index where each shard starts, then the image count (computed once)."""
        if self._bounds is None:
            self._bounds = np.cumsum([0] + [int(s["count"]) for s in self.manifest["shards"]], dtype=np.int64)
        return self._bounds

    def shard_array(self, key: str, k: int, cache: bool = False) -> np.ndarray:
        """Shard k's `key` array (codes, latents), memory-mapped and checked against the manifest (its length, its
        grid) and shard k's own record; `cache` keeps the map for this process."""
        s = self._shard(key, k)
        arr = self.mapped(s[key], s["count"]) if cache else self.load_shard_file(s[key], s["count"])
        self._check_shard(key, k, arr.shape)
        return arr

    def _shard(self, key: str, k: int) -> dict:
        s = self.manifest["shards"][k]
        if key not in s:
            raise ArragError(f"code store {self.folder} has no {key} (encode with --save-latents for latents)")
        return s

    def _check_shard(self, key: str, k: int, shape: tuple[int, ...]) -> None:
        """Refuse (once per process) a shard whose array is not on the manifest's grid, or whose own record
        (shard-k.json) gives another image count than the manifest: one of them was edited, or they come from
        different runs."""
        if (key, k) in self._checked:
            return
        s = self.manifest["shards"][k]
        path = self.folder / s[key]
        if tuple(shape[1:3]) != self.grid:
            h, w = self.grid
            raise ArragError(f"{path} holds {key} of {shape[1]}x{shape[2]} cells, but "
                             f"{self.folder / 'manifest.json'} says {h}x{w}: the manifest was edited or belongs to "
                             "another store; rerun `arrag encode` with the same settings to rewrite it")
        meta = read_json_dict(shard_meta_path(self.folder, int(s.get("shard", k))))
        if meta is not None and meta.get("count") != s["count"]:
            raise ArragError(f"{shard_meta_path(self.folder, int(s.get('shard', k)))} records {meta.get('count')} "
                             f"images, but {self.folder / 'manifest.json'} and {path} hold {s['count']}: one was "
                             "edited or comes from another run; rerun `arrag encode` with the same settings")
        self._checked.add((key, k))

    def read_rows(self, name: str | Path, count: int, rows: np.ndarray, what: str = "") -> np.ndarray:
        """Rows of a per-image .npy of `count` rows (random access: RowReader, no map held per file): `name` (str)
        is a file of this store's folder, a Path is used as it is. Refused, in one line, unless it holds exactly
        `count` rows."""
        path = name if isinstance(name, Path) else self.folder / name
        fix = what or "rerun `arrag encode` with the same settings to repair the store"
        try:
            n = self._reader.header(path)[1][0]
        except FileNotFoundError:
            raise ArragError(f"{path} is missing; {fix}") from None
        except (ValueError, OSError, EOFError, IndexError) as e:
            raise ArragError(f"cannot read {path} ({one_line(e)}): it is truncated or damaged; {fix}") from None
        if n != count:
            raise ArragError(f"{path} holds {n} images, its shard has {count}; {fix}")
        try:
            return self._reader.rows(path, rows)
        except (OSError, EOFError) as e:
            raise ArragError(f"cannot read {path} ({one_line(e)}): it is truncated or damaged; {fix}") from None

    def mapped(self, name: str | Path, count: int, what: str = "") -> np.ndarray:
        """load_shard_file, kept open in this process's MapCache (random access: each file opened once)."""
        return self._maps.get(("npy", str(name)), lambda: self.load_shard_file(name, count, what))

    def shard_of(self, image: int) -> tuple[int, int]:
        """(shard, row in it) of image index `image`."""
        if not 0 <= image < self.num_images:
            raise ArragError(f"image index {image} out of range for code store {self.folder} ({self.num_images} "
                             "images)")
        k = int(np.searchsorted(self.bounds, image, side="right")) - 1
        return k, image - int(self.bounds[k])

    def caption(self, image: int) -> str | None:
        """One image's caption (None where it had none), read by offset from its shard's .jsonl (two preads)."""
        k, row = self.shard_of(image)
        s = self.manifest["shards"][k]
        if "captions" not in s:
            raise ArragError(f"code store {self.folder} has no captions")
        if k not in self._offsets:
            self._offsets[k] = self._caption_offsets(s)
        offsets = self._offsets[k]
        if offsets is None:  # the offsets file: read the two numbers this caption needs
            start, stop = self.read_rows(self._offsets_path(s), s["count"] + 1, np.array([row, row + 1])).tolist()
        else:
            start, stop = int(offsets[row]), int(offsets[row + 1])
        path = self.folder / s["captions"]
        try:
            return json.loads(self._reader.span(path, start, stop))
        except ValueError as e:
            raise ArragError(f"{path} line {row + 1} is not JSON ({e}); rerun `arrag encode` with the same "
                             "settings") from None
        except (OSError, EOFError) as e:
            raise ArragError(f"cannot read {path} ({one_line(e)}); rerun `arrag encode` with the same settings") \
                from None

    def source_ids(self, images: np.ndarray) -> list[str | None]:
        """The ids `arrag encode` gave images (their source file or record names), read from the shards' metadata
        (each shard's file read once per call; None where a shard's metadata has gone)."""
        images = np.asarray(images, dtype=np.int64).reshape(-1)
        out: list[str | None] = [None] * len(images)
        by_shard: dict[int, list[int]] = {}
        for i, image in enumerate(images.tolist()):
            by_shard.setdefault(self.shard_of(image)[0], []).append(i)
        for k, where in by_shard.items():
            meta = read_json_dict(shard_meta_path(self.folder, int(self.manifest["shards"][k].get("shard", k))))
            ids = meta.get("ids") if meta else None
            if not isinstance(ids, list):
                continue
            for i in where:
                row = int(images[i] - self.bounds[k])
                out[i] = str(ids[row]) if row < len(ids) else None
        return out

    def _jsonl_bytes(self, s: dict) -> np.ndarray:
        path = self.folder / s["captions"]
        try:
            return np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
        except OSError as e:
            raise ArragError(f"cannot read {path} ({one_line(e)}); rerun `arrag encode` with the same settings") \
                from None

    def _offsets_path(self, s: dict) -> Path:
        return self.folder / s["captions"].replace("captions-", "caption-offsets-").replace(".jsonl", ".npy")

    def _caption_offsets(self, s: dict) -> np.ndarray | None:
        """None when the shard's caption offsets file is there (encode writes one; it is read by pread); else the
        offsets built from the .jsonl once and saved beside it (kept in memory where the folder is read-only),
        checked against the shard's image count."""
        path = self._offsets_path(s)
        if path.is_file():
            self.read_rows(path, s["count"] + 1, np.zeros(0, np.int64), "rerun `arrag encode` with the same settings")
            return None
        offsets = caption_offsets(self._jsonl_bytes(s))
        if len(offsets) != s["count"] + 1:
            raise ArragError(f"{self.folder / s['captions']} holds {len(offsets) - 1} captions, its shard has "
                             f"{s['count']} images: captions would shift onto the wrong images; rerun `arrag encode` "
                             "with the same settings")
        try:
            save_npy(path, offsets)
        except (OSError, ArragError):  # a read-only store: the offsets stay in this process
            return offsets
        return None

    def __getstate__(self) -> dict:
        # DataLoader workers get the store without its maps and open files (pickling a map would copy the file).
        return {**self.__dict__, "_maps": MapCache(self._maps.capacity), "_reader": RowReader(self._reader.capacity)}

    def load_shard_file(self, name: str | Path, count: int, what: str = "") -> np.ndarray:
        """A per-image .npy (memory-mapped), refused unless it holds exactly `count` rows: `name` (str) is a file
        of this store's folder; a Path is used as it is (a side file that lives elsewhere, e.g. retrieved codes)."""
        path = name if isinstance(name, Path) else self.folder / name
        fix = what or "rerun `arrag encode` with the same settings to repair the store"
        if not path.is_file():
            raise ArragError(f"{path} is missing; {fix}")
        try:
            arr = np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as e:
            raise ArragError(f"cannot read {path} ({one_line(e)}): it is truncated or damaged; "
                             f"{fix}") from None
        if len(arr) != count:
            raise ArragError(f"{path} holds {len(arr)} images, its shard has {count}; {fix}")
        return arr

    def iter_chunks(self, chunk: int, key: str = "codes", start: int = 0, stop: int | None = None
                    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first image index, array [<=chunk, h, w, ...]) over images start..stop across shards."""
        stop = self.num_images if stop is None else min(stop, self.num_images)
        bounds = self.bounds
        first = max(0, int(np.searchsorted(bounds, start, side="right")) - 1)
        for k in range(first, len(bounds) - 1):
            offset = int(bounds[k])
            if offset >= stop:
                break
            arr = self.shard_array(key, k)
            lo, hi = max(start, offset), min(stop, offset + len(arr))
            for s in range(lo, hi, chunk):
                e = min(s + chunk, hi)
                part = np.asarray(arr[s - offset:e - offset])
                yield s, (self._check_codes(part, k) if key == "codes" else part)

    def gather(self, indices: np.ndarray, key: str = "codes") -> np.ndarray:
        """Arrays for the given image indices (any order): [len(indices), h, w, ...]. Each index finds its shard
        by binary search and its rows are read with pread (RowReader): a training sample costs the same whatever
        the number of shards and the open-file limit."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) == 0 or indices.min() < 0 or indices.max() >= self.num_images:
            raise ArragError(f"image indices out of range for code store {self.folder} ({self.num_images} images)")
        bounds = self.bounds
        shard_of = np.searchsorted(bounds, indices, side="right") - 1
        if len(indices) == 1:  # one training sample: no grouping
            shards, groups = shard_of, [np.zeros(1, np.int64)]
        else:
            shards = np.unique(shard_of)
            groups = [np.flatnonzero(shard_of == k) for k in shards]
        out = None
        for k, sel in zip(shards.tolist(), groups, strict=True):
            s = self._shard(key, k)
            part = self.read_rows(s[key], s["count"], indices[sel] - bounds[k])
            self._check_shard(key, k, (s["count"], *part.shape[1:]))
            if key == "codes":
                self._check_codes(part, k)
            if out is None:
                out = np.empty((len(indices), *part.shape[1:]), dtype=part.dtype)
            out[sel] = part
        return out

    def captions(self) -> list[str | None]:
        """Every image's caption in store order (None where the image had none); lengths checked per shard."""
        out: list[str | None] = []
        for s in self.manifest["shards"]:
            if "captions" not in s:
                raise ArragError(f"code store {self.folder} has no captions")
            path = self.folder / s["captions"]
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
                caps = [json.loads(line) for line in lines]
            except (OSError, ValueError) as e:
                raise ArragError(f"cannot read {path} ({e}); rerun `arrag encode` with the same settings") from None
            if len(caps) != s["count"]:
                raise ArragError(f"{path} holds {len(caps)} captions, its shard has {s['count']} images: captions "
                                 "would shift onto the wrong images; rerun `arrag encode` with the same settings")
            out += caps
        return out
