"""TailWorld: named textile patterns seen with long-tailed (Zipf) frequencies, for the demo where retrieval pays.

Each image holds a disc near the middle filled with a pattern (gingham, chevron, houndstooth, ...) drawn in one ink
colour on white, on a plain grey background; the caption names the colour and the pattern ("a red gingham"; with
`two_fraction` > 0, some scenes hold two smaller discs: "two blue chevrons"). A pattern is a binary tile repeated
over the whole image from its origin (the radial ones from the disc's centre), so its local structure, the texture
a few tokens wide, is what tells one pattern from another: the structure AR-RAG's patch neighbourhoods see.

The training split draws patterns by Zipf's law over a fixed, seeded ranking (the base sees the head thousands of
times and the tail a few dozen); the database and the evaluation splits hold every pattern evenly; a control
database holds only the head and torso. Every image is a pure function of (seed, split, index).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (205, 35, 35),
    "green": (30, 140, 55),
    "blue": (35, 70, 200),
    "orange": (235, 125, 20),
}
PAPER = (245, 243, 236)  # the pattern's light tone
BACKGROUND = (148, 148, 148)  # a plain grey: the world is about the patterns
NUMBER_WORDS = {1: "a", 2: "two"}
SPLIT_SEEDS = {"train": 11, "database": 12, "control_database": 13, "validation": 14, "test": 15}


def _tile(rows: list[str]) -> np.ndarray:
    """A binary tile from strings of '#' (ink) and '.' (paper), each character one pixel."""
    return np.array([[c == "#" for c in r] for r in rows], dtype=bool)


def _grid_tile(period: int, fn) -> np.ndarray:
    y, x = np.mgrid[0:period, 0:period]
    return np.asarray(fn(x, y), dtype=bool)


_HOUNDSTOOTH = np.kron(_tile([  # the classic 8x8 tooth, drawn at 2 px a cell: a 16-px tile
    "####....",
    "#####...",
    "######..",
    ".####..#",
    "....####",
    "...#####",
    "..######",
    "#..####.",
]), np.ones((2, 2), dtype=bool))

# Periodic patterns: a tile (repeated from the image origin). Features are 2-8 px; a token is 4 px. (The first
# pilot's VQ read the 2-px houndstooth, crosshatch and dot grid as gingham: they are drawn coarser now.)
TILES: dict[str, np.ndarray] = {
    "pinstripe": _grid_tile(8, lambda x, y: x % 8 < 2),
    "awning": _grid_tile(8, lambda x, y: x % 8 < 4),
    "ticking": _grid_tile(8, lambda x, y: y % 8 < 2),
    "banded": _grid_tile(16, lambda x, y: y % 16 < 8),
    "twill": _grid_tile(8, lambda x, y: (x + y) % 8 < 4),
    "slant": _grid_tile(8, lambda x, y: (x - y) % 8 < 4),
    "gingham": _grid_tile(8, lambda x, y: (x // 4 + y // 4) % 2 == 0),
    "checker": _grid_tile(16, lambda x, y: (x // 8 + y // 8) % 2 == 0),
    "polka": _grid_tile(8, lambda x, y: (abs(x - 3.5) < 2) & (abs(y - 3.5) < 2)),
    "lattice": _grid_tile(8, lambda x, y: (x % 8 < 2) | (y % 8 < 2)),
    "windowpane": _grid_tile(16, lambda x, y: (x % 16 < 3) | (y % 16 < 3)),
    "crosshatch": _grid_tile(12, lambda x, y: ((x + y) % 12 < 3) | ((x - y) % 12 < 3)),
    "chevron": _grid_tile(8, lambda x, y: (y + np.abs(x % 8 - 4)) % 8 < 4),
    "herringbone": _grid_tile(16, lambda x, y: np.where(x // 8 % 2 == 0, (x + y) % 8, (y - x) % 8) < 4),
    "brick": _grid_tile(16, lambda x, y: (y % 8 < 2) | (((x + 8 * (y // 8 % 2)) % 16) < 2)),
    "basketweave": _grid_tile(16, lambda x, y: np.where((x // 8 + y // 8) % 2 == 0, y % 4 < 2, x % 4 < 2)),
    "houndstooth": _HOUNDSTOOTH,
    "argyle": _grid_tile(16, lambda x, y: np.abs(x - 7.5) + np.abs(y - 7.5) < 6),
    "tartan": _grid_tile(16, lambda x, y: (x % 16 < 4) ^ (y % 16 < 4)),
    "dotgrid": _grid_tile(12, lambda x, y: (x % 12 < 4) & (y % 12 < 4)),
    "ripple": _grid_tile(16, lambda x, y: (y + np.round(2 * np.sin(2 * np.pi * x / 16))).astype(int) % 8 < 4),
    "zigzag": _grid_tile(16, lambda x, y: (y + np.abs(x % 16 - 8)) % 16 < 5),
}
# Patterns about the disc's centre: ink where f(dx, dy) holds (dx, dy in pixels from the centre).
RADIAL = {
    "bullseye": lambda dx, dy: np.hypot(dx, dy) % 8 < 4,
    "sunburst": lambda dx, dy: (np.floor((np.arctan2(dy, dx) + np.pi) / (np.pi / 6)) % 2) == 0,
}
PATTERNS: tuple[str, ...] = tuple(TILES) + tuple(RADIAL)


def pattern_ranking(seed: int = 0) -> list[str]:
    """Every pattern, most frequent in training first: a seeded permutation (no pattern is the head by design)."""
    order = np.random.default_rng([seed, 99]).permutation(len(PATTERNS))
    return [PATTERNS[i] for i in order]


def zipf_weights(n: int, s: float) -> np.ndarray:
    """p_k proportional to k^-s for ranks k = 1..n, summing to 1."""
    w = np.arange(1, n + 1, dtype=np.float64) ** -s
    return w / w.sum()


@dataclass(frozen=True)
class Frequencies:
    """How often the base sees each pattern: Zipf's law over the ranking; buckets by rank."""

    zipf_s: float = 2.0
    head: int = 4     # ranks 1..head
    torso: int = 6    # the next `torso` ranks; the rest is the tail
    seed: int = 0

    @property
    def ranking(self) -> list[str]:
        return pattern_ranking(self.seed)

    @property
    def weights(self) -> np.ndarray:
        return zipf_weights(len(PATTERNS), self.zipf_s)

    def bucket(self, pattern: str) -> str:
        r = self.ranking.index(pattern)
        return "head" if r < self.head else "torso" if r < self.head + self.torso else "tail"

    def patterns(self, bucket: str) -> list[str]:
        return [p for p in self.ranking if self.bucket(p) == bucket]

    def expected_counts(self, train_images: int) -> dict[str, float]:
        """Expected training images of each pattern among `train_images`."""
        return {p: float(w * train_images) for p, w in zip(self.ranking, self.weights, strict=True)}


