"""Per-epoch summary numbers of a method's probe maps: how they change, how concentrated, how well placed."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_xai.metrics import class_discrimination, localization

SIMILARITIES = ("pearson", "cosine")


def map_similarity(current: Tensor, previous: Tensor, kind: str = "pearson") -> Tensor:
    """Similarity of each map with the previous epoch's: ``(P, K, H, W)`` twice -> ``(P, K)``.

    ``"pearson"``: correlation of the pixel values (1 = same pattern); ``"cosine"``: cosine of the maps.
    A constant map has correlation 0 with anything.
    """
    a, b = current.flatten(2).double(), previous.flatten(2).double()
    if kind == "pearson":
        a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    denominator = (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)
    return ((a * b).sum(-1) / denominator).float()


def concentration_entropy(maps: Tensor) -> Tensor:
    """Normalised entropy of each map seen as a distribution over pixels: ``(P, K, H, W) -> (P, K)``.

    1 = spread evenly over the image, 0 = all mass on one pixel. An all-zero map counts as uniform.
    """
    flat = maps.flatten(2).double().clamp_min(0)
    total = flat.sum(-1, keepdim=True)
    p = torch.where(total > 0, flat / total.clamp_min(1e-300), torch.full_like(flat, 1.0 / flat.shape[-1]))
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)
    return (entropy / math.log(flat.shape[-1])).float()


def evolution_scalars(
    maps: Tensor, previous: Tensor | None, masks: Tensor | None, similarity: str = "pearson"
) -> dict[str, float]:
    """Mean summary numbers of one method at one epoch.

    Args:
        maps: ``(P, K, H, W)`` normalised maps of the probes.
        previous: the previous explained epoch's maps, same shape, or ``None``.
        masks: ground-truth masks ``(P, H, W)`` (one object) or ``(P, K, H, W)`` (object of target ``k``),
            or ``None``.

    Returns:
        ``similarity_prev`` (when ``previous`` is given), ``entropy``, and with masks ``iou`` and
        ``energy_pointing_game``; with two-object masks and two targets per probe, ``class_discrimination``.
    """
    out: dict[str, float] = {"entropy": float(concentration_entropy(maps).mean())}
    if previous is not None and previous.shape == maps.shape:
        out["similarity_prev"] = float(map_similarity(maps, previous, similarity).mean())
    if masks is not None:
        target_masks = masks.unsqueeze(1).expand_as(maps) if masks.dim() == 3 else masks
        if target_masks.shape == maps.shape:
            scores = localization(maps, target_masks.to(maps.device))
            out["iou"] = float(scores["iou"].mean())
            out["energy_pointing_game"] = float(scores["energy_pointing_game"].mean())
            if maps.shape[1] == 2 and masks.dim() == 4:
                out["class_discrimination"] = float(class_discrimination(maps, target_masks.to(maps.device)).mean())
    return out
