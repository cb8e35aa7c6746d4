import numpy as np
import pytest

from arrag.demo.shapes import CATEGORIES, COLORS, SHAPES, Scene, ShapesWorld, render_scene


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


def test_object_cells_hold_every_object_pixel_and_nothing_far_from_them():
    w = ShapesWorld("train", size=64)
    for i in range(24):
        scene = w.scene(i)
        cells = scene.object_cells(16, margin=0)
        bare = Scene(scene.category, scene.caption, [], scene.background)  # the same background, no objects
        drawn = np.abs(w.image(i).astype(int) - render_scene(bare, 64, seed=w.noise_seed(i))).max(-1) > 8
        touched = drawn.reshape(16, 4, 16, 4).any((1, 3))
        assert touched.any() and not (touched & ~cells).any()  # every pixel an object changed lies in its cells
        grown = scene.object_cells(16, margin=1)
        assert (grown >= cells).all() and grown.sum() > cells.sum()
        assert cells.mean() < 0.6  # boxes, not the whole image
