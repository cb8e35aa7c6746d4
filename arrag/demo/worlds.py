"""The demo worlds as values: what the recipe, the demo pipeline and the app take to work on one of them.

A world is its renderer (seeded splits of scenes with captions), its caption vocabulary, where its shipped
weights and its demo retriever live, and its scorer. `tail` (TailWorld, the long tail: the database knows what
the base saw rarely) is the default; `shapes` (ShapesWorld, in-distribution: the database knows nothing new) is
one flag away.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ASSETS_ROOT = Path(__file__).resolve().parent / "assets"
WORLD_NAMES = ("tail", "shapes")
DEFAULT_WORLD = "tail"


# What a demo model folder's recipe.json leaves out (models made elsewhere have none): the recipe's defaults.
RECIPE_DEFAULTS = {"image_size": 64, "zipf_s": 2.0, "shape": "L"}


def assets_report(assets: Path) -> dict:
    """<assets>/recipe.json as written by the recipe (settings, losses, train_counts, ...), or {} without one."""
    path = Path(assets) / "recipe.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def recipe_settings(report: dict) -> dict:
    """The settings in an assets_report over RECIPE_DEFAULTS: one reader, so the demo and the app build the same
    retriever for the same models (image size, Zipf law, neighbourhood)."""
    return {**RECIPE_DEFAULTS, **report.get("recipe", {})}


@dataclass(frozen=True)
class World:
    """One demo world. `split(name, seed, size, **params)` gives a split with scene(i), image(i), images(start, n);
    each scene has .caption and .object_cells(grid)."""

    name: str
    title: str
    split: Callable
    vocabulary: Callable[[], list[str]]
    assets: Path
    retriever: Path
    params: dict = field(default_factory=dict)  # the world's own settings (TailWorld: its Zipf exponent)


def _shapes_split(name: str, seed: int = 0, size: int = 64, **_):
    from arrag.demo.shapes import ShapesWorld

    return ShapesWorld(name, seed=seed, size=size)


def _shapes_vocabulary() -> list[str]:
    from arrag.demo.presets import shapes_vocabulary

    return shapes_vocabulary()


def _tail_split(name: str, seed: int = 0, size: int = 64, zipf_s: float = 2.0, **_):
    from arrag.demo.tail import Frequencies, TailWorld

    return TailWorld(name, seed=seed, size=size, frequencies=Frequencies(zipf_s=zipf_s, seed=seed))


def _tail_vocabulary() -> list[str]:
    from arrag.demo.tail import COLORS, NUMBER_WORDS, PATTERNS

    words = {"a", "an", "and", "of", "photo", ":", ".", ","} | set(COLORS) | set(NUMBER_WORDS.values())
    return sorted(words | set(PATTERNS) | {p + "s" for p in PATTERNS})


WORLDS: dict[str, World] = {
    "shapes": World("shapes", "ShapesWorld", _shapes_split, _shapes_vocabulary, ASSETS_ROOT,
                    Path("data/retriever/demo_L")),
    "tail": World("tail", "TailWorld", _tail_split, _tail_vocabulary, ASSETS_ROOT / "tail",
                  Path("data/retriever/tail")),
}


def get_world(name: str) -> World:
    """The world of that name; a one-line error naming the choices otherwise."""
    from arrag.errors import ArragError

    if name not in WORLDS:
        raise ArragError(f"--world {name!r}: choose {' or '.join(WORLD_NAMES)}")
    return WORLDS[name]
