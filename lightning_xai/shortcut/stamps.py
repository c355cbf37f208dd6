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
from collections.abc import Callable

import torch
from torch import Tensor

#: Two pixels are "the same" when every channel differs by at most this many standard deviations of the pool's pixel
#: values (about 2 % of an 8-bit image's range under the usual normalisation: rounding and mild compression noise,
#: not a different colour); see ``docs/methods.md``, "Stamped carriers".
DEFAULT_MATCH_TOLERANCE = 0.1
#: A region is a stamp when the share of its (map-weighted) pixels that some reference of its class repeats exceeds the
#: share that any reference of another label repeats by at least this much (measured in ``docs/methods.md``).
DEFAULT_STAMP_MARGIN = 0.15
#: A probe carries its class when at least this share of its transplants follow it (see ``docs/methods.md``).
DEFAULT_CARRIER_LEVEL = 1 / 3


def _weighted_over_region(images: Tensor, regions: Tensor, pool: Tensor, chunk: int, weights: Tensor | None,
                          per_pixel: Callable[[Tensor], Tensor]) -> Tensor:
    """``(B, R)``: ``per_pixel`` of the absolute differences between each image's region pixels and each pool image's
    at the same places (``(b, R, C, n)`` -> ``(b, R, n)``), averaged over the region with ``weights`` ``(B, H, W)``
    (>= 0, normalised within the region; equal without them). Checks the shapes (see :func:`region_distances`)."""
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
    weight = torch.ones(batch, count, device=images.device) if weights is None else \
        weights.detach().float().to(images.device).flatten(1).clamp_min(0).gather(1, index)  # (B, n)
    weight = torch.where(weight.sum(1, keepdim=True) > 0, weight, torch.ones_like(weight))
    weight = weight / weight.sum(1, keepdim=True)
    out = torch.empty(batch, size, device=images.device)
    step = max(1, int(chunk) // max(1, size))
    for start in range(0, batch, step):  # a few donors at a time: (b, R, C, n) differences
        part = index[start:start + step]
        own = flat[start:start + step].gather(2, part[:, None, :].expand(-1, flat.shape[1], -1))  # (b, C, n)
        where = part[:, None, None, :].expand(-1, size, flat.shape[1], -1)
        theirs = others[None].expand(len(part), -1, -1, -1).gather(3, where)  # (b, R, C, n)
        values = per_pixel((theirs - own[:, None]).abs().float())  # (b, R, n)
        out[start:start + step] = (values * weight[start:start + step, None, :]).sum(2)
    return out


def region_distances(images: Tensor, regions: Tensor, pool: Tensor, chunk: int = 256,
                     weights: Tensor | None = None) -> Tensor:
    """``(B, R)``: mean absolute difference between each image's pixels and each pool image's pixels over the
    image's region, at the same places, all channels; with ``weights`` ``(B, H, W)`` (e.g. the maps, >= 0), the
    mean is weighted by them within the region (the pixels the map points at most count most).

    ``images`` ``(B, C, H, W)``, ``regions`` ``(B, H, W)`` bool with the same number of pixels each (as
    :func:`~lightning_xai.shortcut.transplant.top_regions` gives), ``pool`` ``(R, C, H, W)``. ``chunk`` bounds the
    ``(b, R, C, n)`` differences held at once.
    """
    return _weighted_over_region(images, regions, pool, chunk, weights, lambda difference: difference.mean(2))


def region_match_shares(images: Tensor, regions: Tensor, pool: Tensor, tolerance: float, chunk: int = 256,
                        weights: Tensor | None = None) -> Tensor:
    """``(B, R)``: the share of each image's region that each pool image repeats, pixel for pixel: the pixels of the
    region whose values are within ``tolerance`` (absolute, in the images' units) of the pool image's at the same place
    in every channel, each pixel counted with its weight (``weights`` ``(B, H, W)``, e.g. the maps, >= 0; equal
    weights without them). ``1``: the pool image holds the same pixels over the whole region.

    Shapes as for :func:`region_distances`; ``chunk`` bounds the ``(b, R, C, n)`` differences held at once.
    """
    return _weighted_over_region(images, regions, pool, chunk, weights,
                                 lambda difference: (difference.amax(2) <= float(tolerance)).float())


def stamp_regions(images: Tensor, regions: Tensor, classes: Tensor, references: Tensor, labels: Tensor,
                  margin: float = DEFAULT_STAMP_MARGIN, chunk: int = 256, weights: Tensor | None = None,
                  tolerance: float = DEFAULT_MATCH_TOLERANCE) -> Tensor:
    """Bool ``(B,)``: whether each probe's region is a stamp of its class among the reference images: the same
    pixels at the same place in a reference labelled with its class, and not in the references of other labels.

    Reference ``r`` repeats share ``m(r)`` of probe ``i``'s region (:func:`region_match_shares`, pixels within
    ``tolerance`` standard deviations of the references' pixel values, weighted by ``weights`` ``(B, H, W)``, the
    maps, when given: the transplant check passes them); ``i``'s region is a stamp when the largest ``m`` among the
    references labelled ``classes[i]`` exceeds the largest among the references of other labels by ``margin`` or more.
    A shared share, not a mean distance over the region: a mark that fills a fifth of the region is repeated exactly
    there by the images of its class, while the rest of the region (background, object) differs in all of them. A
    reference equal to the probe itself (the probes may be among the references) is left out of both, also when the
    probe is explained for a class other than its label. ``False`` without a reference of the probe's class or
    without one of another class.

    Args:
        images: ``(B, C, H, W)`` probes; ``regions``: ``(B, H, W)`` bool, their regions; ``classes``: ``(B,)`` the
            class each region is asked to be a stamp of (what its map explains).
        references: ``(R, C, H, W)`` labelled images of the data the model learns from (the probes may be among
            them); ``labels``: ``(R,)`` their labels.
        margin: in ``(0, 1]``, a share of the region; larger is stricter.
        tolerance: ``> 0``, in standard deviations of the references' pixel values.
    """
    labels = torch.as_tensor(labels).long().flatten().to(images.device)
    if len(labels) != len(references):
        raise ValueError(f"the reference labels must be (R,) for {len(references)} reference images, got "
                         f"{len(labels)} labels")
    return stamps_among(images, regions, classes, references.to(images), labels, margin, chunk, weights,
                        tolerance)[0]


def stamps_among(images: Tensor, regions: Tensor, classes: Tensor, references: Tensor, labels: Tensor,
                 margin: float = DEFAULT_STAMP_MARGIN, chunk: int = 256, weights: Tensor | None = None,
                 tolerance: float = DEFAULT_MATCH_TOLERANCE) -> tuple[Tensor, Tensor]:
    """:func:`stamp_regions`'s stamps ``(B,)`` (on the CPU), and which reference is the probe itself: bool
    ``(B, R)`` (on the CPU; a reference equal to the probe over the whole image). ``references`` on the probes'
    device."""
    if not 0.0 < float(margin) <= 1.0:
        raise ValueError(f"the stamp margin must be in (0, 1] (a share of the region), got {margin}")
    if not float(tolerance) > 0.0:
        raise ValueError(f"the match tolerance must be > 0 (standard deviations of the pixel values), got {tolerance}")
    labels = torch.as_tensor(labels).long().flatten().to(images.device)
    scale = float(references.float().std()) if references.numel() > 1 else 1.0
    shares = region_match_shares(images, regions, references, float(tolerance) * max(scale, 1e-12), chunk,
                                 weights)  # (B, R)
    itself = torch.zeros_like(shares, dtype=torch.bool)  # (B, R): a probe among the references
    for i, r in (shares >= 1.0 - 1e-6).nonzero().tolist():  # the whole region repeated: compare the whole images
        itself[i, r] = torch.equal(images[i], references[r])
    return repeated_in_class(shares, classes, labels, itself, margin), itself.cpu()


def repeated_in_class(shares: Tensor, classes: Tensor, labels: Tensor, itself: Tensor, margin: float) -> Tensor:
    """Bool ``(B,)``: whether the largest share of each probe's region repeated by a pool image labelled with its
    class exceeds the largest repeated by a pool image of another label by ``margin`` or more (``False`` without
    either). ``shares`` ``(B, R)`` from :func:`region_match_shares`, ``classes`` ``(B,)``, ``labels`` ``(R,)``,
    ``itself`` ``(B, R)`` bool: the pool image that is the probe, left out of both."""
    classes, labels = classes.to(shares.device).long(), labels.to(shares.device).long()
    same = (labels[None, :] == classes[:, None]) & ~itself
    other = (labels[None, :] != classes[:, None]) & ~itself
    best_same = torch.where(same, shares, -1.0).amax(1)
    best_other = torch.where(other, shares, -1.0).amax(1)
    return (same.any(1) & other.any(1) & (best_same - best_other >= float(margin))).cpu()


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
