"""Turn maps into pictures: heat-map overlays, captions, grids, epoch timelines, PNG files (all uint8 RGB)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from lightning_xai.png import encode_png

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


FONT_SIZE = 10  # caption font: Pillow's built-in font at this pixel size


@functools.cache
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """The caption font: Pillow's bundled FreeType font at ``FONT_SIZE`` (its bitmap font without FreeType)."""
    return ImageFont.load_default(size=FONT_SIZE)


@functools.cache
def line_height() -> int:
    """Pixel pitch of one caption line: the font's height from the top of capitals to the bottom of descenders."""
    return int(_font().getbbox("Agjy|")[3])


def band_height(lines: int = 1) -> int:
    """Height in pixels of a caption band holding ``lines`` lines of text."""
    return int(lines) * line_height() + 1


BAND = band_height(1)  # one-line band: timeline column and row labels
CAPTION_LINES = 2  # tile captions: class name and probability, wrapped to two lines when they do not fit in one


def _spaced(text: str) -> str:
    """``text`` as drawn: each space doubled, since the font's space is 2 px at this size and words run together."""
    return text.replace(" ", "  ")


def text_width(text: str) -> float:
    """Width in pixels of ``text`` as captions draw it (caption font, spaces doubled)."""
    return float(_font().getlength(_spaced(text)))


def _shorten(text: str, width: float) -> str:
    """``text``, cut at the end and marked with "…" until it is at most ``width`` pixels wide."""
    if text_width(text) <= width:
        return text
    while text and text_width(text + "…") > width:
        text = text[:-1]
    return text + "…" if text else ""


def _shorten_keep_last_word(text: str, width: float) -> str:
    """Like :func:`_shorten`, but cut before the last word (a probability such as ``p=0.93``) when that fits."""
    if text_width(text) <= width or " " not in text:
        return _shorten(text, width)
    front, last = text.rsplit(" ", 1)
    room = width - text_width(" " + last)
    if room < text_width("…"):
        return _shorten(last, width)
    return f"{_shorten(front, room)} {last}"


def _wrap(paragraph: str, width: float) -> list[str]:
    """Greedy word wrap at spaces; a word wider than ``width`` stays whole on its own line."""
    lines, current = [], ""
    for word in paragraph.split(" "):
        candidate = f"{current} {word}" if current else word
        if current and text_width(candidate) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    return [*lines, current]


def fit_caption(text: str, width: int, lines: int = CAPTION_LINES) -> list[str]:
    """The lines ``text`` is drawn as in a band ``width`` pixels wide.

    Explicit newlines start new lines, then words are wrapped at spaces. While that needs more than ``lines``
    lines, wrapped lines are joined again (the first paragraph that was wrapped first, then whole paragraphs);
    a line that is still too wide is shortened with "…", cutting before the last word of its paragraph (the
    probability, in ``"checker p=0.93"``) rather than the word itself.

    Returns:
        at most ``lines`` strings, each at most ``width - 2`` pixels wide in the caption font.
    """
    if int(lines) < 1:
        raise ValueError(f"lines must be >= 1, got {lines}")
    room = width - 2  # one pixel of margin each side
    paragraphs = [_wrap(paragraph, room) for paragraph in text.split("\n")]
    while sum(len(paragraph) for paragraph in paragraphs) > lines:
        wrapped = next((p for p in paragraphs if len(p) > 1), None)
        if wrapped is not None:
            wrapped[:2] = [" ".join(wrapped[:2])]
        else:
            paragraphs[:2] = [[" ".join(paragraphs[0] + paragraphs[1])]]
    out = []
    for paragraph in paragraphs:
        out += [_shorten(line, room) for line in paragraph[:-1]]
        out.append(_shorten_keep_last_word(paragraph[-1], room))
    return out


@functools.lru_cache(maxsize=4096)
def _text_band(text: str, width: int, lines: int = 1, fill: int | tuple[int, int, int] = 32) -> np.ndarray:
    """uint8 ``(band_height(lines), width, 3)`` dark band (grey level or RGB ``fill``) with ``text`` in white,
    wrapped and shortened by :func:`fit_caption` (cached: labels repeat every epoch; the array is read-only)."""
    pitch = line_height()
    band = Image.new("RGB", (width, band_height(lines)), fill if isinstance(fill, tuple) else (fill, fill, fill))
    draw = ImageDraw.Draw(band)
    for row, line in enumerate(fit_caption(text, width, lines)):
        draw.text((1, row * pitch), _spaced(line), fill=(255, 255, 255), font=_font())
    out = np.asarray(band).copy()
    out.flags.writeable = False
    return out


