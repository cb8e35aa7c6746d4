"""`arrag eval tail`: TailWorld accuracy per frequency bucket, from pixels only.

Reading an image: every pixel is ink (near one of the four ink colours and saturated), paper (the patterns' light
tone) or background; ink and paper together are the discs, found as connected components. Each disc is read for
  colour   the ink colour most of its ink pixels are nearest to
  pattern  the pattern whose mask correlates with the disc's ink pixels best: tiles at every cyclic shift (so a
           pattern drawn out of phase still counts), radial ones about the disc's centre at a few offsets;
           correlation under 0.5 reads as no pattern
A prompt is correct when the image holds exactly the caption's number of discs (a fragment under a sixth of the
largest disc's area is a stray blot, not a disc), each in the caption's colour and pattern. Figures are given per
bucket (head, torso, tail: how often the base saw the pattern in training) and overall (every prompt; the
evaluation splits hold every pattern evenly).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from arrag.demo.tail import BUCKETS, COLORS, PAPER, TILES, Frequencies, TailScene

INK = np.array(list(COLORS.values()), dtype=np.float32)
INK_NAMES = list(COLORS)
MIN_AGREEMENT = 0.5  # correlation of the disc's ink with the pattern's
MIN_DISC_AREA = 60  # pixels at 64 px: a two-disc scene's discs have about 380


@dataclass
class Disc:
    """One disc read from an image."""

    color: str
    pattern: str | None  # None: no pattern agreed well enough
    agreement: float
    area: int
    cx: float
    cy: float


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected labels [H, W] (0 = none, then 1..count) of a boolean mask: each pixel takes the smallest index
    among its 4-neighbours, then the label of the pixel its label names (pointer jumping), until nothing changes;
    the fixed point is every pixel holding its component's smallest index (vectorised, no SciPy; the jumps make
    it a few rounds where plain propagation took as many as a component is long)."""
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        nxt = lab.copy()
        nxt[1:] = np.minimum(nxt[1:], lab[:-1])
        nxt[:-1] = np.minimum(nxt[:-1], lab[1:])
        nxt[:, 1:] = np.minimum(nxt[:, 1:], lab[:, :-1])
        nxt[:, :-1] = np.minimum(nxt[:, :-1], lab[:, 1:])
        nxt = np.where(mask, nxt, big)
        for _ in range(4):  # a label is a pixel of the same component: take that pixel's label
            nxt = np.append(nxt.ravel(), big)[nxt]
        if np.array_equal(nxt, lab):
            break
        lab = nxt
    roots, labels = np.unique(lab, return_inverse=True)
    labels = labels.reshape(h, w) + 1
    labels[~mask] = 0
    return labels, int((roots < big).sum())


@cache
def _shifted_tiles(name: str) -> np.ndarray:
    """bool [shifts, P, P]: the tile at every cyclic shift."""
    t = TILES[name]
    p = t.shape[0]
    return np.stack([np.roll(t, (dy, dx), axis=(0, 1)) for dy in range(p) for dx in range(p)])


@cache
def _tiles_of_period(p: int) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """The tiles of period p: their names, every shift of each stacked as float64 [sum of shifts, p*p], and where
    each tile's shifts start in that stack (the tiles sharing a period share the phase counts they are read on)."""
    names = tuple(n for n in TILES if TILES[n].shape[0] == p)
    stacked = np.concatenate([_shifted_tiles(n).reshape(-1, p * p) for n in names]).astype(np.float64)
    starts = np.cumsum([0] + [p * p for _ in names[:-1]])
    return names, stacked, starts


def _correlation(n: float, ink: float, template, both) -> np.ndarray:
    """Pearson correlation of two binary maps over n pixels from their sums (0 where either is constant)."""
    num = n * both - ink * template
    den = np.sqrt(np.maximum((n * ink - ink * ink) * (n * template - template * template), 0.0))
    return np.where(den > 0, num / np.maximum(den, 1e-12), 0.0)


def _pattern_agreements(ink: np.ndarray, region: np.ndarray, cx: float, cy: float) -> dict[str, float]:
    """Each pattern's best correlation with the ink map inside `region` (bool [H, W] each): tiles over every
    cyclic shift, radial patterns about (cx, cy) at a few ring phases and rotations. Correlation rather than the
    share of agreeing pixels, so that a pattern contained in another (ticking in brick) scores well below it."""
    ys, xs = np.nonzero(region)
    on = ink[ys, xs].astype(np.float64)
    n, total = float(len(ys)), float(on.sum())
    out = {}
    for p in sorted({t.shape[0] for t in TILES.values()}):
        phase = (ys % p) * p + (xs % p)
        ink_at = np.bincount(phase, weights=on, minlength=p * p)      # ink pixels at each tile phase
        all_at = np.bincount(phase, minlength=p * p).astype(np.float64)
        names, t, starts = _tiles_of_period(p)
        # sums of whole counts: exact in float64 whatever the order, so the same numbers as one tile at a time
        best = np.maximum.reduceat(_correlation(n, total, t @ all_at, t @ ink_at), starts)
        out.update({name: float(b) for name, b in zip(names, best, strict=True)})
    out = {name: out[name] for name in TILES}  # the tiles' own order: max() breaks ties by it
    dx, dy = xs + 0.5 - cx, ys + 0.5 - cy
    ring, angle = np.hypot(dx, dy), np.arctan2(dy, dx)
    candidates = {"bullseye": [(ring + s) % 8 < 4 for s in range(8)],
                  "sunburst": [np.floor((angle + np.pi + a) / (np.pi / 6)) % 2 == 0
                               for a in np.linspace(0, np.pi / 6, 6, endpoint=False)]}
    for name, masks in candidates.items():
        out[name] = max(float(_correlation(n, total, m.sum(), (m * on).sum())) for m in masks)
    return out