BUCKETS = ("head", "torso", "tail")


@dataclass
class Disc:
    cx: float  # centre, as a fraction of the image side
    cy: float
    r: float   # radius, as a fraction of the image side


@dataclass
class TailScene:
    pattern: str
    color: str
    discs: list[Disc] = field(default_factory=list)
    background: tuple[int, int, int] = (150, 150, 150)
    caption: str = ""

    @property
    def count(self) -> int:
        return len(self.discs)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TailScene:
        return cls(d["pattern"], d["color"], [Disc(**c) for c in d["discs"]], tuple(d["background"]), d["caption"])

    def object_cells(self, grid: int, margin: int = 1) -> np.ndarray:
        """bool [grid, grid]: token cells covering a disc, grown by `margin` cells."""
        mask = np.zeros((grid, grid), dtype=bool)
        for d in self.discs:
            lo = np.floor(np.array([d.cy - d.r, d.cx - d.r]) * grid).astype(int) - margin
            hi = np.ceil(np.array([d.cy + d.r, d.cx + d.r]) * grid).astype(int) + margin
            mask[max(lo[0], 0):hi[0], max(lo[1], 0):hi[1]] = True
        return mask


def caption_for(pattern: str, color: str, count: int) -> str:
    article = ("an" if color[0] in "aeiou" else "a") if count == 1 else NUMBER_WORDS[count]
    return f"{article} {color} {pattern}" + ("s" if count > 1 else "")


