"""Rendering: overlays blend the right colours, grids and timelines have the right geometry, PNGs round-trip."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from lightning_xai import render
from lightning_xai.demos.data import FAMILIES


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
    assert out.shape == (2, 40 + render.band_height(2), 64, 3)
    band = out[:, : render.band_height(2)]
    assert all(len(np.unique(b)) > 2 for b in band), "no text drawn"
    assert render.caption(tiles, ["a", "b"], lines=1).shape == (2, 40 + render.BAND, 64, 3)
    with pytest.raises(ValueError, match="one text per tile"):
        render.caption(tiles, ["one"])


def drawn(lines, width, height):
    """The band a caption of ``lines`` should look like, drawn here with PIL directly (white on (32, 32, 32))."""
    band = Image.new("RGB", (width, height), (32, 32, 32))
    draw = ImageDraw.Draw(band)
    font = ImageFont.load_default(size=render.FONT_SIZE)
    for row, line in enumerate(lines):
        line = line.replace(" ", "  ")  # word gaps are drawn as two spaces (the font's space is 2 px wide)
        assert font.getbbox(line)[2] <= width - 1, f"{line!r} does not fit in {width} px"
        draw.text((1, row * render.line_height()), line, fill=(255, 255, 255), font=font)
    return np.asarray(band)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_caption_shows_class_name_and_probability_in_full_at_the_logged_size(family):
    """The callback's 32 px probes are logged as 96 px tiles: every demo class name and its probability must be
    drawn whole (wrapped to a second line when needed), pixel for pixel as PIL draws the unabridged text."""
    width = 32 * render.upscale_factor(32, 32)
    tiles = np.zeros((1, 96, width, 3), np.uint8)
    for name in FAMILIES[family]:
        for probability in (0.93, 1.0, 0.07):
            text = f"{name} p={probability:.2f}"
            lines = render.fit_caption(text, width)
            assert " ".join(lines) == text and lines[-1].endswith(f"p={probability:.2f}")
            band = render.caption(tiles, [text])[0, : render.band_height(2)]
            np.testing.assert_array_equal(band, drawn(lines, width, render.band_height(2)))
    one = render.caption(tiles, ["horizontal_stripes p=0.93"])[0, : render.band_height(2)]
    other = render.caption(tiles, ["horizontal_stripes p=0.98"])[0, : render.band_height(2)]
    assert (one != other).any(), "the probability is not drawn"


def test_caption_shortens_the_name_never_the_probability():
    lines = render.fit_caption("an_exceptionally_long_class_name p=0.93", 64)
    assert lines[-1] == "p=0.93" and lines[0].endswith("…") and len(lines) == 2
    (single,) = render.fit_caption("horizontal_stripes p=0.93", 96, lines=1)
    assert single.endswith(" p=0.93") and "…" in single and render.text_width(single) <= 94
    lines = render.fit_caption("alpha beta gamma p=0.5", 40, lines=2)  # four wrapped lines: the head is joined
    assert lines[-1] == "p=0.5" and lines[0].startswith("alpha") and lines[0].endswith("…")
    assert render.fit_caption("ep 3\nstep 192", 96) == ["ep 3", "step 192"]  # explicit line breaks kept
    step, prediction = render.fit_caption("ep 0 · step 0\nhorizontal_stripes p=0.03", 96)
    assert step == "ep 0 · step 0" and prediction.endswith("… p=0.03")
    with pytest.raises(ValueError, match="lines"):
        render.fit_caption("x", 10, lines=0)


def test_grids_match_a_grid_per_batch_entry():
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (3, 5, 6, 7, 3), dtype=np.uint8)
    out = render.grids(tiles, ncols=2, pad=1, pad_value=9)
    assert out.shape == (3, 3 * 6 + 4, 2 * 7 + 3, 3)
    for b in range(3):
        for i in range(5):
            r, c = divmod(i, 2)
            np.testing.assert_array_equal(out[b, 1 + r * 7 : 1 + r * 7 + 6, 1 + c * 8 : 1 + c * 8 + 7], tiles[b, i])
    assert (out[:, -7:-1, -8:-1] == 9).all()  # the sixth cell is empty
    np.testing.assert_array_equal(render.grid(tiles[1], ncols=2, pad=1, pad_value=9), out[1])


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


def test_probe_timelines_one_bounded_picture_per_probe():
    frames = [np.full((3, 20, 20, 3), i * 10, np.uint8) for i in range(12)]
    labels = ["start\nstep 0"] + [f"ep {i}\nstep {i * 48}" for i in range(11)]
    out = render.probe_timelines(frames, labels, max_frames=8, columns=4, tile_size=None)
    band = render.band_height(2)
    assert out.shape == (3, 2 * (band + 20 + 2) + 2, 4 * 22 + 2, 3)
    shown = render.timeline_columns(12, 8)
    for cell, frame in enumerate(shown):  # reading order: first step top left, latest step last
        r, c = divmod(cell, 4)
        top, left = 2 + r * (band + 22) + band, 2 + c * 22
        assert (out[:, top : top + 20, left : left + 20] == frame * 10).all()
    np.testing.assert_array_equal(out[0, 2 : 2 + band, 2:22], render.caption(np.zeros((1, 1, 20, 3), np.uint8),
                                                                              [labels[0]])[0, :band])
    early = render.probe_timelines(frames[:1], labels[:1], tile_size=None)
    assert early.shape[2] == out.shape[2] and (early[:, :, 24:] == 255).all()  # same width, empty cells white
    per_probe = render.probe_timelines(frames[:2], [["a", "b", "c"], ["d", "e", "f"]])
    assert (per_probe[0, 2 : 2 + band] != per_probe[1, 2 : 2 + band]).any()
    with pytest.raises(ValueError, match="one string or 3 strings"):
        render.probe_timelines(frames[:1], [["a", "b"]])
    with pytest.raises(ValueError, match="one label per frame"):
        render.probe_timelines(frames, labels[:2])


def test_shrink_averages_areas_and_never_upscales():
    tiles = np.zeros((2, 6, 6, 3), np.uint8)
    tiles[:, :3, :3] = 90  # top-left quarter
    out = render.shrink(tiles, 2)
    assert out.shape == (2, 2, 2, 3) and (out[:, 0, 0] == 90).all() and (out[:, 1, 1] == 0).all()
    corner = np.zeros((1, 6, 6, 3), np.uint8)
    corner[:, :2, :2] = 90  # 6 -> 4 averages 2 x 2 windows on a 1.5 px stride: the corner's edge is blended
    blended = render.shrink(corner, 4)
    assert blended.shape == (1, 4, 4, 3) and blended[0, 0, 0, 0] == 90 and 0 < blended[0, 1, 1, 0] < 90
    assert render.shrink(tiles, 8) is tiles


def test_probe_timeline_of_the_logged_tiles_fits_tensorboard_cards_at_full_size():
    """96 px overlay tiles (32 px probes upscaled), 11 steps: one picture per probe that TensorBoard's Images card
    (about 345 px wide) and Time Series card (about 340 x 211 px) draw at 1x or more, captions included."""
    frames = [np.zeros((8, 96, 96, 3), np.uint8) for _ in range(11)]
    out = render.probe_timelines(frames, [f"ep {i - 1}\nstep {i * 48}" for i in range(11)])
    assert out.shape[0] == 8 and out.shape[2] <= 340 and out.shape[1] <= 211
    for i in range(11):
        assert render.fit_caption(f"ep {i - 1}\nstep {i * 48}", render.PROBE_TIMELINE_TILE) == [f"ep {i - 1}",
                                                                                            f"step {i * 48}"]
