"""Rendering: overlays blend the right colours, grids and timelines have the right geometry, PNGs round-trip."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from lightning_xai import render


def images_and_maps(b=2, size=32):
    torch.manual_seed(0)
    return torch.rand(b, 3, size, size) * 2 - 1, torch.rand(b, size, size)


def test_overlay_alpha_zero_is_the_unnormalised_image_upscaled():
    images, maps = images_and_maps()
    out = render.overlay(images, maps, alpha=0.0)
    assert out.dtype == np.uint8 and out.shape == (2, 96, 96, 3)
    expected = ((images * 0.5 + 0.5) * 255).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)
    np.testing.assert_array_equal(out[:, ::3, ::3], expected)
    assert render.overlay(torch.zeros(1, 3, 224, 224), torch.zeros(1, 224, 224)).shape == (1, 224, 224, 3)


def test_overlay_alpha_one_is_the_colormap():
    images = torch.zeros(1, 3, 32, 32)
    maps = torch.zeros(1, 32, 32)
    maps[0, :, 16:] = 1.0
    out = render.overlay(images, maps, alpha=1.0, size=None)
    jet = matplotlib.colormaps["jet"]
    np.testing.assert_array_equal(out[0, 0, 0], (np.array(jet(0.0)[:3]) * 255).round())
    np.testing.assert_array_equal(out[0, 0, 31], (np.array(jet(1.0)[:3]) * 255).round())


def test_overlay_resizes_patch_maps_and_takes_grey_images():
    grey = torch.zeros(2, 1, 32, 48)
    out = render.overlay(grey, torch.rand(2, 1, 4, 6), alpha=0.5, size=None)
    assert out.shape == (2, 32, 48, 3)


def test_overlay_errors():
    images, maps = images_and_maps()
    with pytest.raises(ValueError, match="alpha"):
        render.overlay(images, maps, alpha=2.0)
    with pytest.raises(ValueError, match="colormap"):
        render.overlay(images, maps, cmap="no-such-map")
    with pytest.raises(ValueError, match="B=2"):
        render.overlay(images, maps[:1])


def test_grid_geometry_and_padding():
    tiles = np.zeros((5, 10, 12, 3), np.uint8)
    out = render.grid(tiles, ncols=3, pad=2)
    assert out.shape == (2 * 10 + 3 * 2, 3 * 12 + 4 * 2, 3)
    assert (out[0] == 255).all() and (out[-12:, -14:] == 255).all()  # top pad row and the empty cell
    assert (out[2:12, 2:14] == 0).all()
    with pytest.raises(ValueError, match="ncols"):
        render.grid(tiles, ncols=0)


def test_caption_draws_text_in_a_band():
    tiles = np.zeros((2, 40, 64, 3), np.uint8)
    out = render.caption(tiles, ["square p=0.93", "a very long class name that does not fit"])
    assert out.shape == (2, 40 + render.BAND, 64, 3)
    band = out[:, : render.BAND]
    assert all(len(np.unique(b)) > 2 for b in band), "no text drawn"
    with pytest.raises(ValueError, match="one text per tile"):
        render.caption(tiles, ["one"])


def test_timeline_columns_keep_first_and_last():
    columns = render.timeline_columns(20, 8)
    assert columns[0] == 0 and columns[-1] == 19 and len(columns) == 8 and columns == sorted(set(columns))
    assert render.timeline_columns(3, 8) == [0, 1, 2]


def test_timeline_geometry_with_string_and_int_labels():
    frames = [np.full((3, 20, 20, 3), i * 10, np.uint8) for i in range(12)]
    labels = ["init"] + list(range(11))
    out = render.timeline(frames, labels, max_columns=5, row_labels=["#0", "#1", "#2"])
    body_width = 5 * 20 + 6 * 2
    assert out.shape == (render.BAND + 3 * 20 + 4 * 2, 28 + body_width, 3)
    # the last column shows the last frame
    assert (out[render.BAND + 2 : render.BAND + 22, -22:-2] == 110).all()
    with pytest.raises(ValueError, match="one label per frame"):
        render.timeline(frames, labels[:3])
    with pytest.raises(ValueError, match="at least one frame"):
        render.timeline([], [])


def test_save_png_round_trip(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (10, 14, 3), dtype=np.uint8)
    path = render.save_png(image, tmp_path / "a" / "b.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
