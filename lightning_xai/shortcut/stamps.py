"""Stamps: does a probe's region hold pixels that recur, at the same place, in other images of its class and not in
images of other classes? (``docs/methods.md``, "Shortcut statistic", "Stamped carriers".)

A spurious mark (a watermark, a hospital tag, a border mark) is a *stamp*: the same pixels at the same place in the
images of the class it came with. A piece of an object differs from one image of its class to the next (colour,
phase, pose), even when the objects always sit at one place. So a probe whose region carries its class into other
images at its place (the transplant check) is a *stamped carrier* when its region is also a stamp against a set of
labelled reference images, the labels being the ground truth of the data the model learns from: a feature that
recurs with one label is what a shortcut is made of.

Pure functions of tensors; no model, no Lightning.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: A region is a stamp when its nearest reference image of the same class is nearer than this share of the distance
#: to its nearest reference image of another class (measured in ``docs/methods.md``: 0.5-0.7 worked on the
#: benchmark, chance stamps on a hand-built centred case grow above 0.5).
DEFAULT_STAMP_RATIO = 0.5
#: A probe carries its class when at least this share of its transplants follow it (see ``docs/methods.md``).
DEFAULT_CARRIER_LEVEL = 1 / 3


def region_distances(images: Tensor, regions: Tensor, pool: Tensor, chunk: int = 256,
                     weights: Tensor | None = None) -> Tensor:
    """``(B, R)``: mean absolute difference between each image's pixels and each pool image's pixels over the
    image's region, at the same places, all channels; with ``weights`` ``(B, H, W)`` (e.g. the maps, >= 0), the
    mean is weighted by them within the region (the pixels the map points at most count most).

    ``images`` ``(B, C, H, W)``, ``regions`` ``(B, H, W)`` bool with the same number of pixels each (as
    :func:`~lightning_xai.shortcut.transplant.top_regions` gives), ``pool`` ``(R, C, H, W)``. ``chunk`` bounds the
    ``(b, R, C, n)`` differences held at once.
    """
    if regions.dim() != 3 or len(regions) != len(images):
        raise ValueError(f"regions must be (B, H, W) for images (B, C, H, W), got {tuple(regions.shape)} and "
                         f"{tuple(images.shape)}")
    count = int(regions[0].sum()) if len(regions) else 0
    if not bool((regions.flatten(1).sum(1) == count).all()):
        raise ValueError("regions must be (B, H, W) with the same number of pixels in each (see top_regions)")
    if pool.dim() != 4 or pool.shape[1:] != images.shape[1:]:
        raise ValueError(f"the reference images must be (R, C, H, W) like the probes {tuple(images.shape[1:])}, got "
                         f"{tuple(pool.shape)}")
    batch, size = len(images), len(pool)
    index = regions.flatten(1).nonzero()[:, 1].view(batch, count).to(images.device)  # (B, n)
    flat, others = images.flatten(2), pool.to(images).flatten(2)  # (B, C, N), (R, C, N)
    if weights is None:
        weight = torch.ones(batch, count, device=images.device)
    else:
        weight = weights.detach().float().to(images.device).flatten(1).clamp_min(0).gather(1, index)  # (B, n)
        weight = torch.where(weight.sum(1, keepdim=True) > 0, weight, torch.ones_like(weight))
    weight = weight / weight.sum(1, keepdim=True)
    out = torch.empty(batch, size, device=images.device)
    step = max(1, int(chunk) // max(1, size))
    for start in range(0, batch, step):  # a few donors at a time: (b, R, C, n) differences
        part = index[start:start + step]
        own = flat[start:start + step].gather(2, part[:, None, :].expand(-1, flat.shape[1], -1))  # (b, C, n)
        where = part[:, None, None, :].expand(-1, size, flat.shape[1], -1)
        theirs = others[None].expand(len(part), -1, -1, -1).gather(3, where)  # (b, R, C, n)
        difference = (theirs - own[:, None]).abs().float().mean(2)  # (b, R, n)
        out[start:start + step] = (difference * weight[start:start + step, None, :]).sum(2)
    return out


def stamp_regions(images: Tensor, regions: Tensor, classes: Tensor, references: Tensor, labels: Tensor,
                  ratio: float = DEFAULT_STAMP_RATIO, chunk: int = 256, weights: Tensor | None = None) -> Tensor:
    """Bool ``(B,)``: whether each probe's region is a stamp of its class among the reference images.

    The distance of reference ``r`` to probe ``i``'s region is :func:`region_distances`'s (weighted by ``weights``
    ``(B, H, W)``, the maps, when given: the transplant check passes them); ``i``'s region is a stamp
    when its nearest reference labelled ``classes[i]`` is nearer than ``ratio`` times its nearest reference of
    another label. A reference equal to the probe itself (the probes may be among the references) is left out of
    both, also when the probe is explained for a class other than its label.
    ``False`` without a reference of the probe's class or without one of another class.

    Args:
        images: ``(B, C, H, W)`` probes; ``regions``: ``(B, H, W)`` bool, their regions; ``classes``: ``(B,)`` the
            class each region is asked to be a stamp of (what its map explains).
        references: ``(R, C, H, W)`` labelled images of the data the model learns from (the probes may be among
            them); ``labels``: ``(R,)`` their labels.
        ratio: in ``(0, 1]``; smaller is stricter.
    """
    if not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"the stamp ratio must be in (0, 1], got {ratio}")
    labels = torch.as_tensor(labels).long().flatten().to(images.device)
    if len(labels) != len(references):
        raise ValueError(f"the reference labels must be (R,) for {len(references)} reference images, got "
                         f"{len(labels)} labels")
    return stamps_among(images, regions, classes, references.to(images), labels, ratio, chunk, weights)[0]


def stamps_among(images: Tensor, regions: Tensor, classes: Tensor, references: Tensor, labels: Tensor,
                 ratio: float = DEFAULT_STAMP_RATIO, chunk: int = 256, weights: Tensor | None = None
                 ) -> tuple[Tensor, Tensor]:
    """:func:`stamp_regions`'s stamps ``(B,)`` (on the CPU), and which reference is the probe itself: bool
    ``(B, R)`` (on the CPU; a reference equal to the probe over the whole image). ``references`` on the probes'
    device."""
    labels = torch.as_tensor(labels).long().flatten().to(images.device)
    distance = region_distances(images, regions, references, chunk, weights)  # (B, R)
    itself = torch.zeros_like(distance, dtype=torch.bool)  # (B, R): a probe among the references
    for i, r in (distance == 0).nonzero().tolist():  # equal over the region: compare the whole images (few pairs)
        itself[i, r] = torch.equal(images[i], references[r])
    return nearer_to_class(distance, classes, labels, itself, ratio), itself.cpu()


def nearer_to_class(distance: Tensor, classes: Tensor, labels: Tensor, itself: Tensor, ratio: float = 1.0) -> Tensor:
    """Bool ``(B,)``: whether each probe's nearest pool image labelled with its class is nearer than ``ratio`` times
    its nearest pool image of another label (``False`` without either).

    ``distance`` ``(B, R)`` from each probe's region to each pool image, ``classes`` ``(B,)``, ``labels`` ``(R,)``,
    ``itself`` ``(B, R)`` bool: the pool image that is the probe, left out of both.
    """
    classes, labels = classes.to(distance.device).long(), labels.to(distance.device).long()
    same = (labels[None, :] == classes[:, None]) & ~itself
    other = (labels[None, :] != classes[:, None]) & ~itself  # a probe explained for a class not its label
    nearest_same = torch.where(same, distance, math.inf).amin(1)
    nearest_other = torch.where(other, distance, math.inf).amin(1)
    return ((nearest_same < float(ratio) * nearest_other) & torch.isfinite(nearest_other)).cpu()


def stamped_carriers(probe_rates: Tensor, stamps: Tensor, level: float = DEFAULT_CARRIER_LEVEL) -> Tensor:
    """Bool ``(B,)``: the probes whose region is a stamp of their class and carries it into at least ``level`` of
    their transplants (``probe_rates`` ``(B,)`` from the transplant check, ``nan`` for a probe without pairs)."""
    return (probe_rates.nan_to_num(0.0) >= level) & stamps.to(probe_rates.device)
