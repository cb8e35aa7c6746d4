"""`arrag eval shapes`: GenEval-style accuracy and a realism FID for ShapesWorld images, from pixels only.

Accuracy (per GenEval category): colour segmentation against the six ShapesWorld colours, connected
components, a shape per component from its fill ratio and profile, then the caption's requirement:
  single_object  at least one object of the shape        two_object   both shapes present
  counting       exactly n objects of the shape          colors       an object of that shape and colour
  position       both present, centroids in the relation  color_attr   shape 1 in colour 1 and shape 2 in colour 2
Realism: FID (torchmetrics) between the generated images and rendered ground truth of the same split,
over features of a fixed network shipped with the demo: the demo VQ's encoder (pooled mean and std of its
latents), which sees local structure, so blotchy, misshapen or patchy shapes move the statistics.

Prompt files are GenEval-style JSON lines carrying the scene: {"tag", "prompt", "include": [...], "scene",
"split", "index", "seed", "size"}, so `arrag generate --layout geneval` writes each prompt's scene beside its
samples and `arrag eval shapes DIR` reads both back.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from arrag.demo.shapes import CATEGORIES, COLORS, Scene, ShapeObject, ShapesWorld
from arrag.errors import ArragError
from arrag.fileops import write_text

PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
COLOR_NAMES = list(COLORS)


@dataclass
class Detection:
    """One connected component of one palette colour."""

    color: str
    shape: str
    area: int
    cx: float  # centroid, as a fraction of the image side
    cy: float


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an array of flat pixel indices."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    out = []
    for start in np.flatnonzero(mask):
        if seen.flat[start]:
            continue
        seen.flat[start] = True
        queue, pixels = deque([start]), []
        while queue:
            p = queue.popleft()
            pixels.append(p)
            y, x = divmod(p, w)
            for q, ok in ((p - w, y > 0), (p + w, y < h - 1), (p - 1, x > 0), (p + 1, x < w - 1)):
                if ok and mask.flat[q] and not seen.flat[q]:
                    seen.flat[q] = True
                    queue.append(q)
        out.append(np.array(pixels))
    return out


def _templates(h: int, w: int, ss: int = 4) -> dict[str, np.ndarray]:
    """Coverage [h, w] in [0, 1] of each ShapesWorld shape drawn to fill an h x w box (supersampled ss x ss)."""
    y = (np.arange(h * ss) + 0.5) / (h * ss)
    x = (np.arange(w * ss) + 0.5) / (w * ss)
    yy, xx = np.meshgrid(y, x, indexing="ij")
    u, v = 2 * xx - 1, 2 * yy - 1  # [-1, 1] across the box
    masks = {"square": np.ones_like(u, dtype=bool), "circle": u**2 + v**2 <= 1, "diamond": abs(u) + abs(v) <= 1,
             "triangle": abs(u) <= (v + 1) / 2}  # apex at the top centre, base along the bottom
    return {k: m.reshape(h, ss, w, ss).mean((1, 3)) for k, m in masks.items()}


def _classify(ys: np.ndarray, xs: np.ndarray) -> str:
    """Shape of a component: the template (square, circle, diamond, triangle) fitted to its bounding box
    with the highest soft IoU, so slightly rounded or ragged generated shapes still get their class."""
    ys, xs = ys - ys.min(), xs - xs.min()
    h, w = ys.max() + 1, xs.max() + 1
    mask = np.zeros((h, w), dtype=np.float32)
    mask[ys, xs] = 1.0
    best, score = "circle", -1.0
    for name, t in _templates(int(h), int(w)).items():
        iou = float(np.minimum(mask, t).sum() / np.maximum(mask, t).sum())
        if iou > score:
            best, score = name, iou
    return best


def detect(image: np.ndarray, min_area_frac: float = 0.006) -> list[Detection]:
    """Objects in a uint8 [H, W, 3] image: palette-coloured, saturated pixels grouped into components."""
    rgb = image.astype(np.float32)
    side = image.shape[0]
    dist = np.linalg.norm(rgb[:, :, None, :] - PALETTE[None, None], axis=-1)  # [H, W, 6]
    nearest = dist.argmin(-1)
    mx, mn = rgb.max(-1), rgb.min(-1)
    saturated = (mx - mn) / np.maximum(mx, 1) > 0.4
    near = dist.min(-1) < 75
    found = []
    min_area = max(4, int(min_area_frac * side * side))
    for c, name in enumerate(COLOR_NAMES):
        mask = near & saturated & (nearest == c)
        for pixels in _components(mask):
            if len(pixels) < min_area:
                continue
            ys, xs = np.divmod(pixels, image.shape[1])
            found.append(Detection(name, _classify(ys, xs), len(pixels), float(xs.mean() + 0.5) / side,
                                   float(ys.mean() + 0.5) / side))
    return found


def _relation(rel: str, a: Detection, b: Detection, margin: float = 0.05) -> bool:
    dx, dy = a.cx - b.cx, a.cy - b.cy
    return {"left of": dx < -margin, "right of": dx > margin, "above": dy < -margin, "below": dy > margin}[rel]


def judge(scene: Scene, found: list[Detection]) -> bool:
    """Whether the detections satisfy the scene's caption (the GenEval rule of its category)."""
    objs = scene.objects
    shapes = [d.shape for d in found]
    largest = lambda shape: max((d for d in found if d.shape == shape), key=lambda d: d.area, default=None)  # noqa: E731
    has = lambda shape, color=None: any(d.shape == shape and (color is None or d.color == color)  # noqa: E731
                                        for d in found)
    if scene.category == "single_object":
        return has(objs[0].shape)
    if scene.category == "two_object":
        return has(objs[0].shape) and has(objs[1].shape)
    if scene.category == "counting":
        return shapes.count(objs[0].shape) == len(objs)
    if scene.category == "colors":
        return has(objs[0].shape, objs[0].color)
    if scene.category == "position":
        a, b = largest(objs[0].shape), largest(objs[1].shape)
        return a is not None and b is not None and _relation(scene.relation, a, b)
    if scene.category == "color_attr":
        return has(objs[0].shape, objs[0].color) and has(objs[1].shape, objs[1].color)
    raise ArragError(f"unknown ShapesWorld category {scene.category!r}")