def read_discs(image: np.ndarray) -> list[Disc]:
    """The discs of a uint8 [H, W, 3] image, largest first."""
    rgb = image.astype(np.float32)
    dist = np.linalg.norm(rgb[:, :, None, :] - INK[None, None], axis=-1)   # [H, W, 4]
    nearest = dist.argmin(-1)
    mx, mn = rgb.max(-1), rgb.min(-1)
    saturated = (mx - mn) / np.maximum(mx, 1) > 0.45
    # ink vs paper along the segment between the pixel's nearest ink colour and the paper tone
    paper = np.array(PAPER, np.float32)
    toward = INK[nearest] - paper
    t = ((rgb - paper) * toward).sum(-1) / (toward * toward).sum(-1)
    is_paper = (mn > 200) & ((mx - mn) < 40)
    is_ink = saturated & (dist.min(-1) < 110)
    labels, count = _components(is_ink | is_paper)
    found = []
    for label in range(1, count + 1):
        region = labels == label
        area = int(region.sum())
        if area < MIN_DISC_AREA:
            continue
        ys, xs = np.nonzero(region)
        cx, cy = float(xs.mean() + 0.5), float(ys.mean() + 0.5)
        ink = t > 0.5
        inked = region & ink
        color = INK_NAMES[int(np.bincount(nearest[inked], minlength=len(INK)).argmax())] if inked.any() else "none"
        scores = _pattern_agreements(ink, region, cx, cy)
        best = max(scores, key=scores.get)
        side = image.shape[0]
        found.append(Disc(color, best if scores[best] >= MIN_AGREEMENT else None, scores[best], area, cx / side,
                          cy / side))
    found = sorted(found, key=lambda d: -d.area)
    # a fragment under a sixth of the largest disc's area is a stray blot, not another disc
    return [d for d in found if d.area >= found[0].area / 6] if found else found


def judge(scene: TailScene, discs: list[Disc]) -> bool:
    """Whether the discs read from an image satisfy the scene's caption: its count, colour and pattern."""
    return len(discs) == scene.count and all(d.pattern == scene.pattern and d.color == scene.color for d in discs)


def accuracy(images: np.ndarray, scenes: list[TailScene], frequencies: Frequencies | None = None) -> dict:
    """Accuracy of images [N, H, W, 3] against their scenes, overall, per bucket and per pattern."""
    frequencies = frequencies or Frequencies()
    hits = np.array([judge(s, read_discs(im)) for im, s in zip(images, scenes, strict=True)], dtype=bool)
    buckets = np.array([frequencies.bucket(s.pattern) for s in scenes])
    patterns = np.array([s.pattern for s in scenes])
    by_bucket = {b: float(hits[buckets == b].mean()) for b in BUCKETS if (buckets == b).any()}
    return {"overall": float(hits.mean()), "by_bucket": by_bucket,
            "by_pattern": {p: float(hits[patterns == p].mean()) for p in frequencies.ranking if (patterns == p).any()},
            "counts": {b: int((buckets == b).sum()) for b in BUCKETS}, "correct": hits.tolist()}


# ----------------------------------------------------------------------------------------------------------
# Prompt files and generated folders


def prompt_records(split: str, per_pattern: int, size: int, seed: int = 0, zipf_s: float = 2.0) -> list[dict]:
    """GenEval-style records of the first per_pattern x patterns items of an evaluation split (every pattern
    equally often), each carrying its scene, its bucket and how often the base saw its pattern in training."""
    from arrag.demo.tail import PATTERNS, TailWorld

    frequencies = Frequencies(zipf_s=zipf_s, seed=seed)
    world = TailWorld(split, seed=seed, size=size, frequencies=frequencies)
    out = []
    for i in range(per_pattern * len(PATTERNS)):
        scene = world.scene(i)
        out.append({"tag": frequencies.bucket(scene.pattern), "prompt": scene.caption,
                    "include": [{"class": scene.pattern, "count": scene.count, "color": scene.color}],
                    "scene": scene.to_dict(), "world": "tail", "split": split, "index": i, "seed": seed, "size": size,
                    "zipf_s": zipf_s, "rank": frequencies.ranking.index(scene.pattern) + 1})
    return out


def scene_from_dict(d: dict) -> TailScene:
    return TailScene.from_dict(d)


def is_prompt_file(path) -> bool:
    """True when `path` is a TailWorld prompt file arrag wrote (its first record holds a TailWorld scene)."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            first = json.loads(f.readline())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(first, dict) and first.get("world") == "tail" and "scene" in first


def score_folder(folder, vq_source, reference_count: int = 480, trust_checkpoint: bool = False) -> dict:
    """Accuracy per bucket and realism FID (VQ-encoder features, against rendered ground truth of the records'
    split) of a geneval-layout folder generated from a TailWorld prompt file."""
    from arrag.demo.score import VQEncoderFeatures, read_generated, realism_fid
    from arrag.demo.tail import TailWorld
    from arrag.vq import load_vq

    images, scenes, records = read_generated(folder, scene_from_dict)
    r = records[0]
    frequencies = Frequencies(zipf_s=r.get("zipf_s", 2.0), seed=r.get("seed", 0))
    result = accuracy(images, scenes, frequencies)
    world = TailWorld(r["split"], seed=r.get("seed", 0), size=images.shape[1], frequencies=frequencies)
    reference = world.images(10_000, reference_count)
    features = VQEncoderFeatures(load_vq(vq_source, trust_checkpoint=trust_checkpoint), images.shape[1])
    result.pop("correct")
    return {**result, "realism_fid": realism_fid(images, reference, features), "images": len(images),
            "reference_images": reference_count}
