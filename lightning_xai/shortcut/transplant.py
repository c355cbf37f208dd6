"""The causal transplant check: does the small region a probe's map points at carry the probe's class into
other images, at its place? (``docs/methods.md``, "Shortcut statistic".)

For each probe ``i`` explained for class ``c_i``, its region ``R_i`` is the top ``fraction`` of its map's pixels.
``R_i``'s pixels of ``x_i`` are pasted, at the same places, into every probe ``j`` whose prediction is neither
``c_i`` nor explained for ``c_i``; one batched forward (chunked) of those ``B (B - 1)`` images tells which
predictions move to ``c_i``. The control pastes the same pixels at a random other place of ``x_j``. A pair
*follows* its donor when the prediction moves to ``c_i`` with the region at its place and not when it is moved:
a small region that carries its class at its place is what a spurious mark is (a watermark, a tag, a border
mark), while a piece of an object that carries its class (a texture, a part) does so wherever it sits, and a
model unsure between classes flips for either paste.

Optional (``recurrence=True``, off by default): a pair also needs the donor's region to *recur*, its pixels at its
place nearer to another probe of ``c_i`` than to every probe of another class. A mark is a stamp (the same pixels
at the same place in the images of its class), a piece of an object differs between images of its class, so the
condition tells a fixed-place mark from objects that always sit at one place (which the moved control cannot);
but it needs two carriers of the mark among the probes of one class, which 8 probes of a cue on half the images
rarely give (measured in ``docs/methods.md``). Pure functions of tensors plus a ``predict``; no Lightning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_xai.shortcut.carriers import DEFAULT_MAX_RECIPIENTS, CarrierResult, carrier_check, probabilities_of
from lightning_xai.shortcut.regions import (  # noqa: F401 - DEFAULT_REGION, PredictFn, paste: importable from here
    DEFAULT_CHUNK,
    DEFAULT_REGION,
    PredictFn,
    control_shifts,
    paste,
    predict_chunked,
    target_zero,
    top_regions,
)
from lightning_xai.shortcut.stamps import DEFAULT_STAMP_MARGIN, nearer_to_class, region_distances


@dataclass
class TransplantResult:
    """What the transplant check found on one batch of probes.

    Attributes:
        rate: share of the pairs that follow their donor: the prediction became the donor's class with the region
            at its place, (with the control) not with the region moved, and (with the recurrence condition) the
            donor's region recurs in another probe of its class; ``nan`` without any pair (the probes were all
            explained for one class).
        probe_rates: ``(B,)`` per donor probe, the share of its pairs that follow it (``nan`` for a probe with no
            recipient).
        regions: ``(B, H, W)`` bool, each probe's region (the top ``fraction`` of its map).
        classes: ``(B,)`` the class each probe's map explains (the donor's class).
        predictions: ``(B,)`` each probe's prediction before any transplant.
        donors, recipients: ``(M,)`` the pairs tried: donor ``i``'s region pasted into recipient ``j``.
        after: ``(M,)`` the recipient's prediction after the transplant (region at its place).
        gains: ``(M,)`` rise of the donor class's probability on the recipient.
        fraction: the regions' size as a fraction of the pixels.
        moved: ``(M,)`` the recipient's prediction with the region pasted at a random other place (``None``
            without the control; ``-1`` for a pair it did not run on, see ``control_all``).
        recurs: ``(B,)`` bool, whether each probe's region recurs in another probe of its class
            (:func:`recurring_regions`; ``None`` without that condition).
        carrier: the stamped-carrier check (:func:`~lightning_xai.shortcut.carriers.carrier_check`) of the probes
            (its donors ``0 .. B-1``) and of any extra donors (``B ..``), against the labelled references; ``None``
            without references.
    """

    rate: float
    probe_rates: Tensor
    regions: Tensor
    classes: Tensor
    predictions: Tensor
    donors: Tensor
    recipients: Tensor
    after: Tensor
    gains: Tensor
    fraction: float
    moved: Tensor | None = None
    recurs: Tensor | None = None
    carrier: CarrierResult | None = None

    @property
    def stamps(self) -> Tensor | None:
        """``(B,)`` bool, whether each probe's region is a stamp of its class among the labelled references
        (``None`` without references)."""
        return None if self.carrier is None else self.carrier.stamps[:len(self.classes)]

    @property
    def flipped(self) -> Tensor:
        """``(M,)`` bool: the pairs that follow their donor (see :attr:`rate`)."""
        follows = self.after == self.classes[self.donors]
        if self.moved is not None:
            follows = follows & (self.moved != self.classes[self.donors])
        return follows if self.recurs is None else follows & self.recurs[self.donors]

    @property
    def raw_rate(self) -> float:
        """Share of the pairs whose prediction became the donor's class with the region at its place (without
        the control's condition); ``nan`` without any pair."""
        return float((self.after == self.classes[self.donors]).float().mean()) if len(self.donors) else math.nan

    @property
    def control_rate(self) -> float | None:
        """Share of the pairs whose prediction became the donor's class with the region moved elsewhere
        (``None`` without the control, ``nan`` without any pair)."""
        if self.moved is None:
            return None
        ran = self.moved >= 0
        if not bool(ran.any()):
            return math.nan
        return float((self.moved[ran] == self.classes[self.donors][ran]).float().mean())

    def flips(self) -> list[tuple[int, int, int, int]]:
        """The flipped pairs as ``(donor i, recipient j, prediction before, prediction after)``, strongest
        (largest rise of the donor class's probability) first."""
        chosen = torch.nonzero(self.flipped).flatten()
        chosen = chosen[self.gains[chosen].argsort(descending=True)]
        return [(int(self.donors[m]), int(self.recipients[m]), int(self.predictions[self.recipients[m]]),
                 int(self.after[m])) for m in chosen]

    def strongest(self) -> tuple[int, int, int, int] | None:
        """The flipped pair with the largest rise of the donor class's probability, or ``None``."""
        flips = self.flips()
        return flips[0] if flips else None

    @property
    def carriers(self) -> Tensor | None:
        """``(B,)`` bool: the *stamped carriers*, probes whose region is a stamp of their class and carries it into at
        least a third of their transplants into the references (``None`` without references; see
        ``docs/methods.md``)."""
        return None if self.carrier is None else self.carrier.carriers[:len(self.classes)]

    @property
    def carrier_share(self) -> float | None:
        """Share of the donor probes (those with pairs) that are stamped carriers: ``nan`` without pairs, ``None``
        without references. One stamped carrier is the evidence of a shortcut (``docs/methods.md``)."""
        if self.carriers is None:
            return None
        donors = ~torch.isnan(self.probe_rates)
        return float(self.carriers[donors].float().mean()) if bool(donors.any()) else math.nan

    def carrier_probes(self) -> list[int] | None:
        """The stamped carriers' indices (see :attr:`carriers`), ``None`` without references."""
        carriers = self.carriers
        return None if carriers is None else [int(i) for i in torch.nonzero(carriers).flatten()]

    def extra_carriers(self) -> list[int] | None:
        """The stamped carriers among the extra donors (``transplant_check(..., extra_donors=...)``), as indices into
        them; ``None`` without references."""
        if self.carrier is None:
            return None
        return [int(i) for i in torch.nonzero(self.carrier.carriers[len(self.classes):]).flatten()]

    def probes_above(self, threshold: float) -> list[int]:
        """The donor probes whose own rate is at least ``threshold``."""
        return [int(i) for i in torch.nonzero(self.probe_rates >= threshold).flatten()]