def caption(tiles: np.ndarray, texts: Sequence[str], lines: int = CAPTION_LINES,
            backgrounds: Sequence[tuple[int, int, int] | None] | None = None) -> np.ndarray:
    """Put a text band of ``lines`` lines on top of each tile: uint8 ``(N, h, w, 3)`` -> ``(N, band_height(lines)
    + h, w, 3)``. Texts are wrapped at spaces (and at ``"\\n"``); see :func:`fit_caption` for what is shortened.
    ``backgrounds``: per tile, an RGB colour for its band (``None``: the usual dark grey)."""
    if len(texts) != len(tiles):
        raise ValueError(f"caption needs one text per tile: {len(tiles)} tiles, {len(texts)} texts")
    if backgrounds is not None and len(backgrounds) != len(tiles):
        raise ValueError(f"caption needs one background per tile: {len(tiles)} tiles, {len(backgrounds)} given")
    width = tiles.shape[2]
    fills = [32 if colour is None else tuple(colour) for colour in (backgrounds or [None] * len(texts))]
    if len(texts):
        bands = np.stack([_text_band(text, width, lines, fill) for text, fill in zip(texts, fills, strict=True)])
    else:
        bands = np.zeros((0, band_height(lines), width, 3), np.uint8)
    return np.concatenate([bands, tiles], axis=1)


