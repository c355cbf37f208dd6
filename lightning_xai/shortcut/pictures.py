"""What the shortcut check shows: the evidence (the strongest flipped pair) and the probes' agreed region, both
captioned so that they read without the docs. uint8 RGB arrays; nothing here needs Lightning."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from lightning_xai import render
from lightning_xai.shortcut.agreement import ShortcutScore
from lightning_xai.shortcut.transplant import TransplantResult, paste

OUTLINE = (255, 255, 255)  # region outlines: white, drawn with a dark inner edge so they show on any colour
EDGE_DARK = (0, 0, 0)


def _outline(tile: np.ndarray, region: np.ndarray) -> np.ndarray:
    """``tile`` uint8 ``(h, w, 3)`` with the boundary of ``region`` bool ``(H, W)`` (upscaled to the tile by an
    integer factor, nearest) drawn white outside, black inside; returns a copy."""
    factor = tile.shape[0] // region.shape[0]
    big = region.repeat(factor, 0).repeat(factor, 1)
    padded = np.pad(big, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    edge = big & ~inner
    grown = np.pad(edge, 1)
    halo = (grown[:-2, 1:-1] | grown[2:, 1:-1] | grown[1:-1, :-2] | grown[1:-1, 2:]) & ~big
    out = tile.copy()
    out[halo] = OUTLINE
    out[edge] = EDGE_DARK
    return out


def _name(names: Sequence[str] | Callable[[int], str] | None, index: int) -> str:
    if callable(names):
        return f"'{names(index)}'"
    if names is not None and 0 <= index < len(names):
        return f"'{names[index]}'"
    return f"'{index}'"


def evidence_caption(donor: int, recipient: int, before: int, after: int,
                     class_names: Sequence[str] | Callable[[int], str] | None = None) -> str:
    """"pasting this region of probe 3 into probe 5 turns its prediction from '7' into '2'"."""
    return (f"pasting this region of probe {donor} into probe {recipient} turns its prediction from "
            f"{_name(class_names, before)} into {_name(class_names, after)}")


def evidence_picture(
    images: Tensor,
    result: TransplantResult,
    pair: tuple[int, int, int, int] | None = None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    class_names: Sequence[str] | Callable[[int], str] | None = None,
    size: int = 128,
) -> np.ndarray | None:
    """The strongest flipped pair (or ``pair``) as three captioned tiles: the donor with its region outlined, the
    recipient before, and the recipient with the region pasted, under one caption that says what happened.

    Args:
        images: ``(B, C, H, W)`` the probes the check ran on (normalised as the model takes them).
        result: the transplant check on them.
        mean, std: the input normalisation, to show true colours (``None``: min-max per image).
        class_names: names (or ``index -> name``) shown instead of class indices.

    Returns:
        uint8 ``(H', W', 3)``, or ``None`` when no pair flipped.
    """
    pair = pair if pair is not None else result.strongest()
    if pair is None:
        return None
    donor, recipient, before, after = pair
    images = images.detach().float().cpu()
    regions = result.regions.to("cpu")
    pasted = paste(images, regions, torch.tensor([donor]), torch.tensor([recipient]))  # as the check pasted
    three = torch.cat([images[donor:donor + 1], images[recipient:recipient + 1], pasted])
    tiles = render.overlay(three, torch.zeros(3, *images.shape[-2:]), alpha=0.0, mean=mean, std=std, size=size)
    region = regions[donor].numpy()
    tiles = np.stack([_outline(tiles[0], region), tiles[1], _outline(tiles[2], region)])
    texts = [f"probe {donor}: {_name(class_names, int(result.classes[donor]))}",
             f"probe {recipient}: {_name(class_names, before)}",
             f"pasted: {_name(class_names, after)}"]
    row = render.grid(render.caption(tiles, texts, lines=2), ncols=3)
    return render.caption(row[None], [evidence_caption(donor, recipient, before, after, class_names)], lines=3)[0]


def region_caption(score: ShortcutScore, rate: float | None = None) -> str:
    """The legend of :func:`region_picture`."""
    rate_text = "" if rate is None or rate != rate else f", transplant rate {rate:.2f}"
    return (f"colour: mean map of the probes; outlined: its top {score.fraction:.0%}, where the classes' maps "
            f"agree (agreement {score.score:.2f}{rate_text}). A fixed-place cue shows as one small spot; "
            f"objects spread out.")


def region_picture(score: ShortcutScore, cmap: str = "jet", size: int = 192, rate: float | None = None,
                   caption: bool = True) -> np.ndarray:
    """Where the probes agree, as a picture: the class-balanced mean map (scaled to its maximum, coloured with
    ``cmap``) with the agreed region's pixels outlined, under a legend that says so (``caption``; ``rate``: the
    transplant rate to quote in it); uint8 ``(H', W', 3)``, the longer side about ``size`` pixels
    (nearest-neighbour upscaling, so each map pixel stays a sharp square)."""
    mean = score.mean_map / score.mean_map.max().clamp_min(1e-12)
    picture = render.colorize(mean[None], cmap)[0]  # (H, W, 3)
    region = score.region.numpy()
    factor = max(1, size // max(region.shape))
    picture = _outline(picture.repeat(factor, 0).repeat(factor, 1), region)
    if not caption:
        return picture
    return render.caption(picture[None], [region_caption(score, rate)], lines=6)[0]