def transplant_pairs(classes: Tensor, predictions: Tensor) -> tuple[Tensor, Tensor]:
    """Donor and recipient indices ``(M,)`` of every pair ``(i, j)`` with ``i != j`` whose recipient is neither
    explained for nor predicted as the donor's class: ``classes`` ``(B,)`` (what each map explains) and
    ``predictions`` ``(B,)``."""
    eligible = (classes[:, None] != classes[None, :]) & (predictions[None, :] != classes[:, None])
    donors, recipients = torch.nonzero(eligible, as_tuple=True)
    return donors, recipients


def recurring_regions(images: Tensor, regions: Tensor, classes: Tensor, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """Bool ``(B,)``: whether each probe's region recurs in another probe of its class.

    ``images`` ``(B, C, H, W)``, ``regions`` ``(B, H, W)`` bool with the same number of pixels each (as
    :func:`top_regions` gives), ``classes`` ``(B,)``. The distance of probe ``k`` to probe ``i``'s region is the
    mean absolute difference of their pixels over ``R_i`` (all channels, at the same places); ``i``'s region
    recurs when the nearest other probe of class ``c_i`` is nearer than every probe of another class. ``False``
    for a probe without another probe of its class (nothing to recur in) or without a probe of another class.
    """
    distance = region_distances(images, regions, images, chunk)  # (B, B)
    itself = torch.eye(len(images), dtype=torch.bool, device=distance.device)
    return nearer_to_class(distance, classes, classes, itself)


@torch.no_grad()
def transplant_check(
    predict: PredictFn,
    images: Tensor,
    maps: Tensor,
    classes: Tensor,
    fraction: float = DEFAULT_REGION,
    *,
    chunk: int = DEFAULT_CHUNK,
    control: bool = True,
    recurrence: bool = False,
    control_all: bool = False,
    references: tuple[Tensor, Tensor] | None = None,
    stamp_margin: float = DEFAULT_STAMP_MARGIN,
    extra_donors: tuple[Tensor, Tensor, Tensor] | None = None,
    max_recipients: int = DEFAULT_MAX_RECIPIENTS,
    seed: int = 0,
    pool_probabilities: Tensor | None = None,
    probabilities: Tensor | None = None,
) -> TransplantResult:
    """The transplant check on probes ``images`` ``(B, C, H, W)`` (as the model takes them) with their maps
    ``(B, [K,] H, W)`` and the classes ``(B,)`` or ``(B, K)`` those maps explain (target ``0`` of each is used).

    Args:
        predict: ``images -> logits``, run without gradients in eval mode (see :data:`PredictFn`).
        fraction: each region's size as a fraction of the pixels, in ``(0, 1)``.
        chunk: transplanted images per forward.
        control: also paste each region at a random other place (a shift of a quarter to three quarters of the
            side, wrapping around; another forward of the same size; ``seed`` draws the places), and count a pair
            only when its region carries the class at its place and not there. ``False``: the raw rate.
        recurrence: also count a pair only when the donor's region recurs in another probe of its class
            (:func:`recurring_regions`: a stamp, not a piece of one object); the probes then need two carriers of
            the mark in one class for a pair to count. Off by default (see the module docstring for why).
        control_all: run the control on every pair. By default it runs only on the pairs that followed their donor
            at its place, the only ones it can rule out: the rate is the same, and on a model without a shortcut
            (few pairs follow) the check costs about one forward of the pairs instead of two. The other pairs'
            ``moved`` is ``-1`` (not run), and :attr:`TransplantResult.control_rate` is then the control's rate
            among the pairs it ran on.
        references: ``(images (R, C, H, W), labels (R,))``, labelled images of the data the model learns from (the
            probes with their labels may be among them; about 24 or more, several per class): the stamped-carrier
            check (:func:`~lightning_xai.shortcut.carriers.carrier_check`) then runs on the probes (and
            ``extra_donors``) against them: each region is tested for being a stamp of its class among them
            (repeated pixels weighted by the maps), and each stamp is pasted into references of other classes. It gives
            :attr:`TransplantResult.carrier`, :attr:`~TransplantResult.stamps`, :attr:`~TransplantResult.carriers`
            and :meth:`~TransplantResult.extra_carriers`; the rate is unchanged.
        stamp_margin: how much larger a share of a stamp's region a reference of its class must repeat than any
            reference of another class (see :func:`~lightning_xai.shortcut.stamps.stamp_regions`).
        extra_donors: ``(images (E, C, H, W), maps (E, [K,] H, W), classes (E,) or (E, K))``: more explained images
            (e.g. the references themselves) that the carrier check also tries as donors; used with
            ``references`` only. More donors catch a cue that few probes carry (a cue on half the images).
        max_recipients: most references each stamped donor is pasted into.
        pool_probabilities: ``(R, num_classes)`` the model's probabilities of the references, when already
            computed (see :func:`~lightning_xai.shortcut.carriers.carrier_check`).
        probabilities: ``(B, num_classes)`` the model's probabilities of ``images``, when already computed (as
            :func:`~lightning_xai.shortcut.carriers.probabilities_of` gives them for ``predict``); else one forward
            here.

    Returns:
        a :class:`TransplantResult`.
    """
    maps, classes = target_zero(images, maps, classes)
    if int(chunk) < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk}")
    regions = top_regions(maps, fraction).to(images.device)
    classes = classes.detach().long().cpu()
    before = probabilities_of(predict, images, int(chunk)) if probabilities is None else probabilities.float().cpu()
    if before.shape[0] != len(images):
        raise ValueError(f"probabilities must be (B, num_classes) for the {len(images)} images, got "
                         f"{tuple(before.shape)}")
    predictions = before.argmax(-1)
    donors, recipients = transplant_pairs(classes, predictions)
    probs = predict_chunked(predict, images, regions, donors, recipients, int(chunk), before.shape[-1])
    after, target = probs.argmax(-1), classes[donors]
    gains = probs.gather(1, target[:, None])[:, 0] - before[recipients].gather(1, target[:, None])[:, 0]
    moved = None
    if control:
        shifts = control_shifts(len(donors), *images.shape[-2:], seed=seed)
        ran = torch.ones(len(donors), dtype=torch.bool) if control_all else after == target
        moved = torch.full((len(donors),), -1, dtype=torch.long)
        moved[ran] = predict_chunked(predict, images, regions, donors[ran], recipients[ran], int(chunk),
                                     before.shape[-1], shifts[ran]).argmax(-1)
    recurs = recurring_regions(images, regions, classes, int(chunk)) if recurrence else None
    carrier = None
    if references is not None:
        carrier = _carriers(predict, images, maps, classes, references, extra_donors, stamp_margin, fraction,
                            max_recipients, int(chunk), seed, pool_probabilities)
    result = TransplantResult(math.nan, torch.full((len(images),), math.nan), regions.cpu(), classes, predictions,
                              donors, recipients, after, gains, float(fraction), moved, recurs, carrier)
    follows = result.flipped.float()
    counts = torch.zeros(len(images)).index_add_(0, donors, torch.ones(len(donors)))
    hits = torch.zeros(len(images)).index_add_(0, donors, follows)
    result.probe_rates = torch.where(counts > 0, hits / counts.clamp_min(1), result.probe_rates)
    result.rate = float(follows.mean()) if len(donors) else math.nan
    return result


def _carriers(predict: PredictFn, images: Tensor, maps: Tensor, classes: Tensor, references: tuple[Tensor, Tensor],
              extra: tuple[Tensor, Tensor, Tensor] | None, margin: float, fraction: float, max_recipients: int,
              chunk: int, seed: int, probabilities: Tensor | None) -> CarrierResult:
    """The carrier check of the probes (``maps`` ``(B, H, W)``, ``classes`` ``(B,)``) and the ``extra`` donors."""
    pool, labels = references
    if extra is not None:
        more = extra[0]
        more_maps, more_classes = target_zero(more, extra[1], extra[2], "E")
        if more.shape[1:] != images.shape[1:]:
            raise ValueError(f"the extra donors must be images {tuple(images.shape[1:])} like the probes, got "
                             f"{tuple(more.shape)}")
        images = torch.cat([images, more.to(images)])
        maps = torch.cat([maps.to(images.device), more_maps.to(images.device, maps.dtype)])
        classes = torch.cat([classes, more_classes.detach().long().cpu()])
    return carrier_check(predict, images, maps, classes, pool, labels, fraction=fraction, margin=margin,
                         max_recipients=max_recipients, chunk=chunk, seed=seed, pool_probabilities=probabilities)