def pattern_mask(pattern: str, size: int, centre: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """bool [size, size]: where `pattern` puts ink over a whole image (radial patterns about `centre`)."""
    if pattern in TILES:
        t = TILES[pattern]
        reps = (-(-size // t.shape[0]), -(-size // t.shape[1]))
        return np.tile(t, reps)[:size, :size]
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    return RADIAL[pattern](x - centre[0], y - centre[1])


def render_scene(scene: TailScene, size: int = 64) -> np.ndarray:
    """uint8 [size, size, 3]: the background, then each disc filled with the pattern in ink on paper. Pixel-exact
    (no anti-aliasing): a pattern's edges are what its tokens encode."""
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = scene.background
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    ink, paper = np.array(COLORS[scene.color], np.uint8), np.array(PAPER, np.uint8)
    for d in scene.discs:
        cx, cy, r = d.cx * size, d.cy * size, d.r * size
        inside = np.hypot(x - cx, y - cy) <= r
        m = pattern_mask(scene.pattern, size, (cx, cy))
        img[inside & m] = ink
        img[inside & ~m] = paper
    return img


def _discs(rng: np.random.Generator, count: int) -> list[Disc]:
    """One large disc near the centre (radius 16-24 px at 64 px, centre within 2.5 px of the middle), or two medium
    ones (11-14 px) anywhere, apart."""
    if count == 1:
        r = float(rng.uniform(0.25, 0.37))
        c = 0.5 + rng.uniform(-0.04, 0.04, size=2)
        return [Disc(float(c[0]), float(c[1]), r)]
    lo, hi = 0.17, 0.22
    for _ in range(200):
        out: list[Disc] = []
        for _ in range(count):
            r = float(rng.uniform(lo, hi))
            c = rng.uniform(r + 0.03, 1 - r - 0.03, size=2)
            if all(np.hypot(c[0] - o.cx, c[1] - o.cy) > r + o.r + 0.05 for o in out):
                out.append(Disc(float(c[0]), float(c[1]), r))
        if len(out) == count:
            return out
    raise RuntimeError("could not place the discs; this is a bug in TailWorld's sizes")


class TailWorld:
    """Deterministic access to a split: item i depends only on (seed, split, i).

    train: patterns by Zipf's law (Frequencies); database: every pattern evenly (item i has pattern i mod n);
    control_database: the head and torso patterns evenly (no tail pattern at all); validation and test: every
    pattern evenly, so each bucket is measured on its own prompts."""

    def __init__(self, split: str = "train", seed: int = 0, size: int = 64, frequencies: Frequencies | None = None,
                 two_fraction: float = 0.0):
        if split not in SPLIT_SEEDS:
            raise ValueError(f"unknown TailWorld split {split!r}; choose one of {', '.join(SPLIT_SEEDS)}")
        self.split, self.seed, self.size = split, seed, size
        self.frequencies = frequencies or Frequencies(seed=seed)
        self.two_fraction = two_fraction
        ranking = self.frequencies.ranking
        self._even = ranking if split != "control_database" else \
            self.frequencies.patterns("head") + self.frequencies.patterns("torso")
        self._cdf = np.cumsum(self.frequencies.weights)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLIT_SEEDS[self.split], index])

    def pattern_of(self, index: int) -> str:
        if self.split == "train":
            u = self._rng(index).random()
            return self.frequencies.ranking[min(int(np.searchsorted(self._cdf, u)), len(self._cdf) - 1)]
        return self._even[index % len(self._even)]

    def scene(self, index: int) -> TailScene:
        rng = self._rng(index)
        rng.random()  # the draw pattern_of uses
        pattern = self.pattern_of(index)
        color = str(rng.choice(list(COLORS)))
        count = 2 if rng.random() < self.two_fraction else 1
        background = BACKGROUND
        discs = _discs(rng, count)
        return TailScene(pattern, color, discs, background, caption_for(pattern, color, count))

    def image(self, index: int) -> np.ndarray:
        """uint8 [size, size, 3] for item `index`."""
        return render_scene(self.scene(index), self.size)

    def images(self, start: int, count: int) -> np.ndarray:
        """uint8 [count, size, size, 3] for items start .. start+count-1."""
        return np.stack([self.image(i) for i in range(start, start + count)])


def bucket_of_caption(caption: str | None, seed: int = 0) -> str:
    """The frequency bucket of the pattern a TailWorld caption names ('other' when it names none); buckets follow
    the seeded ranking alone, not the Zipf exponent."""
    frequencies = Frequencies(seed=seed)
    for word in (caption or "").split():
        name = word[:-1] if word.endswith("s") and word[:-1] in PATTERNS else word
        if name in PATTERNS:
            return frequencies.bucket(name)
    return "other"