def accuracy(images: np.ndarray, scenes: list[Scene]) -> dict:
    """Per-category and overall accuracy (overall = mean over categories, as GenEval) of images [N, H, W, 3]."""
    hits: dict[str, list[bool]] = {c: [] for c in CATEGORIES}
    correct = []  # each image's verdict, in order
    for image, scene in zip(images, scenes, strict=True):
        correct.append(judge(scene, detect(image)))
        hits[scene.category].append(correct[-1])
    per = {c: float(np.mean(v)) for c, v in hits.items() if v}
    return {"per_category": per, "overall": float(np.mean(list(per.values()))),
            "counts": {c: len(v) for c, v in hits.items() if v}, "correct": correct}


# ----------------------------------------------------------------------------------------------------------
# Realism: FID over the demo VQ encoder's pooled latents


class VQEncoderFeatures(nn.Module):
    """uint8 [B, 3, H, W] -> [B, 2 * z_channels] float64: spatial mean and std of the VQ encoder's output."""

    def __init__(self, vq, size: int):
        super().__init__()
        self.encoder, self.size = vq.encoder.float().eval(), size
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 127.5 - 1.0
        if x.shape[-1] != self.size:
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        z = self.encoder(x)
        return torch.cat([z.mean((2, 3)), z.std((2, 3))], 1).double()


def image_features(images: np.ndarray, features: nn.Module) -> torch.Tensor:
    """float64 [N, D]: `features` of uint8 [N, H, W, 3] images, 64 at a time (computed once, reused by every FID
    the images take part in: a demo's reference takes part in dozens)."""
    out = [features(torch.from_numpy(np.ascontiguousarray(images[s:s + 64])).permute(0, 3, 1, 2))
           for s in range(0, len(images), 64)]
    return torch.cat(out)


