"""The agreement statistic (auxiliary to the transplant check): do the maps of probes explained for different
classes land on one small region?

A cue that sits at the *same place* on every image and serves several classes makes the maps of different
classes agree on it, while real objects move. The statistic (``docs/methods.md``, "Shortcut statistic") is the
share of each probe's map energy inside the small region where the maps of the probes of the *other* classes
agree. It misses a cue whose place encodes the class, so the alarm runs on the transplant rate
(:mod:`.transplant`) and this is logged beside it as ``xai/<method>/shortcut_agreement``. Also the with-masks
helpers :func:`object_share` and :func:`object_drift`. Pure functions of tensors, batched over probes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

#: Size of the agreed region, as a fraction of the image's pixels ("the top few percent").
DEFAULT_FRACTION = 0.05


def energy_distribution(maps: Tensor) -> Tensor:
    """Each map as a distribution of energy over its pixels: ``(..., H, W) -> (..., H*W)``, rows sum to 1.

    Energy is the positive part of the map (as for ``energy_pointing_game``); a map with no positive
    value counts as spread evenly.
    """
    flat = maps.flatten(-2).double().clamp_min(0)
    total = flat.sum(-1, keepdim=True)
    uniform = torch.full_like(flat, 1.0 / flat.shape[-1])
    return torch.where(total > 0, flat / total.clamp_min(1e-300), uniform)


def _top_region(mean_maps: Tensor, fraction: float) -> Tensor:
    """Bool mask of the ``ceil(fraction * N)`` largest pixels of each row of ``(G, N)``; ties by lower index."""
    count = max(1, math.ceil(fraction * mean_maps.shape[-1]))
    index = mean_maps.topk(count, dim=-1, sorted=False).indices
    return torch.zeros_like(mean_maps, dtype=torch.bool).scatter_(-1, index, True)


@dataclass
class ShortcutScore:
    """The shortcut statistic of one method at one epoch.

    Attributes:
        score: the statistic, a float in ``[0, 1]``; ``nan`` when the probes were explained for fewer than
            two classes (nothing to compare across).
        shares: ``(P,)`` each probe's share of energy in the region agreed by the other classes' probes
            (``nan`` for a probe whose class is the only one).
        classes: ``(P,)`` the class each probe's map was explained for (its group).
        mean_map: ``(H, W)`` class-balanced mean of all probes' energy distributions (sums to 1).
        region: ``(H, W)`` bool, the top ``fraction`` of ``mean_map``: where the probes agree.
        fraction: the region's size as a fraction of the pixels (the statistic's chance level).
    """

    score: float
    shares: Tensor
    classes: Tensor
    mean_map: Tensor
    region: Tensor
    fraction: float

    def probes_above(self, threshold: float) -> list[int]:
        """Indices of the probes whose share is at least ``threshold``."""
        return [int(i) for i in torch.nonzero(self.shares >= threshold).flatten()]


def shortcut_score(maps: Tensor, classes: Tensor, fraction: float = DEFAULT_FRACTION) -> ShortcutScore:
    """The mask-free shortcut statistic of one method's probe maps.

    For each probe ``p`` explained for class ``c_p``, with ``q_p`` its map's energy distribution:

    1. ``m_c`` = mean of ``q`` over the probes of class ``c`` (class means, so a frequent class does not
       dominate);
    2. ``R_p`` = the top ``fraction`` of the pixels of the mean of ``m_c`` over the classes ``c != c_p``:
       where the probes of the *other* classes agree;
    3. ``s_p = sum(q_p[R_p])``, the share of probe ``p``'s energy in that region;
    4. ``score`` = mean over the classes of the mean of ``s_p`` over the class's probes.

    A map spread evenly scores ``fraction``; maps that all sit on one spot smaller than the region score
    near 1 wherever that spot is; maps that follow objects at different places score near ``fraction``, and
    maps of objects that often sit in one place but cover more than the region score in between.

    Args:
        maps: ``(P, H, W)`` or ``(P, K, H, W)`` maps (only target ``0`` is used: the other targets of a
            probe share its image, so they would agree with it for any model).
        classes: ``(P,)`` or ``(P, K)`` int class each map explains (with ``targets="pred"``: the prediction).
        fraction: size of the agreed region as a fraction of the pixels, in ``(0, 1)``.

    Returns:
        a :class:`ShortcutScore`.
    """
    if maps.dim() == 4:
        maps = maps[:, 0]
    if classes.dim() == 2:
        classes = classes[:, 0]
    if maps.dim() != 3 or classes.shape != maps.shape[:1]:
        raise ValueError(f"maps must be (P, H, W) or (P, K, H, W) and classes (P,) or (P, K); got "
                         f"{tuple(maps.shape)} and {tuple(classes.shape)}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    height, width = maps.shape[-2:]
    dist = energy_distribution(maps)  # (P, N)
    classes = classes.to(dist.device).long()
    _, group = torch.unique(classes, return_inverse=True)  # (P,) in 0..G-1
    onehot = torch.nn.functional.one_hot(group).to(dist.dtype)  # (P, G)
    count = onehot.sum(0)  # (G,)
    class_means = (onehot.T @ dist) / count[:, None]  # (G, N)
    groups = class_means.shape[0]
    balanced = class_means.mean(0)  # (N,)
    region = _top_region(balanced[None], fraction)[0]
    if groups < 2:
        shares = torch.full((maps.shape[0],), math.nan, dtype=torch.float32)
        return ShortcutScore(math.nan, shares, classes.cpu(), balanced.view(height, width).float().cpu(),
                             region.view(height, width).cpu(), fraction)
    others = (class_means.sum(0, keepdim=True) - class_means) / (groups - 1)  # (G, N): mean of the other classes
    regions = _top_region(others, fraction)  # (G, N)
    shares = (dist * regions[group]).sum(-1)  # (P,)
    per_class = (onehot.T @ shares) / count  # (G,)
    return ShortcutScore(float(per_class.mean()), shares.float().cpu(), classes.cpu(),
                         balanced.view(height, width).float().cpu(), region.view(height, width).cpu(), fraction)


def object_share(maps: Tensor, masks: Tensor) -> Tensor:
    """Share of each map's energy inside its object: ``(P, [K,] H, W)`` maps and ``(P, H, W)`` masks -> ``(P,)``.

    Only target ``0`` of each probe is used, as in :func:`shortcut_score`.
    """
    if maps.dim() == 4:
        maps = maps[:, 0]
    if masks.dim() == 4:
        masks = masks[:, 0]
    if masks.shape != maps.shape:
        raise ValueError(f"masks {tuple(masks.shape)} do not match maps {tuple(maps.shape)} (P, H, W)")
    dist = energy_distribution(maps)
    return (dist * masks.flatten(-2).to(dist.device, dist.dtype)).sum(-1).float().cpu()


def object_drift(object_shares: Tensor, accuracies: Tensor) -> Tensor:
    """The with-masks signal over explained epochs: how far the share of map energy inside the objects has
    fallen from its best epoch so far, counted only while the probe accuracy is above its value at that epoch.

    Args:
        object_shares: ``(T,)`` mean :func:`object_share` of the probes at each explained epoch.
        accuracies: ``(T,)`` probe accuracy at the same epochs.

    Returns:
        ``(T,)`` in ``[0, 1]``: ``1 - share_t / share_best`` where ``best`` is the epoch ``<= t`` with the highest
        share, when ``accuracy_t > accuracy_best``; ``0`` otherwise (the model did not get better, or the
        share did not fall).
    """
    shares, accuracy = object_shares.double(), accuracies.double()
    if shares.dim() != 1 or shares.shape != accuracy.shape:
        raise ValueError(f"object_shares and accuracies must both be (T,); got {tuple(shares.shape)} and "
                         f"{tuple(accuracy.shape)}")
    best, where = shares.cummax(0)
    fall = (1 - shares / best.clamp_min(1e-12)).clamp_min(0)
    return torch.where(accuracy > accuracy[where], fall, torch.zeros_like(fall)).float()
