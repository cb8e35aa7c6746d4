"""The scorer of a world's split: accuracy of images against their scenes, read from pixels."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace


def scorer_for(split) -> SimpleNamespace:
    """An object with .accuracy(images [N, H, W, 3], scenes) for a ShapesWorld or TailWorld split."""
    from arrag.demo.tail import TailWorld

    if isinstance(split, TailWorld):
        from arrag.demo.tail_score import accuracy

        return SimpleNamespace(accuracy=partial(accuracy, frequencies=split.frequencies))
    from arrag.demo.score import accuracy

    return SimpleNamespace(accuracy=accuracy)
