"""The code store: encoded images on disk, in shards, with a manifest.

Layout of a store folder:
  manifest.json          written last, once every shard is done (format, VQ fingerprint, sizes, shards)
  codebook.npy           the VQ's normalised codebook [K, e] float32 (keys are built from it)
  codes-00000.npy        uint16 [n, h, w] code grids of shard 0
  latents-00000.npy      float16 [n, h, w, e] normalised pre-quantisation latents (optional)
  captions-00000.jsonl   one JSON string per image (optional)
  shard-00000.json       shard metadata (count, image ids, skipped items); its presence marks the shard done
Every file is written to a temporary name and renamed, so an interrupted run leaves only whole shards.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from arrag.errors import ArragError, one_line
from arrag.fileops import save_npy, write_text

STORE_FORMAT = "arrag-codestore/1"


# Every file a code store folder may hold (encode, construct-train): the only files arrag removes from one.
STORE_FILES = (r"manifest\.json", r"encode\.json", r"codebook\.npy", r"codes-\d{5}\.npy", r"latents-\d{5}\.npy",
               r"captions-\d{5}\.jsonl", r"shard-\d{5}\.json", r"retrieved-\d{5}\.npy", r"retrieved\.json")


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
                formats: dict | None = None) -> None:
    """Write shard k (codes uint16 [n, h, w], optional latents and captions, None for an image without one);
    the metadata file goes last."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if codes.size and int(codes.max()) > np.iinfo(np.uint16).max:
        raise ValueError("codes do not fit in uint16")
    meta = {"shard": k, "count": int(len(codes)), "ids": list(ids), "skipped": list(skipped or []),
            "formats": dict(formats or {})}
    save_npy(folder / f"codes-{k:05d}.npy", codes.astype(np.uint16))
    meta["codes"] = f"codes-{k:05d}.npy"
    if latents is not None:
        save_npy(folder / f"latents-{k:05d}.npy", latents.astype(np.float16))
        meta["latents"] = f"latents-{k:05d}.npy"
    if captions is not None:
        write_text(folder / f"captions-{k:05d}.jsonl", "".join(json.dumps(c) + "\n" for c in captions))
        meta["captions"] = f"captions-{k:05d}.jsonl"
        meta["captioned"] = sum(c is not None for c in captions)
    write_text(shard_meta_path(folder, k), json.dumps(meta) + "\n")


def write_codebook(folder: str | Path, codebook: np.ndarray) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "codebook.npy").exists():
        save_npy(folder / "codebook.npy", np.asarray(codebook, dtype=np.float32))


def finalize(folder: str | Path, num_shards: int, info: dict) -> bool:
    """Write manifest.json when all `num_shards` shards are done; False (and nothing written) otherwise."""
    folder = Path(folder)
    if not all(shard_done(folder, k) for k in range(num_shards)):
        return False
    shards, skipped, formats = [], [], {}
    for k in range(num_shards):
        meta = json.loads(shard_meta_path(folder, k).read_text())
        skipped += meta.pop("skipped")
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
        "shards": shards,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_text(folder / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return True


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
    write_codebook(folder, codebook)
    starts = range(0, len(codes), shard_size)
    for k, s in enumerate(starts):
        part = slice(s, s + shard_size)
        write_shard(folder, k, codes[part], [str(i) for i in range(s, min(s + shard_size, len(codes)))],
                    captions=captions[part] if captions is not None else None)
    finalize(folder, len(starts), {"vq_fingerprint": fingerprint,
                                   "grid": list(codes.shape[1:3]), "source": {"type": source}})
    return CodeStore.open(folder)


@dataclass
class CodeStore:
    """Read access to a finished code store (memory-mapped shards)."""

    folder: Path
    manifest: dict

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
        return cls(folder, manifest)

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
        """The normalised VQ codebook [K, e] float32 the codes refer to."""
        return np.load(self.folder / "codebook.npy")

    def _shard_arrays(self, key: str) -> Iterator[np.ndarray]:
        for s in self.manifest["shards"]:
            if key not in s:
                raise ArragError(f"code store {self.folder} has no {key} (encode with --save-latents for latents)")
            yield self.load_shard_file(s[key], s["count"])

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
        offset = 0
        for arr in self._shard_arrays(key):
            n = len(arr)
            lo, hi = max(start, offset), min(stop, offset + n)
            for s in range(lo, hi, chunk):
                e = min(s + chunk, hi)
                yield s, np.asarray(arr[s - offset:e - offset])
            offset += n
            if offset >= stop:
                break

    def gather(self, indices: np.ndarray, key: str = "codes") -> np.ndarray:
        """Arrays for the given image indices (any order): [len(indices), h, w, ...]."""
        indices = np.asarray(indices, dtype=np.int64)
        bounds = np.cumsum([0] + [s["count"] for s in self.manifest["shards"]])
        out = None
        for k, arr in enumerate(self._shard_arrays(key)):
            sel = np.flatnonzero((indices >= bounds[k]) & (indices < bounds[k + 1]))
            if len(sel) == 0:
                continue
            part = np.asarray(arr[indices[sel] - bounds[k]])
            if out is None:
                out = np.empty((len(indices), *part.shape[1:]), dtype=part.dtype)
            out[sel] = part
        if out is None:
            raise ArragError(f"image indices out of range for code store {self.folder} ({self.num_images} images)")
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
