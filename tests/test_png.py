"""Our PNG encoder: any reader gets the exact pixels back, the file passes PIL's checks (CRCs included), and it is
about as small as PIL's own at the same zlib level on the pictures the callback writes."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_xai import render
from lightning_xai.png import encode_png


def decode(data: bytes) -> np.ndarray:
    Image.open(io.BytesIO(data)).verify()  # chunk CRCs and structure
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (5, 9, 1), (3, 5, 2), (1, 1, 3), (17, 31, 3), (6, 4, 4)])
def test_round_trip_exact(shape):
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    decoded = decode(encode_png(image))
    np.testing.assert_array_equal(decoded, image[..., 0] if len(shape) == 3 and shape[2] == 1 else image)


def test_up_filter_wraps_modulo_256():
    image = np.zeros((4, 5, 3), np.uint8)
    image[0], image[1], image[2] = 255, 0, 200  # each row minus the row above wraps below zero or above 255
    image[3, :, 1] = 7
    np.testing.assert_array_equal(decode(encode_png(image)), image)


def test_non_uint8_is_cast_and_views_are_read_as_they_look():
    image = np.random.default_rng(1).integers(0, 256, (9, 12, 3)).astype(np.int64)
    np.testing.assert_array_equal(decode(encode_png(image)), image.astype(np.uint8))
    view = np.random.default_rng(2).integers(0, 256, (12, 9, 3), dtype=np.uint8).transpose(1, 0, 2)[::2]
    np.testing.assert_array_equal(decode(encode_png(view)), view)


@pytest.mark.parametrize("shape", [(0, 4, 3), (4, 0), (3, 4, 5), (2, 3, 4, 3), (5,)])
def test_bad_shapes_are_refused(shape):
    with pytest.raises(ValueError, match="PNG needs"):
        encode_png(np.zeros(shape, np.uint8))


def test_size_close_to_pil_on_a_captioned_heat_map():
    """A grid of captioned overlays, as the callback logs: within 20 % of PIL's file at the same zlib level."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 32, 32, generator=generator)
    maps = torch.nn.functional.avg_pool2d(torch.rand(4, 1, 32, 32, generator=generator), 9, 1, 4)[:, 0]
    tiles = render.caption(render.overlay(images, maps), [f"class {i} · p 0.{i}3" for i in range(4)])
    picture = render.grid(tiles, ncols=2)
    ours = encode_png(picture)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG", compress_level=1)
    np.testing.assert_array_equal(decode(ours), picture)
    assert len(ours) <= 1.2 * len(buffer.getvalue()), (len(ours), len(buffer.getvalue()))
