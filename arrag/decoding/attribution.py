"""Attribution: which index entries, and through them which database images, each generated patch drew on.

With attribution on (`arrag generate --attribution`, `Generator(..., attribution=AttributionSettings())`), DAiD
and FAiD hand every retrieval step's hits to an AttributionRecorder. Per generated image it keeps the arrays of
FIELDS (one row per retrieval step) and a summary: the database images that contributed most.

How much a database image contributed. A DAiD step gives p_ret's weight on the sampled code to the hits that
proposed that code, in the proportion p_ret weighs them ('sum': exp(-d / tau) x copies; 'nearest': the code's
nearest hit). A FAiD step gives each candidate gate / K, its weight in the blenders' mean. A hit's mass is split
evenly over its entry's occurrences, so over the images they came from. An entry that occurs in more than
`diffuse_above` images is a common pattern (a flat background), not a source: its mass is counted as diffuse.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from arrag.decoding.hooks import DecodeState, DecodingHook
from arrag.decoding.loop import filter_probs, sample_from
from arrag.errors import ArragError
from arrag.fileops import write_bytes
from arrag.provenance import write_json

ATTRIBUTION_KIND = "arrag generate --attribution"
# One line per field of <image>.attribution.npz (also written into the .json beside it). S steps, H hits.
FIELDS = {
    "cells": "int32 [S]: raster index of each retrieval step's target cell (row = cell // w, column = cell % w)",
    "sampled": "int32 [S]: the code sampled at that cell",
    "queries": "float32 [S, D]: the retrieval query (the sampled neighbours' normalised codebook vectors)",
    "{m}_hit_entries": "int64 [S, H]: the H nearest hits' index entries, nearest first (-1 = none)",
    "{m}_hit_distances": "float32 [S, H]: their squared L2 distances to the query",
    "{m}_hit_codes": "int32 [S, H]: the code each hit proposes",
    "{m}_hit_occurrences": "int64 [S, H]: how many times each hit's entry occurs in the database (0 = unknown)",
    "{m}_hit_image_offsets": "int64 [S*H+1]: hit j of step s has the database images "
                             "{m}_hit_images[offsets[s*H+j]:offsets[s*H+j+1]]",
    "{m}_hit_images": "int64: database images (code store indices) behind each hit, its first images_per_hit",
    "{m}_top_images": "int64 [N]: the database images that contributed most, most first",
    "{m}_top_mass": "float32 [N]: their contributed mass",
    "daid_hit_copies": "int32 [S, H]: occurrences each hit stands for in the full index's top k (1 without de-dup)",
    "daid_hit_p_ret": "float32 [S, H]: p_ret of each hit's code",
    "daid_weight": "float32 [S]: p_ret's weight on the sampled code",
    "daid_model_prob": "float32 [S]: the model's own probability of the sampled code (after CFG and temperature)",
    "daid_mixed_prob": "float32 [S]: the mixed distribution's probability of it, (1 - lambda) p_model + lambda p_ret",
    "daid_model_choice": "int32 [S]: the code the model alone would have drawn with the same uniform (after the "
                         "run's top-k / top-p); differs from sampled where retrieval changed the token",
    "faid_hit_gates": "float32 [S, H]: each candidate's blender gate (sigmoid, mean over the blender layers)",
}
STEP_FIELDS = ("weight", "model_prob", "mixed_prob", "model_choice")  # one value a step, not one a hit
NO_IMAGE_MAP = ("the original prebuilt database records no images for its entries: attribution lists its hits "
                "but no database images")


@dataclass
class AttributionSettings:
    """What attribution keeps (defaults are the CLI's)."""

    hits: int = 32              # hits recorded per step and method, nearest first
    top: int = 10               # contributing database images listed per generated image
    images_per_hit: int = 8     # database images recorded per hit
    diffuse_above: int = 1000   # an entry in more images than this is a common pattern: its mass is 'diffuse'

    def validate(self) -> None:
        for flag, value in (("--attribution-hits", self.hits), ("--attribution-top", self.top),
                            ("--attribution-images-per-hit", self.images_per_hit),
                            ("--attribution-diffuse-above", self.diffuse_above)):
            if value < 1:
                raise ArragError(f"{flag} must be >= 1, got {value}")


@dataclass
class ImageAttribution:
    """One generated image's attribution: the arrays of FIELDS and the summary (top contributors per method)."""

    arrays: dict[str, np.ndarray]
    summary: dict = field(default_factory=dict)

    def save(self, image_path: str | Path, **extra) -> list[str]:
        """Write <image>.attribution.npz and <image>.attribution.json beside the image; returns their names."""
        npz, js = attribution_paths(image_path)
        buf = io.BytesIO()
        np.savez_compressed(buf, **self.arrays)
        write_bytes(npz, buf.getvalue())
        fields = {name.format(m=m): doc for name, doc in FIELDS.items() for m in ("daid", "faid")}
        write_json(js, {"arrag_output": ATTRIBUTION_KIND, "image": Path(image_path).name, "arrays": npz.name,
                        **extra, **self.summary, "fields": {k: v for k, v in fields.items() if k in self.arrays}})
        return [npz.name, js.name]

    @classmethod
    def load(cls, image_path: str | Path) -> ImageAttribution:
        npz, js = attribution_paths(image_path)
        try:
            with np.load(npz, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            summary = json.loads(js.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ArragError(f"cannot read the attribution of {image_path} ({e}); generate it again with "
                             "--attribution") from None
        return cls(arrays, summary)


def attribution_paths(image_path: str | Path) -> tuple[Path, Path]:
    """(<image stem>.attribution.npz, <image stem>.attribution.json) beside the image."""
    p = Path(image_path)
    return p.with_name(p.stem + ".attribution.npz"), p.with_name(p.stem + ".attribution.json")


class AttributionRecorder(DecodingHook):
    """Collects what DAiD and FAiD searched and how they weighed it, and assembles one ImageAttribution per image.

    DAiD calls daid_step() after computing p_ret; the sampled code is known at the next step (before_forward) or
    at end(), when the step's contributions are resolved. FAiD calls faid_step() before the forward pass and
    faid_gates() after it. Records of every chunk of a run accumulate in `records` (take() empties it).
    """

    def __init__(self, retriever, settings: AttributionSettings | None = None):
        super().__init__()
        self.retriever, self.config = retriever, settings or AttributionSettings()
        self.config.validate()
        self.records: list[ImageAttribution] = []
        self._store, self._store_opened = None, False  # the index's code store, for source ids (opened once)
        if retriever.image_map == "none":
            warnings.warn(f"{retriever.folder}: {NO_IMAGE_MAP}", stacklevel=2)

    # -- called by the decoding hooks --------------------------------------------------------------------------
    def begin(self, state: DecodeState) -> None:
        self.state = state
        self.queries: dict[int, np.ndarray] = {}
        self.steps: dict[str, dict[int, dict]] = {"daid": {}, "faid": {}}
        self.contrib: dict[str, list[tuple]] = {"daid": [], "faid": []}
        self.pending = None  # DAiD's last step, waiting for its sampled code
        self.faid_pending: dict[int, tuple] = {}

    def daid_step(self, target: int, query: torch.Tensor, dist: torch.Tensor, codes: torch.Tensor,
                  copies: torch.Tensor | None, ids: torch.Tensor, p_ret: torch.Tensor, tau: float,
                  aggregate: str, p_model: torch.Tensor | None = None, p_mixed: torch.Tensor | None = None) -> None:
        """One DAiD search: its hits [N, k] (copies None without de-duplication), p_ret [N, V], and the model's
        distribution and the mixed one [N, V] (what retrieval changed). The previous step was resolved in
        before_forward, which the loop calls before every step's hooks."""
        self.queries.setdefault(target, query.float().cpu().numpy())
        h = min(self.config.hits, codes.shape[1])
        copies_ = torch.ones_like(codes) if copies is None else copies.to(codes.device)
        p_hit = torch.where(codes[:, :h] >= 0, p_ret.gather(1, codes[:, :h].clamp_min(0).to(p_ret.device)).cpu(), 0)
        self.steps["daid"][target] = {**_hits(dist, codes, ids, h), "copies": _np(copies_[:, :h], np.int32),
                                      "p_ret": _np(p_hit, np.float32)}
        self.pending = (target, dist, codes, copies_, ids, p_ret, tau, aggregate, p_model, p_mixed)

    def faid_step(self, target: int, query: torch.Tensor, dist: torch.Tensor, codes: torch.Tensor,
                  ids: torch.Tensor) -> None:
        """One FAiD search: its K candidates [N, K] per image (a de-duplicated entry repeated by its copies)."""
        self.queries.setdefault(target, query.float().cpu().numpy())
        h = min(self.config.hits, codes.shape[1])
        self.steps["faid"][target] = _hits(dist, codes, ids, h)
        self.faid_pending[target] = (ids, codes.shape[1])

    def faid_gates(self, target: int, gates: torch.Tensor) -> None:
        """The blenders' gates [N, K] of the forward pass that predicted `target` (mean over blender layers)."""
        ids, k = self.faid_pending.pop(target)
        g = gates.float().cpu()
        self.steps["faid"][target]["gates"] = _np(g[:, :self.steps["faid"][target]["codes"].shape[1]], np.float32)
        mass = torch.where(ids.cpu() >= 0, g / k, 0.0)  # each candidate's weight in the blenders' mean
        self._add_contrib("faid", mass, ids.cpu())

    def before_forward(self, state: DecodeState, target: int) -> None:
        self._resolve_daid()  # token target - 1 is sampled now

    def end(self, state: DecodeState) -> None:
        self._resolve_daid()
        self.records.extend(self._assemble())
        self.steps, self.contrib, self.queries = {}, {}, {}

    def take(self) -> list[ImageAttribution]:
        """The records of the images generated since the last take(), in image order."""
        out, self.records = self.records, []
        return out

    def settings(self) -> dict:
        return {"attribution": asdict(self.config)}

    # -- internals ------------------------------------------------------------------------------------------------
    def _resolve_daid(self) -> None:
        if self.pending is None:
            return
        target, dist, codes, copies, ids, p_ret, tau, aggregate, p_model, p_mixed = self.pending
        sampled = self.state.codes[:, target]
        if bool((sampled < 0).any()):
            return  # not sampled yet
        self.pending = None
        weight = p_ret.gather(1, sampled[:, None].to(p_ret.device))[:, 0].float().cpu()
        step = self.steps["daid"][target]
        step["weight"] = _np(weight, np.float32)
        if p_model is not None:
            at = sampled[:, None].to(p_model.device)
            step["model_prob"] = _np(p_model.gather(1, at)[:, 0].float().cpu(), np.float32)
            mixed = p_mixed / p_mixed.sum(1, keepdim=True)
            step["mixed_prob"] = _np(mixed.gather(1, at)[:, 0].float().cpu(), np.float32)
            if self.state.uniforms is not None:  # the model alone, the same draw: what retrieval changed
                cfg = self.state.sampling
                alone = p_model if cfg is None else filter_probs(p_model, cfg.top_k, cfg.top_p)
                if cfg is not None and cfg.temperature == 0:
                    choice = p_model.argmax(1)
                else:
                    choice = sample_from(alone, self.state.uniforms[:, target])
                step["model_choice"] = _np(choice.cpu(), np.int32)
        dist, codes, copies, ids = (t.cpu() for t in (dist.float(), codes, copies, ids))
        match = (codes == sampled.cpu()[:, None]) & (codes >= 0) & (copies > 0)
        d = torch.where(match, dist, float("inf"))
        d_min = d.amin(1, keepdim=True)
        if aggregate == "sum":  # the sampled code's p_ret is the sum of these terms
            share = torch.where(match, torch.exp((d_min - d) / tau) * copies, 0.0)
        else:  # 'nearest': the code's weight is its nearest hit's
            share = (match & (d == d_min)).float()
        share = share / share.sum(1, keepdim=True).clamp_min(1e-30)
        self._add_contrib("daid", share * weight[:, None], ids)

    def _add_contrib(self, method: str, mass: torch.Tensor, ids: torch.Tensor) -> None:
        rows, cols = torch.nonzero(mass > 0, as_tuple=True)
        if len(rows):
            self.contrib[method].append((rows.numpy(), ids[rows, cols].numpy(), mass[rows, cols].double().numpy()))

    def _assemble(self) -> list[ImageAttribution]:
        n = self.state.n_images
        targets = sorted(self.queries)
        cells = np.asarray(targets, np.int32)
        sampled = self.state.codes[:, cells].cpu().numpy().astype(np.int32) if len(cells) else \
            np.zeros((n, 0), np.int32)
        queries = np.stack([self.queries[t] for t in targets], 1) if targets else np.zeros((n, 0, 0), np.float32)
        per_image = [{"cells": cells, "sampled": sampled[i], "queries": queries[i]} for i in range(n)]
        summaries: list[dict] = [{} for _ in range(n)]
        for method, steps in self.steps.items():
            if not steps:
                continue
            order = [steps[t] for t in targets if t in steps]
            names = [k for k in order[0] if all(k in s for s in order)]
            stacked = {k: np.stack([s[k] for s in order], 1) for k in names}  # [N, S, H]
            images = self._hit_images(stacked["entries"])
            top = self._top(method, n)
            for i in range(n):
                arrays = per_image[i]
                for k, v in stacked.items():
                    arrays[f"{method}_{k if k in STEP_FIELDS else 'hit_' + k}"] = v[i]
                if images is not None:
                    arrays[f"{method}_hit_occurrences"] = images[2][i]
                    arrays[f"{method}_hit_image_offsets"], arrays[f"{method}_hit_images"] = images[0][i], images[1][i]
                arrays[f"{method}_top_images"], arrays[f"{method}_top_mass"] = top[i][0], top[i][1]
                summaries[i][method] = top[i][2]
        return [ImageAttribution(arrays, {"image_map": self.retriever.image_map, "grid": list(self.state.grid),
                                          "retriever": str(self.retriever.folder), **summaries[i],
                                          **({"note": NO_IMAGE_MAP} if self.retriever.image_map == "none" else {})})
                for i, arrays in enumerate(per_image)]

    def _hit_images(self, entries: np.ndarray):
        """Per image: (CSR offsets [S*H+1], images, occurrences [S, H]) of its recorded hits, or None without a map."""
        if self.retriever.image_map == "none":
            return None
        n, s, h = entries.shape
        flat = entries.reshape(-1)
        valid = flat >= 0
        offsets, images, occ = self.retriever.images_of(flat[valid], self.config.images_per_hit)
        counts = np.zeros(len(flat), np.int64)
        counts[valid] = np.diff(offsets)
        occurrences = np.zeros(len(flat), np.int64)
        occurrences[valid] = occ
        out = []
        start = 0
        for i in range(n):
            c = counts[i * s * h:(i + 1) * s * h]
            stop = start + int(c.sum())
            out.append((np.concatenate([[0], np.cumsum(c)]).astype(np.int64), images[start:stop]))
            start = stop
        return ([o for o, _ in out], [im for _, im in out], occurrences.reshape(n, s, h))

    def _top(self, method: str, n: int) -> list[tuple[np.ndarray, np.ndarray, dict]]:
        """Per image: (top images, their mass, summary dict) from this chunk's contributions of `method`."""
        parts = self.contrib.get(method, [])
        rows = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
        entries = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
        mass = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0)
        total = np.bincount(rows, mass, minlength=n)
        out = []
        if self.retriever.image_map == "none":
            return [(np.zeros(0, np.int64), np.zeros(0, np.float32),
                     {"mass": round(float(total[i]), 6), "top": None}) for i in range(n)]
        uniq, inverse = np.unique(entries, return_inverse=True)
        limit = self.config.diffuse_above
        offsets, images, occ = self.retriever.images_of(uniq, limit)
        diffuse_entry = occ > limit
        diffuse = np.bincount(rows, np.where(diffuse_entry[inverse], mass, 0.0), minlength=n)
        # every occurrence of a non-diffuse hit's entry gets mass / occurrences, on the image it came from
        taken = np.diff(offsets)[inverse] * ~diffuse_entry[inverse]
        occ_rows = np.repeat(rows, taken)
        occ_images = images[np.repeat(offsets[:-1][inverse], taken) + _ranges(taken)]
        occ_mass = np.repeat(mass / np.maximum(occ[inverse], 1), taken)
        width = int(images.max(initial=0)) + 1
        key = occ_rows * width + occ_images
        keys, where = np.unique(key, return_inverse=True)
        summed = np.bincount(where, occ_mass)
        key_rows, key_images = np.divmod(keys, width)
        for i in range(n):
            mine = np.flatnonzero(key_rows == i)
            best = mine[np.lexsort((key_images[mine], -summed[mine]))][:self.config.top]
            top_images, top_mass = key_images[best].astype(np.int64), summed[best]
            ids = self._sources(top_images)
            tot = float(total[i])
            out.append((top_images, top_mass.astype(np.float32), {
                "mass": round(tot, 6), "diffuse_mass": round(float(diffuse[i]), 6),
                "top": [{"image": int(im), "source": src, "mass": round(float(m), 6),
                         "share": round(float(m) / tot, 4) if tot > 0 else 0.0}
                        for im, m, src in zip(top_images, top_mass, ids, strict=True)]}))
        return out

    def _sources(self, images: np.ndarray) -> list[str | None]:
        """The code store's ids (source file names) of database images, when the index's store is still there."""
        if not self._store_opened:
            from arrag.retrieval.codestore import CodeStore

            path = self.retriever.manifest.get("store")
            try:
                self._store = CodeStore.open(path) if path else None
            except ArragError as e:
                self._store = None
                warnings.warn(f"attribution: the index's code store cannot be opened ({e}); image source ids are left "
                              "out", stacklevel=2)
            self._store_opened = True
        if self._store is None:
            return [None] * len(images)
        return self._store.source_ids(images)


def _np(t: torch.Tensor, dtype) -> np.ndarray:
    return t.detach().cpu().numpy().astype(dtype, copy=False)


def _hits(dist: torch.Tensor, codes: torch.Tensor, ids: torch.Tensor, h: int) -> dict:
    """The first h hits of a search, as the record's arrays."""
    return {"entries": _np(ids[:, :h], np.int64), "distances": _np(dist[:, :h], np.float32),
            "codes": _np(codes[:, :h], np.int32)}


def _ranges(lengths: np.ndarray) -> np.ndarray:
    """0..lengths[0]-1, 0..lengths[1]-1, ... concatenated (int64)."""
    lengths = np.asarray(lengths, np.int64)
    starts = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)
