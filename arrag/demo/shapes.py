"""ShapesWorld: seeded images of coloured shapes with compositional captions and ground-truth metadata.

Every image is a pure function of (split seed, index), so any slice of any split can be re-rendered
exactly. Captions follow GenEval's six categories: single object, two objects, counting, colours,
position and colour attribution.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES: dict[str, float] = {"small": 0.10, "medium": 0.14, "large": 0.19}  # half-extent as a fraction of the side
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
SPLIT_SEEDS = {"train": 1, "database": 2, "validation": 3, "test": 4}


@dataclass
class ShapeObject:
    shape: str
    color: str
    size: str
    cx: float  # centre, as a fraction of the image side
    cy: float


@dataclass
class Scene:
    category: str
    caption: str
    objects: list[ShapeObject] = field(default_factory=list)
    background: tuple[tuple[int, int, int], tuple[int, int, int]] = ((200, 200, 200), (160, 160, 160))
    relation: str | None = None  # for "position": objects[0] <relation> objects[1]

    def to_dict(self) -> dict:
        return asdict(self)

    def object_cells(self, grid: int, margin: int = 1) -> np.ndarray:
        """bool [grid, grid]: token cells inside an object's bounding box, grown by `margin` cells."""
        mask = np.zeros((grid, grid), dtype=bool)
        for o in self.objects:
            r = SIZES[o.size]
            lo = np.floor(np.array([o.cy - r, o.cx - r]) * grid).astype(int) - margin
            hi = np.ceil(np.array([o.cy + r, o.cx + r]) * grid).astype(int) + margin
            mask[max(lo[0], 0):hi[0], max(lo[1], 0):hi[1]] = True
        return mask


def _place(rng: np.random.Generator, sizes: list[str], constraint=None, tries: int = 200) -> list[tuple[float, float]]:
    """Non-overlapping centres for objects of the given sizes; `constraint(centres)` may reject a layout."""
    for _ in range(tries):
        centres = []
        for s in sizes:
            r = SIZES[s]
            for _ in range(50):
                c = (float(rng.uniform(r + 0.03, 1 - r - 0.03)), float(rng.uniform(r + 0.03, 1 - r - 0.03)))
                clear = (np.hypot(c[0] - o[0], c[1] - o[1]) > r + SIZES[os] + 0.04
                         for o, os in zip(centres, sizes, strict=False))
                if all(clear):
                    centres.append(c)
                    break
            else:
                break
        if len(centres) == len(sizes) and (constraint is None or constraint(centres)):
            return centres
    raise RuntimeError("could not place shapes; this is a bug in the ShapesWorld sizes")


def _relation_holds(rel: str, a: tuple[float, float], b: tuple[float, float], margin: float = 0.15) -> bool:
    dx, dy = a[0] - b[0], a[1] - b[1]
    return {"left of": dx < -margin and abs(dy) < abs(dx),
            "right of": dx > margin and abs(dy) < abs(dx),
            "above": dy < -margin and abs(dx) < abs(dy),
            "below": dy > margin and abs(dx) < abs(dy)}[rel]