def realism_fid(images: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor, features: nn.Module) -> float:
    """FID (arrag.eval.fid's statistics) between uint8 [N, H, W, 3] images and reference images, over `features`;
    either side may be given as its `image_features` [N, D] instead."""
    from arrag.eval.fid import FeatureStats, frechet_distance

    def stats(arr: np.ndarray | torch.Tensor) -> FeatureStats:
        f = arr if isinstance(arr, torch.Tensor) and arr.ndim == 2 else image_features(arr, features)
        out = FeatureStats(f.shape[1], type(features).__name__, None)
        for s in range(0, len(f), 64):  # summed in the same chunks either way: the same FID to the last bit
            out.add(f[s:s + 64])
        return out

    return frechet_distance(stats(reference), stats(images))


def reference_images(split: str, count: int, size: int, seed: int = 0, start: int = 0) -> np.ndarray:
    """Rendered ground truth of a split (the realism reference)."""
    return ShapesWorld(split, seed=seed, size=size).images(start, count)


# ----------------------------------------------------------------------------------------------------------
# Prompt files and generated folders


def prompt_records(split: str, count: int, size: int, seed: int = 0, start: int = 0) -> list[dict]:
    """GenEval-style records of items start..start+count-1 of a split, each carrying its scene."""
    world = ShapesWorld(split, seed=seed, size=size)
    out = []
    for i in range(start, start + count):
        scene = world.scene(i)
        include = [{"class": o.shape, "count": 1, **({"color": o.color} if scene.category in ("colors", "color_attr")
                                                    else {})} for o in scene.objects]
        if scene.category == "counting":
            include = [{"class": scene.objects[0].shape, "count": len(scene.objects)}]
        out.append({"tag": scene.category, "include": include, "prompt": scene.caption, "scene": scene.to_dict(),
                    "split": split, "index": i, "seed": seed, "size": size})
    return out


def write_prompt_file(path: str | Path, records: list[dict]) -> Path:
    path = Path(path)
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return path


def is_prompt_file(path: str | Path) -> bool:
    """True when `path` is a ShapesWorld prompt file that arrag wrote (its first record holds a scene)."""
    try:
        with open(path, encoding="utf-8") as f:
            first = json.loads(f.readline())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(first, dict) and {"prompt", "tag", "scene"} <= set(first)


def scene_from_dict(d: dict) -> Scene:
    objects = [ShapeObject(**o) for o in d["objects"]]
    background = tuple(tuple(c) for c in d["background"])
    return Scene(d["category"], d["caption"], objects, background, d.get("relation"))


def read_generated(folder: str | Path, scene_from=None) -> tuple[np.ndarray, list, list[dict]]:
    """Images and scenes of a geneval-layout folder generated from a demo world's prompt file (`scene_from`: the
    world's scene reader; default ShapesWorld's)."""
    from PIL import Image

    folder = Path(folder)
    images, scenes, records = [], [], []
    subs = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()) if folder.is_dir() else []
    for sub in subs:
        meta = sub / "metadata.jsonl"
        if not meta.is_file():
            continue
        record = json.loads(meta.read_text())
        if "scene" not in record:
            raise ArragError(f"{meta} has no demo-world scene: generate from a prompt file made by "
                             "arrag.demo.score.write_prompt_file")
        for png in sorted((sub / "samples").glob("*.png")):
            images.append(np.asarray(Image.open(png).convert("RGB")))
            scenes.append((scene_from or scene_from_dict)(record["scene"]))
            records.append(record)
    if not images:
        raise ArragError(f"{folder}: no generated demo-world samples (<index>/metadata.jsonl + samples/*.png)")
    return np.stack(images), scenes, records


def score_folder(folder: str | Path, vq_source: str | Path, reference_count: int = 512,
                 trust_checkpoint: bool = False) -> dict:
    """Accuracy and realism of a generated folder; the reference is rendered from the records' split."""
    from arrag.vq import load_vq

    images, scenes, records = read_generated(folder)
    r = records[0]
    reference = reference_images(r["split"], reference_count, images.shape[1], r["seed"], start=10_000)
    features = VQEncoderFeatures(load_vq(vq_source, trust_checkpoint=trust_checkpoint), images.shape[1])
    result = accuracy(images, scenes)
    result.pop("correct")
    return {**result, "realism_fid": realism_fid(images, reference, features),
            "images": len(images), "reference_images": reference_count}

