"""What the shortcut check shows: the evidence (the strongest flipped pair) and the probes' agreed region, both
captioned so that they read without the docs. uint8 RGB arrays; nothing here needs Lightning."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from lightning_xai import render
from lightning_xai.shortcut.agreement import ShortcutScore
from lightning_xai.shortcut.carriers import CarrierResult
from lightning_xai.shortcut.transplant import TransplantResult

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


def _image_name(which: int | str) -> str:
    return f"probe {which}" if isinstance(which, int) else which


def evidence_caption(donor: int | str, recipient: int | str, before: int, after: int,
                     class_names: Sequence[str] | Callable[[int], str] | None = None) -> str:
    """"pasting this region of probe 3 into probe 5 turns its prediction from '7' into '2'" (an int names a probe;
    a string is the image's name as it is, e.g. ``"reference 4"``)."""
    return (f"pasting this region of {_image_name(donor)} into {_image_name(recipient)} turns its prediction from "
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
    return pair_picture(images[donor], result.regions[donor], images[recipient], donor, recipient,
                        int(result.classes[donor]), before, after, mean=mean, std=std, class_names=class_names,
                        size=size)


def carrier_picture(
    donors: Tensor,
    pool: Tensor,
    result: CarrierResult,
    donor_name: Callable[[int], int | str],
    pool_name: Callable[[int], int | str],
    pair: tuple[int, int, int, int] | None = None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    class_names: Sequence[str] | Callable[[int], str] | None = None,
    size: int = 128,
) -> np.ndarray | None:
    """The stamped carriers' strongest pair (see :func:`pair_picture`): a carrier among ``donors`` ``(D, C, H, W)``
    pasted into an image of ``pool`` ``(R, C, H, W)`` (the images the carrier check ran on); ``donor_name`` and
    ``pool_name`` name an index (an int is a probe's index); ``pair``: one of ``result.flips()`` to draw instead.
    ``None`` when no carrier's pair flipped."""
    flips = result.flips(result.carriers) if pair is None else [pair]
    if not flips:
        return None
    donor, recipient, before, after = flips[0]
    return pair_picture(donors[donor].detach().float().cpu(), result.regions[donor],
                        pool[recipient].detach().float().cpu(), donor_name(donor), pool_name(recipient),
                        int(result.classes[donor]), before, after, mean=mean, std=std, class_names=class_names,
                        size=size)


def pair_picture(donor: Tensor, region: Tensor, recipient: Tensor, donor_name: int | str, recipient_name: int | str,
                 donor_class: int, before: int, after: int, *, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, class_names: Sequence[str] | Callable[[int], str] | None = None,
                 size: int = 128) -> np.ndarray:
    """One transplant as three captioned tiles: ``donor`` ``(C, H, W)`` with its ``region`` ``(H, W)`` outlined,
    ``recipient`` ``(C, H, W)`` before, and the recipient with the region pasted, under one caption that says what
    happened (:func:`evidence_caption`); uint8 ``(H', W', 3)``."""
    region = region.to("cpu")
    pasted = torch.where(region[None], donor, recipient)  # as the check pasted
    three = torch.stack([donor, recipient, pasted])
    tiles = render.overlay(three, torch.zeros(3, *donor.shape[-2:]), alpha=0.0, mean=mean, std=std, size=size)
    outline = region.numpy()
    tiles = np.stack([_outline(tiles[0], outline), tiles[1], _outline(tiles[2], outline)])
    texts = [f"{_image_name(donor_name)}: {_name(class_names, donor_class)}",
             f"{_image_name(recipient_name)}: {_name(class_names, before)}",
             f"pasted: {_name(class_names, after)}"]
    row = render.grid(render.caption(tiles, texts, lines=2), ncols=3)
    caption = evidence_caption(donor_name, recipient_name, before, after, class_names)
    return render.caption(row[None], [caption], lines=3)[0]


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