def _a(word: str) -> str:
    """'a' or 'an' before `word`."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def sample_scene(rng: np.random.Generator, category: str | None = None) -> Scene:
    """Draw one scene (objects, background, caption) of the given or a random GenEval-style category."""
    category = category or str(rng.choice(CATEGORIES))
    pick = lambda seq: str(rng.choice(seq))  # noqa: E731
    size = lambda: pick(list(SIZES))  # noqa: E731
    relation = None
    if category == "single_object":
        shapes, colors = [pick(SHAPES)], [pick(list(COLORS))]
        caption = _a(shapes[0])
    elif category == "two_object":
        shapes = [str(s) for s in rng.choice(SHAPES, 2, replace=False)]
        colors = [pick(list(COLORS)) for _ in shapes]
        caption = f"{_a(shapes[0])} and {_a(shapes[1])}"
    elif category == "counting":
        n = int(rng.integers(2, 5))
        shapes, colors = [pick(SHAPES)] * n, [pick(list(COLORS))] * n
        caption = f"{NUMBER_WORDS[n]} {shapes[0]}s"
    elif category == "colors":
        shapes, colors = [pick(SHAPES)], [pick(list(COLORS))]
        caption = _a(f"{colors[0]} {shapes[0]}")
    elif category == "position":
        shapes = [str(s) for s in rng.choice(SHAPES, 2, replace=False)]
        colors = [pick(list(COLORS)) for _ in shapes]
        relation = pick(RELATIONS)
        caption = f"{_a(shapes[0])} {relation} {_a(shapes[1])}"
    elif category == "color_attr":
        shapes = [str(s) for s in rng.choice(SHAPES, 2, replace=False)]
        colors = [str(c) for c in rng.choice(list(COLORS), 2, replace=False)]
        caption = f"{_a(colors[0] + ' ' + shapes[0])} and {_a(colors[1] + ' ' + shapes[1])}"
    else:
        raise ValueError(f"unknown ShapesWorld category {category!r}; choose one of {', '.join(CATEGORIES)}")
    sizes = [size() for _ in shapes]
    if category == "counting":
        sizes = [sizes[0]] * len(shapes) if len(shapes) <= 3 else ["small"] * len(shapes)
    constraint = (lambda c: _relation_holds(relation, c[0], c[1])) if relation else None
    centres = _place(rng, sizes, constraint)
    # Muted backgrounds (low saturation) so that object colours stand out for the scorer.
    base = rng.integers(120, 225, size=3)
    grey = int(base.mean())
    bg0 = tuple(int(0.7 * grey + 0.3 * v) for v in base)
    bg1 = tuple(int(max(0, min(255, v + rng.integers(-50, 50)))) for v in bg0)
    objects = [ShapeObject(s, c, z, cx, cy) for s, c, z, (cx, cy) in zip(shapes, colors, sizes, centres, strict=True)]
    return Scene(category, caption, objects, (bg0, bg1), relation)


def _draw_shape(draw: ImageDraw.ImageDraw, obj: ShapeObject, side: int) -> None:
    cx, cy, r = obj.cx * side, obj.cy * side, SIZES[obj.size] * side
    fill = COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif obj.shape == "square":
        s = r * 0.9
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render_scene(scene: Scene, size: int = 128, seed: int = 0, supersample: int = 2) -> np.ndarray:
    """Render a scene to uint8 [size, size, 3]: a diagonal gradient with fine noise, then anti-aliased shapes."""
    side = size * supersample
    t = np.linspace(0.0, 1.0, side, dtype=np.float32)
    ramp = 0.5 * (t[:, None] + t[None, :])
    c0, c1 = (np.array(c, dtype=np.float32) for c in scene.background)
    bg = c0 + (c1 - c0) * ramp[..., None]
    noise = np.random.default_rng(seed).normal(0.0, 6.0, size=(side // 4, side // 4, 1)).astype(np.float32)
    bg = bg + np.kron(noise, np.ones((4, 4, 1), dtype=np.float32))  # blocky texture: local structure to learn
    im = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for obj in scene.objects:
        _draw_shape(draw, obj, side)
    if supersample > 1:
        im = im.resize((size, size), resample=Image.BOX)
    return np.asarray(im)


class ShapesWorld:
    """Deterministic access to a split: item i depends only on (seed, split, i)."""

    def __init__(self, split: str = "train", seed: int = 0, size: int = 128, categories: tuple[str, ...] | None = None):
        if split not in SPLIT_SEEDS:
            raise ValueError(f"unknown ShapesWorld split {split!r}; choose one of {', '.join(SPLIT_SEEDS)}")
        self.split, self.seed, self.size = split, seed, size
        self.categories = categories or CATEGORIES

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLIT_SEEDS[self.split], index])

    def scene(self, index: int) -> Scene:
        rng = self._rng(index)
        return sample_scene(rng, self.categories[index % len(self.categories)])

    def noise_seed(self, index: int) -> int:
        """The seed of item `index`'s background noise (render_scene's `seed`)."""
        return int(self._rng(index).integers(2**31))

    def image(self, index: int) -> np.ndarray:
        """uint8 [size, size, 3] for item `index`."""
        return render_scene(self.scene(index), self.size, seed=self.noise_seed(index))

    def images(self, start: int, count: int) -> np.ndarray:
        """uint8 [count, size, size, 3] for items start .. start+count-1."""
        return np.stack([self.image(i) for i in range(start, start + count)])
