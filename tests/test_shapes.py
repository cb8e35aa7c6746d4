import numpy as np
import pytest

from arrag.demo.shapes import CATEGORIES, COLORS, SHAPES, ShapesWorld


def test_renderer_is_deterministic_and_split_dependent():
    a = ShapesWorld("train", seed=0, size=32)
    b = ShapesWorld("train", seed=0, size=32)
    np.testing.assert_array_equal(a.images(3, 4), b.images(3, 4))
    np.testing.assert_array_equal(a.image(5), a.images(5, 1)[0])  # item i does not depend on the slice
    assert a.scene(5) == b.scene(5)
    assert not np.array_equal(a.image(0), ShapesWorld("test", seed=0, size=32).image(0))
    assert not np.array_equal(a.image(0), ShapesWorld("train", seed=1, size=32).image(0))


def test_scenes_match_their_captions():
    w = ShapesWorld("validation", size=64)
    for i in range(60):
        s = w.scene(i)
        assert s.category == CATEGORIES[i % len(CATEGORIES)]
        for o in s.objects:
            assert o.shape in SHAPES and o.color in COLORS
            assert o.shape in s.caption or s.category == "counting"
        if s.category == "position":
            a, b = s.objects
            dx, dy = a.cx - b.cx, a.cy - b.cy
            assert {"left of": dx < 0, "right of": dx > 0, "above": dy < 0, "below": dy > 0}[s.relation]
        if s.category == "counting":
            assert s.caption.split()[0] == {2: "two", 3: "three", 4: "four"}[len(s.objects)]
        if s.category in ("colors", "color_attr"):
            assert all(o.color in s.caption for o in s.objects)
    img = w.image(0)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8


def test_unknown_split_is_clear():
    with pytest.raises(ValueError, match="unknown ShapesWorld split 'dev'"):
        ShapesWorld("dev")
