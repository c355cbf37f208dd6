"""Turn maps into pictures: heat-map overlays, captions, grids, epoch timelines, PNG files (all uint8 RGB)."""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

DEFAULT_SIZE = 96  # small images are upscaled (nearest, integer factor) until the shorter side reaches this
BAND = 12  # caption band height in pixels


def _lookup_table(cmap: str) -> np.ndarray:
    """``(256, 3)`` uint8 colours of matplotlib colormap ``cmap``."""
    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError:
        raise ValueError(f"unknown colormap {cmap!r}; use a matplotlib name such as 'jet' or 'viridis'") from None
    return (colormap(np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)


def colorize(maps: Tensor | np.ndarray, cmap: str = "jet") -> np.ndarray:
    """Colour maps in ``[0, 1]``: ``(B, H, W)`` -> uint8 ``(B, H, W, 3)`` (values clamped, NaN as 0)."""
    values = maps.detach().float().cpu().numpy() if isinstance(maps, Tensor) else np.asarray(maps, dtype=np.float32)
    values = np.nan_to_num(values, nan=0.0).clip(0.0, 1.0)
    return _lookup_table(cmap)[(values * 255).round().astype(np.int64)]


def _unnormalise(images: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> Tensor:
    """``(B, C, H, W)`` normalised images -> ``(B, 3, H, W)`` in ``[0, 1]``."""
    images = images.detach().float().cpu()
    if mean is None or std is None:
        low = images.flatten(1).min(1).values.view(-1, 1, 1, 1)
        high = images.flatten(1).max(1).values.view(-1, 1, 1, 1)
        images = (images - low) / (high - low).clamp_min(1e-12)
    else:
        channels = images.shape[1]
        m = torch.as_tensor(mean, dtype=torch.float32).flatten()
        s = torch.as_tensor(std, dtype=torch.float32).flatten()
        if channels == 1:  # grey images with a colour default: use the first channel's statistics
            m, s = m[:1], s[:1]
        if len(m) not in (1, channels) or len(s) not in (1, channels):
            raise ValueError(f"mean/std have {len(m)}/{len(s)} values for images with {channels} channels")
        images = images * s.view(1, -1, 1, 1) + m.view(1, -1, 1, 1)
    images = images.clamp(0.0, 1.0)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    elif images.shape[1] != 3:
        raise ValueError(f"overlay needs 1 or 3 image channels, got {images.shape[1]}")
    return images


def upscale_factor(height: int, width: int, size: int | None = DEFAULT_SIZE) -> int:
    """Integer factor that brings the shorter side to at least ``size`` (1 = unchanged; never downscales)."""
    if not size:
        return 1
    return max(1, -(-int(size) // min(height, width)))


def overlay(
    images: Tensor,
    maps: Tensor,
    alpha: float = 0.5,
    cmap: str = "jet",
    mean: Sequence[float] | None = (0.5, 0.5, 0.5),
    std: Sequence[float] | None = (0.5, 0.5, 0.5),
    size: int | None = DEFAULT_SIZE,
) -> np.ndarray:
    """Blend heat maps onto images.

    Args:
        images: ``(B, C, H, W)`` normalised as ``(x - mean) / std`` (``C`` 1 or 3); with ``mean``/``std``
            ``None`` each image is min-max scaled instead.
        maps: ``(B, h, w)`` or ``(B, 1, h, w)`` in ``[0, 1]``; resized bilinearly to ``(H, W)``.
        alpha: weight of the colour map (0 = the image alone, 1 = the colour map alone).
        size: small images are upscaled (nearest neighbour, integer factor) until the shorter side is at
            least ``size``; ``None`` keeps the input size.

    Returns:
        uint8 ``(B, H', W', 3)``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if maps.dim() == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.dim() != 3 or maps.shape[0] != images.shape[0]:
        raise ValueError(f"maps must be (B, h, w) with B={images.shape[0]} like the images, got {tuple(maps.shape)}")
    height, width = images.shape[-2:]
    rgb = _unnormalise(images, mean, std)
    maps = torch.nan_to_num(maps.detach().float().cpu(), nan=0.0).clamp(0.0, 1.0)
    if maps.shape[-2:] != (height, width):
        maps = F.interpolate(maps[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    colour = torch.from_numpy(colorize(maps, cmap)).float() / 255.0  # (B, H, W, 3)
    blended = (1.0 - alpha) * rgb.permute(0, 2, 3, 1) + alpha * colour
    out = (blended * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
    factor = upscale_factor(height, width, size)
    if factor > 1:
        out = out.repeat(factor, axis=1).repeat(factor, axis=2)
    return out


@functools.lru_cache(maxsize=1024)
def _text_band(text: str, width: int, height: int = BAND, fill: int = 32) -> np.ndarray:
    """uint8 ``(height, width, 3)`` dark band with ``text`` in white, shortened with "…" to fit (cached:
    labels repeat every epoch; the array is read-only)."""
    band = Image.new("RGB", (width, height), (fill, fill, fill))
    draw = ImageDraw.Draw(band)
    font = ImageFont.load_default()
    shown = text
    while shown and draw.textlength(shown, font=font) > width - 2:
        shown = shown[:-2] + "…" if len(shown) > 2 else ""
    draw.text((1, max(0, (height - 11) // 2)), shown, fill=(255, 255, 255), font=font)
    out = np.asarray(band).copy()
    out.flags.writeable = False
    return out


def caption(tiles: np.ndarray, texts: Sequence[str]) -> np.ndarray:
    """Put a text band on top of each tile: uint8 ``(N, h, w, 3)`` -> ``(N, h + BAND, w, 3)``."""
    if len(texts) != len(tiles):
        raise ValueError(f"caption needs one text per tile: {len(tiles)} tiles, {len(texts)} texts")
    bands = np.stack([_text_band(text, tiles.shape[2]) for text in texts]) if len(texts) else np.zeros(
        (0, BAND, tiles.shape[2], 3), np.uint8)
    return np.concatenate([bands, tiles], axis=1)


def grid(tiles: np.ndarray, ncols: int, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Row-major grid of tiles: uint8 ``(N, h, w, 3)`` -> ``(rows*h + (rows+1)*pad, ncols*w + (ncols+1)*pad, 3)``."""
    if int(ncols) < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    if tiles.ndim != 4 or len(tiles) == 0:
        raise ValueError(f"tiles must be a non-empty (N, h, w, 3) array, got shape {tiles.shape}")
    count, h, w, c = tiles.shape
    rows = -(-count // ncols)
    canvas = np.full((rows * h + (rows + 1) * pad, ncols * w + (ncols + 1) * pad, c), pad_value, dtype=np.uint8)
    for i in range(count):
        r, col = divmod(i, ncols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        canvas[top : top + h, left : left + w] = tiles[i]
    return canvas


def timeline_columns(count: int, max_columns: int) -> list[int]:
    """Indices of the frames a timeline shows: all if ``count <= max_columns``, else evenly spaced ones that
    always include the first and the last."""
    if count < 1 or max_columns < 1:
        raise ValueError(f"need count >= 1 and max_columns >= 1, got {count}, {max_columns}")
    if count <= max_columns:
        return list(range(count))
    if max_columns == 1:
        return [count - 1]
    return sorted({int(i) for i in np.linspace(0, count - 1, max_columns).round()})


def timeline(
    frames: Sequence[np.ndarray],
    epochs: Sequence[int | str],
    max_columns: int = 8,
    row_labels: Sequence[str] | None = None,
) -> np.ndarray:
    """One picture of a method's maps across epochs: rows = probes, columns = epochs.

    Args:
        frames: one uint8 ``(P, h, w, 3)`` array per explained epoch (all the same shape).
        epochs: one label per frame: an int (shown as ``"ep N"``) or a string such as ``"init"``.
        max_columns: at most this many columns; the first and the latest frame are always shown.
        row_labels: optional label per probe, drawn in a left column.

    Returns:
        uint8 ``(H, W, 3)`` image with a header band of column labels.
    """
    if len(frames) == 0:
        raise ValueError("timeline needs at least one frame")
    if len(frames) != len(epochs):
        raise ValueError(f"timeline needs one label per frame: {len(frames)} frames, {len(epochs)} labels")
    shape = frames[0].shape
    if len(shape) != 4 or any(f.shape != shape for f in frames):
        raise ValueError(f"all frames must be uint8 (P, h, w, 3) of one shape; got {[f.shape for f in frames]}")
    probes, h, w, _ = shape
    if row_labels is not None and len(row_labels) != probes:
        raise ValueError(f"row_labels has {len(row_labels)} entries for {probes} probes")
    chosen = timeline_columns(len(frames), max_columns)
    labels = [label if isinstance(label, str) else f"ep {label}" for label in (epochs[i] for i in chosen)]
    columns = np.stack([frames[i] for i in chosen], axis=1)  # (P, C, h, w, 3)
    body = grid(columns.reshape(-1, h, w, 3), ncols=len(chosen))
    pad = 2
    header = np.full((BAND, body.shape[1], 3), 255, np.uint8)
    for c, label in enumerate(labels):
        left = pad + c * (w + pad)
        header[:, left : left + w] = _text_band(label, w, fill=64)
    image = np.concatenate([header, body], axis=0)
    if row_labels is not None:
        label_width = 28
        side = np.full((image.shape[0], label_width, 3), 255, np.uint8)
        for r, label in enumerate(row_labels):
            top = BAND + pad + r * (h + pad) + (h - BAND) // 2
            side[top : top + BAND] = _text_band(label, label_width, fill=64)
        image = np.concatenate([side, image], axis=1)
    return image


#: zlib level of the PNGs we write: 1 encodes about twice as fast as PIL's default 6 for about 10 % more bytes,
#: which matters because the callback encodes its grids and timelines inside the training loop.
PNG_COMPRESS_LEVEL = 1


def encode_png(image: np.ndarray) -> bytes:
    """uint8 ``(H, W, 3)`` or ``(H, W)`` -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(
        buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL
    )
    return buffer.getvalue()


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write uint8 ``(H, W, 3)`` or ``(H, W)`` to ``path`` (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(image))
    return path
