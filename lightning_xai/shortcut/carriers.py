"""The stamped-carrier check: which donor images hold a small region that is a stamp of their class (the same
pixels at the same place in labelled images of that class, not of the others) *and* carries that class when pasted
at its place into labelled images of other classes? (``docs/methods.md``, "Stamped carriers".)

The donors are images with maps (the probes, and where the method is cheap, the labelled references too); the
recipients are the labelled pool (the probes and the references). Only a donor whose region is a stamp is pasted
anywhere: a region that is no stamp cannot be a stamped carrier, so on a model without a cue the check costs one
forward of the pool and the regions' repeated-pixel shares, and the pastes are spent where the evidence is. Each
stamped donor is pasted into at most ``max_recipients`` pool images of other classes (a seeded choice), with the
moved-region control on the pairs that followed it; at most ``max_donors`` stamps are pasted.

Pure functions of tensors plus a ``predict``; no Lightning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_xai.shortcut.regions import (
    DEFAULT_CHUNK,
    DEFAULT_REGION,
    PredictFn,
    control_shifts,
    predict_chunked,
    target_zero,
    top_regions,
)
from lightning_xai.shortcut.stamps import (
    DEFAULT_CARRIER_LEVEL,
    DEFAULT_MATCH_TOLERANCE,
    DEFAULT_STAMP_MARGIN,
    stamped_carriers,
    stamps_among,
)

#: Most pool images each stamped donor is pasted into (its rate is a share of them; see ``docs/methods.md``).
DEFAULT_MAX_RECIPIENTS = 16
#: Most stamped donors pasted per check (in donor order: the probes first), which bounds the pastes of a model that
#: reads a cue everywhere to ``16 x 16`` (and their control) while the alarm needs two carriers.
DEFAULT_MAX_DONORS = 16


@dataclass
class CarrierResult:
    """What the stamped-carrier check found.

    Attributes:
        regions: ``(D, H, W)`` bool, each donor's region (the top ``fraction`` of its map).
        classes: ``(D,)`` the class each donor's map explains.
        stamps: ``(D,)`` bool, whether each donor's region is a stamp of its class among the pool.
        rates: ``(D,)`` per donor, the share of its transplants into the pool that follow it (its class at the
            region's place and not with the region moved); ``nan`` for a donor not pasted (no stamp, or no pool
            image of another class left).
        donors, recipients: ``(M,)`` the pairs tried: donor index, pool index.
        before, after: ``(M,)`` the recipient's prediction before and after the paste (region at its place).
        moved: ``(M,)`` its prediction with the region moved elsewhere (``-1``: not run, the pair did not follow
            the donor at its place).
        gains: ``(M,)`` rise of the donor class's probability on the recipient.
        level: the share of its transplants a stamped donor must carry to count as a carrier.
    """

    regions: Tensor
    classes: Tensor
    stamps: Tensor
    rates: Tensor
    donors: Tensor
    recipients: Tensor
    before: Tensor
    after: Tensor
    moved: Tensor
    gains: Tensor
    level: float = DEFAULT_CARRIER_LEVEL

    @property
    def follows(self) -> Tensor:
        """``(M,)`` bool: the pairs whose prediction became the donor's class at the region's place and not with
        the region moved."""
        target = self.classes[self.donors]
        return (self.after == target) & (self.moved != target)

    @property
    def carriers(self) -> Tensor:
        """``(D,)`` bool: the stamped carriers (a stamp whose rate reaches :attr:`level`)."""
        return stamped_carriers(self.rates, self.stamps, self.level)

    def flips(self, donors: Tensor | None = None) -> list[tuple[int, int, int, int]]:
        """The pairs that follow their donor as ``(donor, pool recipient, prediction before, after)``, strongest
        (largest rise of the donor class's probability) first; ``donors`` ``(D,)`` bool: only those donors'."""
        chosen = self.follows if donors is None else self.follows & donors.to(self.follows.device)[self.donors]
        index = torch.nonzero(chosen).flatten()
        index = index[self.gains[index].argsort(descending=True)]
        return [(int(self.donors[m]), int(self.recipients[m]), int(self.before[m]), int(self.after[m]))
                for m in index]


def probabilities_of(predict: PredictFn, images: Tensor, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """Softmax ``(N, num_classes)`` of ``images`` (float32, on the CPU), ``chunk`` at a time."""
    return torch.cat([predict(images[start:start + chunk]).float().softmax(-1).cpu()
                      for start in range(0, len(images), chunk)])


def _recipients(eligible: Tensor, most: int, seed: int) -> tuple[Tensor, Tensor]:
    """The pairs ``(donor (M,), pool index (M,))``: for each row of ``eligible`` ``(D, R)`` bool, its first ``most``
    eligible pool images in one seeded order of the pool."""
    order = torch.randperm(eligible.shape[1], generator=torch.Generator().manual_seed(int(seed)))
    ordered = eligible[:, order]
    keep = ordered & (ordered.long().cumsum(1) <= most)
    donors, position = torch.nonzero(keep, as_tuple=True)
    return donors, order[position]


@torch.no_grad()
def carrier_check(
    predict: PredictFn,
    images: Tensor,
    maps: Tensor,
    classes: Tensor,
    pool: Tensor,
    labels: Tensor,
    *,
    fraction: float = DEFAULT_REGION,
    margin: float = DEFAULT_STAMP_MARGIN,
    tolerance: float = DEFAULT_MATCH_TOLERANCE,
    level: float = DEFAULT_CARRIER_LEVEL,
    max_recipients: int = DEFAULT_MAX_RECIPIENTS,
    max_donors: int = DEFAULT_MAX_DONORS,
    chunk: int = DEFAULT_CHUNK,
    seed: int = 0,
    pool_probabilities: Tensor | None = None,
) -> CarrierResult:
    """The stamped-carrier check of donors ``images`` ``(D, C, H, W)`` with their maps ``(D, [K,] H, W)`` and the
    classes ``(D,)`` or ``(D, K)`` those explain (target ``0`` of each), against a labelled pool.

    Args:
        predict: ``images -> logits``, without gradients, in eval mode (see
            :data:`~lightning_xai.shortcut.regions.PredictFn`).
        pool: ``(R, C, H, W)`` labelled images of the data the model learns from (the donors may be among them:
            an image equal to the donor is never its own reference or recipient); ``labels``: ``(R,)``.
        fraction: each region's size as a fraction of the pixels, in ``(0, 1)``.
        margin, tolerance: a region is a stamp when a pool image of its class repeats a share of it (pixels within
            ``tolerance`` standard deviations, weighted by the maps) larger by ``margin`` than any pool image of
            another label does (:func:`~lightning_xai.shortcut.stamps.stamp_regions`).
        level: share of its transplants a stamp must carry to be a carrier.
        max_recipients: most pool images each stamped donor is pasted into: those labelled and predicted as
            another class than the donor's, the first in a ``seed``-ed order of the pool.
        max_donors: most stamped donors pasted (the first in donor order); the others keep a ``nan`` rate and are
            no carriers.
        chunk: images per forward.
        pool_probabilities: ``(R, num_classes)`` the model's probabilities of the pool, when already computed
            (:func:`probabilities_of`; several methods' checks of one event share them), else one forward here.

    Returns:
        a :class:`CarrierResult`.
    """
    maps, classes = target_zero(images, maps, classes, "D")
    given = pool_probabilities
    labels = torch.as_tensor(labels).long().flatten().cpu()
    if pool.dim() != 4 or len(labels) != len(pool):
        raise ValueError(f"the pool must be images (R, C, H, W) with labels (R,), got {tuple(pool.shape)} and "
                         f"{len(labels)} labels")
    if min(int(max_recipients), int(max_donors), int(chunk)) < 1:
        raise ValueError(f"max_recipients, max_donors and chunk must be positive ints, got {max_recipients}, "
                         f"{max_donors} and {chunk}")
    pool = pool.to(images)
    classes = classes.detach().long().cpu()
    regions = top_regions(maps, fraction).to(images.device)
    stamps, itself = stamps_among(images, regions, classes, pool, labels, margin, int(chunk), maps, tolerance)  # (D,)
    before = probabilities_of(predict, pool, int(chunk)) if given is None else given.float().cpu()  # (R, classes)
    if len(before) != len(pool):
        raise ValueError(f"pool_probabilities must be ({len(pool)}, num_classes), got {tuple(before.shape)}")
    predicted = before.argmax(-1)
    tried = stamps & (stamps.long().cumsum(0) <= int(max_donors))
    eligible = tried[:, None] & (labels[None, :] != classes[:, None]) & (predicted[None, :] != classes[:, None]) \
        & ~itself
    donors, recipients = _recipients(eligible, int(max_recipients), seed)
    everything = torch.cat([images, pool])  # donors first, then the pool: one index space for paste
    mask = torch.cat([regions, torch.zeros_like(pool[:, 0], dtype=torch.bool)])
    offset = recipients + len(images)
    probs = predict_chunked(predict, everything, mask, donors, offset, int(chunk), before.shape[-1])
    after, target = probs.argmax(-1), classes[donors]
    gains = probs.gather(1, target[:, None])[:, 0] - before[recipients].gather(1, target[:, None])[:, 0]
    moved = torch.full((len(donors),), -1, dtype=torch.long)
    ran = after == target
    if bool(ran.any()):
        shifts = control_shifts(len(donors), *images.shape[-2:], seed=seed)[ran]
        moved[ran] = predict_chunked(predict, everything, mask, donors[ran], offset[ran], int(chunk),
                                     before.shape[-1], shifts).argmax(-1)
    result = CarrierResult(regions.cpu(), classes, stamps, torch.full((len(images),), math.nan), donors, recipients,
                           predicted[recipients], after, moved, gains, float(level))
    counts = torch.zeros(len(images)).index_add_(0, donors, torch.ones(len(donors)))
    hits = torch.zeros(len(images)).index_add_(0, donors, result.follows.float())
    result.rates = torch.where(counts > 0, hits / counts.clamp_min(1), result.rates)
    return result