def grids(tiles: np.ndarray, ncols: int, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """A row-major grid per batch entry: uint8 ``(B, N, h, w, C)`` -> ``(B, rows*h + (rows+1)*pad, ncols*w +
    (ncols+1)*pad, C)`` with ``rows = ceil(N / ncols)``; empty cells are ``pad_value``."""
    if int(ncols) < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    if tiles.ndim != 5 or tiles.shape[1] == 0:
        raise ValueError(f"tiles must be a non-empty (B, N, h, w, C) array, got shape {tiles.shape}")
    batch, count, h, w, c = tiles.shape
    rows = -(-count // ncols)
    cells = np.full((batch, rows * ncols, h + pad, w + pad, c), pad_value, dtype=np.uint8)
    cells[:, :count, :h, :w] = tiles
    body = cells.reshape(batch, rows, ncols, h + pad, w + pad, c).transpose(0, 1, 3, 2, 4, 5)
    canvas = np.full((batch, rows * (h + pad) + pad, ncols * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    canvas[:, pad:, pad:] = body.reshape(batch, rows * (h + pad), ncols * (w + pad), c)
    return canvas


def grid(tiles: np.ndarray, ncols: int, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Row-major grid of tiles: uint8 ``(N, h, w, 3)`` -> ``(rows*h + (rows+1)*pad, ncols*w + (ncols+1)*pad, 3)``."""
    if tiles.ndim != 4 or len(tiles) == 0:
        raise ValueError(f"tiles must be a non-empty (N, h, w, 3) array, got shape {tiles.shape}")
    return grids(tiles[None], ncols, pad, pad_value)[0]


#: Frame colour of the tiles of a wrongly predicted probe (:func:`mark`), and the background of their captions.
WRONG_COLOUR = (230, 30, 30)
WRONG_BAND = (140, 20, 20)


def mark(tiles: np.ndarray, flags: Sequence[bool] | np.ndarray, width: int = 2,
         colour: tuple[int, int, int] = WRONG_COLOUR) -> np.ndarray:
    """A copy of uint8 tiles ``(N, ..., h, w, 3)`` where each tile of an entry whose flag is set (``flags``
    ``(N,)``) gets a ``width``-pixel frame of ``colour`` (e.g. the row of a wrongly predicted probe)."""
    flags = np.asarray(flags, dtype=bool)
    if flags.shape != tiles.shape[:1]:
        raise ValueError(f"mark needs one flag per entry: {tiles.shape[0]} entries, flags of shape {flags.shape}")
    out = tiles.copy()
    marked = out[flags]
    for edge in (np.s_[..., :width, :, :], np.s_[..., -width:, :, :], np.s_[..., :width, :], np.s_[..., -width:, :]):
        marked[edge] = colour
    out[flags] = marked
    return out


def stride_columns(count: int, max_columns: int) -> list[int]:
    """Indices of the frames a timeline shows when it should change rarely: every ``s``-th frame from the first,
    ``s`` the smallest power of two that leaves at most ``max_columns``. Unlike :func:`timeline_columns` (which
    always shows the newest, so its choice changes with every frame), the choice changes only when a frame lands
    on the stride or the stride doubles: about ``max_columns / 2`` times per doubling of ``count``."""
    if count < 1 or max_columns < 1:
        raise ValueError(f"need count >= 1 and max_columns >= 1, got {count}, {max_columns}")
    stride = 1
    while -(-count // stride) > max_columns:
        stride *= 2
    return list(range(0, count, stride))


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


def _check_frames(caller: str, frames: Sequence[np.ndarray], labels: Sequence[object]) -> tuple[int, ...]:
    """Raise unless ``frames`` is a non-empty list of uint8 ``(P, h, w, 3)`` arrays of one shape with one label
    each; return that shape."""
    if len(frames) == 0:
        raise ValueError(f"{caller} needs at least one frame")
    if len(frames) != len(labels):
        raise ValueError(f"{caller} needs one label per frame: {len(frames)} frames, {len(labels)} labels")
    shape = frames[0].shape
    if len(shape) != 4 or any(f.shape != shape for f in frames):
        raise ValueError(f"all frames must be uint8 (P, h, w, 3) of one shape; got {[f.shape for f in frames]}")
    return shape


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
    probes, h, w, _ = _check_frames("timeline", frames, epochs)
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



#: Per-probe timelines (:func:`probe_timelines`): at most 8 explanation steps as 4 x 2 tiles of 64 px under
#: two-line captions, a picture of 266 x 184 px. TensorBoard draws an image about 345 px wide in the Images
#: dashboard and fits it into about 340 x 211 px in Time Series (measured in Chromium at a 1400 px window), so
#: this picture is shown at 1.3x and 1.15x there: tiles and captions stay readable without "Show actual image
#: size". (The whole-run overview, :func:`timeline`, is for PNG files viewed at full size.)
PROBE_TIMELINE_COLUMNS = 4
PROBE_TIMELINE_FRAMES = 8
PROBE_TIMELINE_TILE = 64


def shrink(tiles: np.ndarray, size: int) -> np.ndarray:
    """Downscale uint8 ``(N, h, w, 3)`` tiles (area averaging) so the shorter side is ``size``; never upscales."""
    h, w = tiles.shape[1:3]
    if min(h, w) <= size:
        return tiles
    scale = size / min(h, w)
    shape = (max(1, round(h * scale)), max(1, round(w * scale)))
    pixels = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2).float()
    out = F.interpolate(pixels, size=shape, mode="area").round().clamp(0, 255).to(torch.uint8)
    return out.permute(0, 2, 3, 1).numpy()


def probe_timelines(
    frames: Sequence[np.ndarray],
    labels: Sequence[str] | Sequence[Sequence[str]],
    max_frames: int = PROBE_TIMELINE_FRAMES,
    columns: int = PROBE_TIMELINE_COLUMNS,
    tile_size: int | None = PROBE_TIMELINE_TILE,
    lines: int = CAPTION_LINES,
) -> np.ndarray:
    """One picture per probe of its maps across explanation steps, in reading order, ``columns`` tiles a row.

    Unlike :func:`timeline` (all probes in one picture, one column per step), each picture has a bounded size
    whatever the number of probes and steps, so it stays readable at the size TensorBoard draws it.

    Args:
        frames: one uint8 ``(P, h, w, 3)`` array per explanation step (all the same shape), oldest first.
        labels: per step, a caption shared by all probes (e.g. ``"ep 3\\nstep 192"``), or a sequence of ``P``
            captions (one per probe).
        max_frames: at most this many steps are shown: the first, the latest and evenly spaced ones between.
        columns: tiles per row; the picture is always ``columns`` tiles wide (empty cells white), so its scale
            in the viewer does not change from step to step.
        tile_size: tiles larger than this are shrunk (area averaging) to this shorter side; ``None`` keeps them.
        lines: caption lines per tile.

    Returns:
        uint8 ``(P, rows * (band_height(lines) + t + 2) + 2, columns * (s + 2) + 2, 3)``, ``(t, s)`` the tile
        size, ``rows = ceil(min(len(frames), max_frames) / columns)``.
    """
    shape = _check_frames("probe_timelines", frames, labels)
    probes = shape[0]
    chosen = timeline_columns(len(frames), max_frames)
    stack = np.stack([frames[i] for i in chosen], axis=1)  # (P, T, h, w, 3)
    if tile_size:
        small = shrink(stack.reshape(-1, *shape[1:]), tile_size)
        stack = small.reshape(probes, len(chosen), *small.shape[1:])
    per_probe = [[labels[i]] * probes if isinstance(labels[i], str) else list(labels[i]) for i in chosen]
    if any(len(texts) != probes for texts in per_probe):
        raise ValueError(f"each frame's labels must be one string or {probes} strings (one per probe)")
    width = stack.shape[3]
    bands = np.stack([np.stack([_text_band(text, width, lines) for text in texts]) for texts in per_probe], axis=1)
    return grids(np.concatenate([bands, stack], axis=2), ncols=columns)

def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write uint8 ``(H, W, 3)`` or ``(H, W)`` to ``path`` (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(image))
    return path
