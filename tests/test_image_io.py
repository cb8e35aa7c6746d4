import numpy as np
import pytest
import torch
from PIL import Image

from arrag.errors import ArragError
from arrag.image_io import center_crop_arr, load_rgb, make_grid, save_image, to_tensor, to_uint8


def test_center_crop_sizes_and_centre():
    # A wide image with a marker in the middle: the crop is square and keeps the centre.
    arr = np.zeros((300, 900, 3), np.uint8)
    arr[140:160, 440:460] = 255
    out = center_crop_arr(Image.fromarray(arr), 64)
    assert out.size == (64, 64)
    o = np.asarray(out)
    assert o[32, 32].mean() > 128 and o[0, 0].mean() < 10


def test_center_crop_box_halving_then_bicubic():
    # 1000px: BOX-halve to 500 and to 250 (both sides still >= 2*200 before each halving), then BICUBIC to 200.
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1000, 1000, 3), dtype=np.uint8))
    ref = im.resize((500, 500), Image.BOX).resize((250, 250), Image.BOX).resize((200, 200), Image.BICUBIC)
    np.testing.assert_array_equal(np.asarray(center_crop_arr(im, 200)), np.asarray(ref))


def test_tensor_round_trip_is_exact_for_uint8():
    arr = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    t = to_tensor(arr)
    assert t.shape == (2, 3, 8, 8) and float(t.min()) >= -1 and float(t.max()) <= 1
    np.testing.assert_array_equal(to_uint8(t), arr)
    assert to_uint8(t * 10).max() == 255 and to_uint8(t * 10).min() == 0  # clamped
    # Janus-Pro's generation scripts truncate (x + 1) / 2 * 255: 0.3 -> 165.75 -> 165 (LlamaGen's rounds to 166).
    x = torch.full((1, 3, 1, 1), 0.3)
    assert to_uint8(x, "janus")[0, 0, 0, 0] == 165 and to_uint8(x)[0, 0, 0, 0] == 166


def test_load_and_save(tmp_path):
    arr = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    p = save_image(arr, tmp_path / "a.png")
    np.testing.assert_array_equal(np.asarray(load_rgb(p)), arr)
    assert not list(tmp_path.glob("*.tmp"))
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ArragError, match="cannot read image .*bad.jpg"):
        load_rgb(tmp_path / "bad.jpg")
    with pytest.raises(ArragError, match="image not found"):
        load_rgb(tmp_path / "missing.png")
    with pytest.raises(ArragError, match=r"use a .png, .jpg or .webp name"):
        save_image(arr, tmp_path / "a.tiff")


def test_make_grid_places_tiles():
    ims = np.stack([np.full((4, 4, 3), i * 50, np.uint8) for i in range(3)])
    g = make_grid(ims, ncol=2, pad=1)
    assert g.shape == (9, 9, 3)
    assert g[0, 0, 0] == 0 and g[0, 5, 0] == 50 and g[5, 0, 0] == 100 and g[5, 5, 0] == 255


def test_original_resize_is_torchvision_resize_then_center_crop():
    """AR-RAG encoded its database with torchvision Resize(384) + CenterCrop(384): short side to the size
    (long side truncated), bilinear, then a crop whose offsets round half to even."""
    from arrag.image_io import resize_crop

    im = Image.fromarray(np.random.default_rng(2).integers(0, 255, (500, 300, 3), dtype=np.uint8))
    expected = im.resize((64, 106), Image.BILINEAR).crop((0, 21, 64, 85))  # 64*500/300 = 106.7 -> 106
    np.testing.assert_array_equal(np.asarray(resize_crop(im, 64)), np.asarray(expected))
    wide = Image.fromarray(np.random.default_rng(3).integers(0, 255, (100, 201, 3), dtype=np.uint8))
    got = resize_crop(wide, 100)  # no resize (short side already 100); (201 - 100) / 2 = 50.5 rounds to 50
    np.testing.assert_array_equal(np.asarray(got), np.asarray(wide)[:, 50:150])
    assert not np.array_equal(np.asarray(resize_crop(im, 64, "adm")), np.asarray(resize_crop(im, 64)))
    with pytest.raises(ArragError, match="--resize 'box': choose original or adm"):
        resize_crop(im, 64, "box")


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    rgb = np.asarray(load_rgb(tmp_path / "deep.png"))
    assert rgb.shape == (64, 64, 3) and rgb.min() == 0 and rgb.max() == 255
    np.testing.assert_array_equal(rgb[..., 0], np.rint(ramp / 257.0).astype(np.uint8))  # 65535 -> 255, linear


def test_absurd_sizes_are_refused_from_the_header(tmp_path):
    from arrag.image_io import ImageRejected, check_size, open_rgb

    Image.fromarray(np.zeros((20, 2000), np.uint8)).save(tmp_path / "strip.png")
    with pytest.raises(ImageRejected, match="aspect ratio 100:1"):
        open_rgb(tmp_path / "strip.png")
    with pytest.raises(ArragError, match="refusing image .*strip.png: aspect ratio"):
        load_rgb(tmp_path / "strip.png")
    with pytest.raises(ImageRejected, match="too many pixels"):
        check_size((20_000, 20_000))
    check_size((4000, 3000))
