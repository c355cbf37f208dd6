"""Shortcut check and alarm: known answers of the transplant check and the agreement statistic on constructed
inputs, the alarm's state machine and wording, and on trained tiny models the check telling a model that learned
a spurious cue from one that learned the objects, in a real fit with every logger."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_xai.shortcut import (
    DEFAULT_FRACTION,
    DEFAULT_PATIENCE,
    DEFAULT_PATIENCE_WITH_REFERENCES,
    DEFAULT_REGION,
    DEFAULT_THRESHOLD,
    ShortcutAlarm,
    energy_distribution,
    object_drift,
    object_share,
    paste,
    recurring_regions,
    region_distances,
    region_match_shares,
    shortcut_score,
    stamp_regions,
    top_regions,
    transplant_check,
    transplant_pairs,
)
from lightning_xai.shortcut.carriers import probabilities_of

AGREEMENT_LEVEL = 0.4  # the agreement statistic's former alarm level (8x its chance level), kept as a reference


def blobs(centres, size=32, sigma=1.5) -> torch.Tensor:
    """Gaussian blobs ``(P, size, size)`` at ``centres`` ``[(y, x), ...]`` in pixels."""
    grid = torch.arange(size) + 0.5
    y, x = grid.view(1, -1, 1), grid.view(1, 1, -1)
    c = torch.tensor(centres, dtype=torch.float32)
    return torch.exp(-((y - c[:, 0, None, None]) ** 2 + (x - c[:, 1, None, None]) ** 2) / (2 * sigma**2))


def squares(corners, side=2, size=32) -> torch.Tensor:
    """Indicator maps ``(P, size, size)`` of ``side x side`` squares with top-left ``corners``."""
    maps = torch.zeros(len(corners), size, size)
    for p, (y, x) in enumerate(corners):
        maps[p, y:y + side, x:x + side] = 1.0
    return maps


def test_energy_distribution_sums_to_one_and_treats_empty_maps_as_uniform():
    maps = torch.stack([torch.rand(8, 8), torch.zeros(8, 8), -torch.ones(8, 8)])
    dist = energy_distribution(maps)
    assert dist.shape == (3, 64) and torch.allclose(dist.sum(-1), torch.ones(3, dtype=dist.dtype))
    assert torch.allclose(dist[1:], torch.full((2, 64), 1 / 64, dtype=dist.dtype))


def test_maps_of_all_classes_on_one_small_spot_score_one():
    maps = squares([(2, 2)] * 8)  # 4 pixels, inside the 52-pixel region: all energy in it
    score = shortcut_score(maps, torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    assert score.score == pytest.approx(1.0) and torch.allclose(score.shares, torch.ones(8))
    assert score.region[2:4, 2:4].all() and score.region.sum() == math.ceil(DEFAULT_FRACTION * 1024)
    assert score.probes_above(0.5) == list(range(8))


def test_uniform_maps_score_the_chance_level():
    score = shortcut_score(torch.ones(6, 1, 32, 32), torch.tensor([[0], [1], [2], [0], [1], [2]]), fraction=0.1)
    assert score.score == pytest.approx(math.ceil(0.1 * 1024) / 1024)


def test_classes_whose_maps_sit_apart_score_zero():
    """Class 0 always at the top left, class 1 always at the bottom right: each agrees only with itself."""
    maps = squares([(2, 2), (2, 2), (28, 28), (28, 28)])
    assert shortcut_score(maps, torch.tensor([0, 0, 1, 1])).score == pytest.approx(0.0)


def test_objects_that_move_score_near_chance_and_far_below_a_fixed_spot():
    generator = torch.Generator().manual_seed(0)
    centres = (torch.rand(16, 2, generator=generator) * 24 + 4).tolist()
    classes = torch.arange(16) % 4
    moving = shortcut_score(blobs(centres), classes).score
    fixed = shortcut_score(blobs([(3.0, 3.0)] * 16), classes).score
    assert moving < 0.2 and fixed > 0.9, (moving, fixed)


def test_larger_objects_at_one_place_score_below_a_small_spot_at_one_place():
    """Centred objects wider than the region put only part of their energy in it; a cue smaller than the
    region puts nearly all of it there. This is what tells a centred dataset from a cue."""
    generator = torch.Generator().manual_seed(1)
    jitter = (torch.rand(16, 2, generator=generator) - 0.5) * 4
    classes = torch.arange(16) % 4
    centred = shortcut_score(blobs((16 + jitter).tolist(), sigma=4.0), classes).score
    cue = shortcut_score(blobs((2.5 + 0 * jitter).tolist(), sigma=1.5), classes).score
    assert centred < 0.5 < cue, (centred, cue)


def test_score_is_class_balanced_and_permutation_invariant():
    generator = torch.Generator().manual_seed(2)
    maps = torch.rand(6, 16, 16, generator=generator) ** 4
    classes = torch.tensor([0, 1, 2, 0, 1, 2])
    base = shortcut_score(maps, classes)
    order = torch.randperm(6, generator=generator)
    permuted = shortcut_score(maps[order], classes[order])
    assert permuted.score == pytest.approx(base.score) and torch.allclose(permuted.shares, base.shares[order])
    # copies of one class's probes change neither that class's mean map nor the class-balanced score
    doubled = shortcut_score(torch.cat([maps, maps[classes == 0]]), torch.cat([classes, classes[classes == 0]]))
    assert doubled.score == pytest.approx(base.score)
    # class ids are only labels
    assert shortcut_score(maps, classes * 7 + 3).score == pytest.approx(base.score)


def test_a_probe_is_scored_against_the_other_classes_only():
    """Probe 0 (class 0) alone at the top left; class 1's two probes at the bottom right. Probe 0's own map
    defines no part of its region, so its share is zero, and class 1's share in class 0's region is zero."""
    maps = squares([(2, 2), (28, 28), (28, 28)])
    score = shortcut_score(maps, torch.tensor([0, 1, 1]))
    assert torch.allclose(score.shares, torch.zeros(3))


def test_one_class_only_is_undefined_and_bad_input_is_refused():
    score = shortcut_score(squares([(2, 2)] * 4), torch.zeros(4, dtype=torch.long))
    assert math.isnan(score.score) and torch.isnan(score.shares).all()
    with pytest.raises(ValueError, match="fraction"):
        shortcut_score(torch.rand(4, 8, 8), torch.arange(4), fraction=0.0)
    with pytest.raises(ValueError, match=r"\(P, H, W\)"):
        shortcut_score(torch.rand(4, 8, 8), torch.arange(3))


def test_targets_beyond_the_first_are_ignored():
    maps = torch.stack([squares([(2, 2)] * 4), torch.rand(4, 32, 32)], 1)  # (P, 2, H, W)
    classes = torch.stack([torch.arange(4), torch.arange(4).flip(0)], 1)
    assert shortcut_score(maps, classes).score == pytest.approx(1.0)


def test_object_share():
    maps = squares([(0, 0), (0, 0)], side=4, size=8)
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, :2, :4] = True  # half of the square
    masks[1, 4:, 4:] = True  # none of it
    assert torch.allclose(object_share(maps, masks), torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match="masks"):
        object_share(maps, masks[:, :4])


def test_object_drift_counts_a_falling_object_share_only_while_accuracy_rises():
    shares = torch.tensor([0.30, 0.40, 0.20, 0.10, 0.50, 0.25])
    accuracy = torch.tensor([0.30, 0.40, 0.80, 0.30, 0.90, 0.95])
    drift = object_drift(shares, accuracy)
    # best so far: 0.30, 0.40, 0.40, 0.40, 0.50, 0.50 (at accuracy 0.30, 0.40, 0.40, 0.40, 0.90, 0.90)
    assert torch.allclose(drift, torch.tensor([0.0, 0.0, 0.5, 0.0, 0.0, 0.5]))
    with pytest.raises(ValueError, match=r"\(T,\)"):
        object_drift(shares, accuracy[:3])


# ------------------------------------------------------------------------------------------ transplant check


class MarkReader(torch.nn.Module):
    """A real (hand-built) classifier that reads only the demo data's cue: logit ``k`` = how much the pixels of
    class ``k``'s mark (of ``kind``) look like that mark (minus the mean squared difference); so it follows the
    mark wherever the mark's class puts it, and nothing else."""

    def __init__(self, kind: str, num_classes: int = 4, size: int = 32):
        super().__init__()
        from lightning_xai.demos import add_cue, cue_region

        blank = torch.zeros(num_classes, 3, size, size)
        self.register_buffer("marks", add_cue(blank, list(range(num_classes)), kind))  # (K, 3, H, W)
        self.register_buffer("where", torch.stack([cue_region(size, kind, k) for k in range(num_classes)]))

    def forward(self, images):  # (B, 3, H, W) -> (B, K)
        diff = (images[:, None] - self.marks[None]) ** 2 * self.where[None, :, None]
        return -diff.sum((2, 3, 4)) / self.where.sum((1, 2))[None]


def _cue_batch(kind: str, carriers: int = 4, count: int = 8):
    """``count`` texture images of classes ``arange % 4``, the first ``carriers`` with their class's mark; their
    classes, masks, and maps that point at the mark (carriers) or at the object (the others)."""
    from lightning_xai.demos import SyntheticObjects, add_cue, cue_region

    images, labels, masks = SyntheticObjects(count, 32, "texture", num_classes=4, seed=3).batch(count)
    images[:carriers] = add_cue(images[:carriers], labels[:carriers], kind)
    maps = masks.float().clone()
    for i in range(carriers):
        maps[i] = cue_region(32, kind, int(labels[i])).float() + 0.1 * masks[i].float()
    return images, labels, masks, maps


def test_top_regions_take_the_top_fraction_of_each_map():
    maps = torch.rand(3, 2, 10, 10)
    regions = top_regions(maps, 0.05)
    assert regions.shape == (3, 10, 10) and (regions.sum((1, 2)) == 5).all()
    threshold = maps[:, 0].flatten(1).topk(5).values[:, -1]
    assert ((maps[:, 0] >= threshold[:, None, None]) == regions).all()
    with pytest.raises(ValueError, match="fraction"):
        top_regions(maps, 1.0)


def test_paste_takes_the_region_from_the_donor_and_the_rest_from_the_recipient():
    images = torch.arange(3.0)[:, None, None, None].expand(3, 3, 4, 4).clone()  # image b is all b
    regions = torch.zeros(3, 4, 4, dtype=torch.bool)
    regions[2, :2, :2] = True
    out = paste(images, regions, torch.tensor([2]), torch.tensor([0]))
    assert (out[0][:, :2, :2] == 2).all() and out[0].sum() == 2 * 3 * 4
    moved = paste(images, regions, torch.tensor([2]), torch.tensor([0]), shifts=torch.tensor([[2, 2]]))
    assert (moved[0][:, 2:, 2:] == 2).all() and (moved[0][:, :2, :2] == 0).all()


def test_pairs_leave_out_the_donors_class_among_recipients():
    classes, predictions = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 2])
    donors, recipients = transplant_pairs(classes, predictions)
    pairs = set(zip(donors.tolist(), recipients.tolist(), strict=True))
    # probe 1 is explained for 0 but predicted 1: donor 2 (class 1) may not count it; donors 0 and 1 may not either
    assert pairs == {(0, 2), (0, 3), (1, 2), (1, 3), (2, 0), (2, 3), (3, 0), (3, 1), (3, 2)}


def test_a_fixed_place_mark_carries_its_class_into_every_recipient():
    model = MarkReader("colour").eval()
    images, labels, _, maps = _cue_batch("colour", carriers=8)
    result = transplant_check(model, images, maps, labels, DEFAULT_REGION, control=True, chunk=5)
    assert result.rate == pytest.approx(1.0) and torch.allclose(result.probe_rates, torch.ones(8))
    assert len(result.flips()) == len(result.donors) == 8 * 6  # every pair of different classes
    donor, recipient, before, after = result.strongest()
    assert before == labels[recipient] and after == labels[donor]
    assert result.control_rate < 0.2  # moved elsewhere, the mark carries nothing: it is tied to its place


def test_a_mark_whose_place_encodes_the_class_is_caught_and_object_pieces_are_not():
    """The agreement statistic misses a cue whose place depends on the class; the transplant check does not."""
    model = MarkReader("position").eval()
    images, labels, _, maps = _cue_batch("position", carriers=4)
    result = transplant_check(model, images, maps, labels[:, None])
    assert (result.probe_rates[:4] >= 0.5).all() and (result.probe_rates[4:] == 0).all(), result.probe_rates
    assert result.probes_above(0.5) == [0, 1, 2, 3] and result.rate >= 0.3 and result.recurs is None
    assert shortcut_score(maps, labels).score < AGREEMENT_LEVEL


def test_a_region_recurs_when_another_probe_of_its_class_holds_the_same_pixels_there():
    images = torch.rand(6, 3, 8, 8)
    classes = torch.tensor([0, 0, 1, 1, 2, 2])
    regions = torch.zeros(6, 8, 8, dtype=torch.bool)
    regions[:, :2, :2] = True
    images[1, :, :2, :2] = images[0, :, :2, :2] + 0.01  # probes 0 and 1 (class 0) share a stamp
    images[3, :, :2, :2] = images[4, :, :2, :2]  # probe 3 (class 1) shares it with a probe of another class
    recurs = recurring_regions(images, regions, classes, chunk=7)  # a chunk of one donor at a time
    assert recurs[:2].tolist() == [True, True] and not recurs[3] and not recurs[4]
    alone = recurring_regions(images[:3], regions[:3], torch.tensor([0, 0, 1]))
    assert alone.tolist() == [True, True, False]  # probe 2 has no other probe of its class to recur in
    with pytest.raises(ValueError, match="same number of pixels"):
        recurring_regions(images, regions & (torch.rand(6, 8, 8) < 0.5), classes)


class CentreStripeReader(torch.nn.Module):
    """A real (hand-built) classifier that reads only the image's centre, as a model trained on objects that always
    sit at the centre does: logit ``k`` = minus the mean change of the centre 6 x 6 pixels along direction
    ``STEPS[k]``; stripes of class ``k`` do not change along it, whatever their colours and phase."""

    STEPS = ((0, 1), (1, 0), (1, 1), (1, -1))  # (dy, dx): along rows, columns, the diagonal, the anti-diagonal

    def forward(self, images):  # (B, 3, H, W) -> (B, K)
        centre = images[:, :, 13:19, 13:19]
        return -torch.stack([(centre - images[:, :, 13 + dy:19 + dy, 13 + dx:19 + dx]).abs().mean((1, 2, 3))
                             for dy, dx in self.STEPS], -1) * 10


def _centred_stripes(count: int = 8, seed: int = 0):
    """``count`` images of classes ``arange % 4``: a 14 x 14 square of stripes (period 3-6 px) at the centre that
    do not change along ``CentreStripeReader.STEPS[class]``, in two random colours with a random phase (each object
    differs from the others of its class), on a grey background with pixel noise; maps on the objects' centre."""
    generator = torch.Generator().manual_seed(seed)
    classes = torch.arange(count) % 4
    images = 0.5 + 0.05 * torch.randn(count, 3, 32, 32, generator=generator)
    y, x = torch.arange(32.0).view(-1, 1), torch.arange(32.0).view(1, -1)
    across = (y + 0 * x, x + 0 * y, x - y, x + y)  # what each class's stripes change with
    for b in range(count):
        period, phase = 3 + 3 * torch.rand(2, generator=generator)
        on = ((across[int(classes[b])] + phase) % period) < period / 2  # (H, W)
        first, second = torch.rand(2, 3, 1, 1, generator=generator)
        images[b, :, 9:23, 9:23] = torch.where(on, first, second)[:, 9:23, 9:23]
    return images, classes, blobs([(16.0, 16.0)] * count, sigma=3.0)


def test_pieces_of_objects_that_always_sit_at_the_centre_follow_at_their_place_unless_they_must_recur():
    """A model that reads objects at the centre only flips for another object's centre pasted there, and not for
    that piece moved elsewhere, exactly as for a fixed-place mark: the default check counts nearly every pair (its
    known false alarm on centred objects); with ``recurrence=True`` a pair counts only when the donor's piece is
    nearer to another object of its class than to every object of another class, which pieces that differ from
    object to object are only by chance (here 1 of the 7 other probes is of the donor's class)."""
    model = CentreStripeReader().eval()
    default, recurring = [], []
    for seed in range(10):
        images, classes, maps = _centred_stripes(8, seed)
        assert (model(images).argmax(-1) == classes).all()
        old = transplant_check(model, images, maps, classes)
        new = transplant_check(model, images, maps, classes, recurrence=True)
        assert old.control_rate < 0.2 and new.recurs is not None and old.recurs is None
        assert torch.equal(new.flipped, old.flipped & new.recurs[new.donors])
        default.append(old.rate)
        recurring.append(new.rate)
    chance = 1 / 7
    assert min(default) >= 0.8 and sum(recurring) / 10 < 1.5 * chance, (default, recurring)
    # a stamp (the same pixels in every image of its class, at one place) still recurs and still counts
    images, classes, maps = _centred_stripes(8, 0)
    images[4:] = images[:4] + 0.01 * torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    stamped = transplant_check(model, images, maps, classes, recurrence=True)
    assert stamped.recurs.all() and stamped.rate >= 0.8


def test_a_region_is_a_stamp_when_its_pixels_recur_with_its_label_among_the_references():
    generator = torch.Generator().manual_seed(0)
    probes = torch.rand(3, 3, 8, 8, generator=generator)
    regions = torch.zeros(3, 8, 8, dtype=torch.bool)
    regions[:, :2, :2] = True
    references = torch.rand(6, 3, 8, 8, generator=generator)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    references[1, :, :2, :2] = probes[0, :, :2, :2] + 0.01  # probe 0's corner recurs in a reference of class 0
    references[2, :, :2, :2] = probes[1, :, :2, :2]  # probe 1's corner recurs, but in a reference of class 1
    distances = region_distances(probes, regions, references, chunk=5)
    assert distances.shape == (3, 6) and distances[0, 1] == pytest.approx(0.01, abs=1e-6)
    assert torch.allclose(distances[2, 3], (probes[2] - references[3])[:, :2, :2].abs().mean())
    # weighted by a map within the region: a map on one pixel measures that pixel only
    weights = torch.zeros(3, 8, 8)
    weights[:, 1, 1] = 1.0
    weighted = region_distances(probes, regions, references, weights=weights)
    assert torch.allclose(weighted, (probes[:, None, :, 1, 1] - references[None, :, :, 1, 1]).abs().mean(-1))
    classes = torch.tensor([0, 0, 2])
    assert stamp_regions(probes, regions, classes, references, labels).tolist() == [True, False, False]
    # the probes may be among the references: a probe is never its own stamp, nor its own image of another class
    # (explained for class 0 while labelled 1, probe 0 is still a stamp of class 0)
    pool, pool_labels = torch.cat([probes, references]), torch.cat([classes, labels])
    assert stamp_regions(probes, regions, classes, pool, pool_labels).tolist() == [True, False, False]
    mislabelled = torch.cat([torch.tensor([1, 0, 2]), labels])
    assert stamp_regions(probes, regions, classes, pool, mislabelled).tolist() == [True, False, False]
    # the shares the test compares: probe 0's corner is repeated whole by reference 1 (within the tolerance), and
    # weighted by a map on one pixel, the share is whether that pixel is repeated
    shares = region_match_shares(probes, regions, references, tolerance=0.02, chunk=5)
    assert shares.shape == (3, 6) and shares[0, 1] == 1.0 and shares[1, 2] == 1.0 and shares[2].amax() < 0.5
    one_pixel = region_match_shares(probes, regions, references, tolerance=0.02, weights=weights)
    repeated = ((probes[:, None, :, 1, 1] - references[None, :, :, 1, 1]).abs().amax(-1) <= 0.02).float()
    assert torch.equal(one_pixel, repeated)
    # a tolerance below the 0.01 the copy was moved by: not the same pixels, no stamp
    tolerance = 0.005 / float(references.std())
    assert not stamp_regions(probes, regions, classes, references, labels, tolerance=tolerance).any()
    # the margin is the share of the region that must be repeated only by the class: 1 asks for all of it
    assert stamp_regions(probes, regions, classes, references, labels, margin=1.0).tolist() == [True, False, False]
    references[1, :, 1, 1] += 0.5  # one pixel of the four no longer repeated
    assert not stamp_regions(probes, regions, classes, references, labels, margin=1.0).any()
    assert stamp_regions(probes, regions, classes, references, labels, margin=0.7)[0]
    with pytest.raises(ValueError, match="margin"):
        stamp_regions(probes, regions, classes, references, labels, margin=0.0)
    with pytest.raises(ValueError, match="tolerance"):
        stamp_regions(probes, regions, classes, references, labels, tolerance=0.0)
    with pytest.raises(ValueError, match="reference labels"):
        stamp_regions(probes, regions, classes, references, labels[:4])
    with pytest.raises(ValueError, match="reference images"):
        stamp_regions(probes, regions, classes, references[:, :, :4], labels)


def test_stamped_carriers_catch_marks_and_not_objects_that_always_sit_at_the_centre():
    """The centre reader follows other objects' centres at their place (the default rate's false alarm), but an
    object's centre is only rarely a stamp among labelled references of other objects (by chance, when a class-mate
    has nearly the same colours and phase: with the 24 references as donors too, 1 of 60 draws holds two carriers at
    the default tolerance and margin, 6 of 60 at twice the tolerance, ``docs/methods.md``); a mark is, for a model that
    reads it, wherever its class puts it."""
    model = CentreStripeReader().eval()
    shares = []
    for seed in range(10):
        images, classes, maps = _centred_stripes(8, seed)
        more, labels, _ = _centred_stripes(24, 100 + seed)
        result = transplant_check(model, images, maps, classes, references=(torch.cat([images, more]),
                                                                            torch.cat([classes, labels])))
        assert result.rate >= 0.8 and result.stamps is not None and result.carriers.shape == (8,)
        shares.append(result.carrier_share)
    assert shares.count(0.0) >= 9, shares
    import lightning_xai as lx

    images, classes, maps = _centred_stripes(8, 1)
    more, labels, _ = _centred_stripes(24, 101)
    plain = lx.check_shortcut(model, images, maps=maps, targets=classes)
    audited = lx.check_shortcut(model, images, maps=maps, targets=classes, references=(more, labels))
    assert plain.suspicious and plain.carriers is None and audited.carriers == [] and not audited.suspicious
    from lightning_xai.demos import SyntheticObjects, add_cue

    for kind in ("colour", "position"):
        mark = MarkReader(kind).eval()
        images, labels, _, maps = _cue_batch(kind, carriers=4)
        more, more_labels, _ = SyntheticObjects(16, 32, "texture", num_classes=4, seed=7).batch(16)
        more[:8] = add_cue(more[:8], more_labels[:8], kind)  # half of the references carry their class's mark
        references = (torch.cat([images, more]), torch.cat([labels, more_labels]))
        # regions of 11 pixels: the 3 x 3 mark of a carrier (and 2 more), a piece of the object for the others
        result = transplant_check(mark, images, maps, labels, 0.01, references=references)
        assert result.carriers[:4].all() and not result.carriers[4:].any(), (kind, result.carriers)
        assert result.carrier_share == pytest.approx(0.5)
    without = transplant_check(mark, images, maps, labels)
    assert without.stamps is None and without.carriers is None and without.carrier_share is None


def test_references_as_extra_donors_catch_a_mark_no_probe_carries():
    """With a cue on half the images, 8 probes may carry none: the references explained as extra donors do. Their
    carriers are listed apart from the probes', the alarm counts them, and the evidence names the reference."""
    from lightning_xai.callbacks.shortcut import ShortcutWatch
    from lightning_xai.demos import MEAN, STD, SyntheticObjects, add_cue, cue_region
    from lightning_xai.shortcut.carriers import carrier_check

    model = MarkReader("position").eval()
    probes, probe_labels, probe_masks = SyntheticObjects(8, 32, "texture", num_classes=4, seed=3).batch(8)
    more, labels, masks = SyntheticObjects(24, 32, "texture", num_classes=4, seed=7).batch(24)
    more[:12] = add_cue(more[:12], labels[:12], "position")  # the first 12 references carry their class's mark
    more_maps = masks.float().clone()
    for i in range(12):
        more_maps[i] = cue_region(32, "position", int(labels[i])).float() + 0.1 * masks[i].float()
    pool = (torch.cat([probes, more]), torch.cat([probe_labels, labels]))
    probe_maps = probe_masks.float()
    alone = transplant_check(model, probes, probe_maps, probe_labels, 0.01, references=pool)
    assert alone.carrier_probes() == [] and alone.extra_carriers() == []
    joined = transplant_check(model, probes, probe_maps, probe_labels, 0.01, references=pool,
                              extra_donors=(more, more_maps[:, None], labels[:, None]))
    assert joined.carrier_probes() == [] and set(joined.extra_carriers()) <= set(range(12))
    assert len(joined.extra_carriers()) >= 6, joined.extra_carriers()
    assert joined.rate == alone.rate  # the rate is the probes' own
    # only stamps are pasted, each into at most max_recipients images of the pool of other classes
    check = carrier_check(model, more, more_maps, labels, *pool, fraction=0.01, max_recipients=5)
    assert set(check.donors.tolist()) <= set(torch.nonzero(check.stamps).flatten().tolist())
    assert int(torch.bincount(check.donors).max()) <= 5
    assert (pool[1][check.recipients] != labels[check.donors]).all()
    assert torch.isnan(check.rates[~check.stamps]).all()
    capped = carrier_check(model, more, more_maps, labels, *pool, fraction=0.01, max_donors=2)
    assert len(set(capped.donors.tolist())) == 2 and int((~torch.isnan(capped.rates)).sum()) == 2
    assert capped.stamps.equal(check.stamps)  # every stamp is still told; only two are pasted
    # the watch: an event with a reference carrier counts; the note and the evidence name the reference
    watch = ShortcutWatch()
    watch.references = pool
    watch.update("m", 0, probes, probe_maps[:, None], probe_labels[:, None], model,
                 donors=(more, more_maps[:, None], labels[:, None]))
    event = watch.alarms["m"]
    assert event.carriers == [] and event.reference_carriers and "references [" in event.message()
    pictures, notes = watch.outputs("m", "epoch 0", probes, mean=MEAN, std=STD)
    assert "xai/m/shortcut_evidence" in pictures and notes
    flips = watch.checks["m"].carrier.flips(watch.checks["m"].carrier.carriers)
    assert flips and flips[0][0] >= 8  # the strongest carrier pair's donor is a reference
    # the picture shows a pair into a probe when there is one (the user knows the probes), the strongest of those
    into_probes = [f for f in flips if f[1] < 8]
    assert into_probes and watch.carrier_pair("m", 8, 8) == into_probes[0]
    assert watch.carrier_pair("m", 8, 0) == flips[0]  # a pool of references only: the strongest pair
    # the pool's predictions: one forward per event, whatever the number of methods
    sizes = []

    def counting(images):
        sizes.append(len(images))
        return model(images)

    watch.start_event()
    for method in ("m", "n"):
        watch.update(method, 1, probes, probe_maps[:, None], probe_labels[:, None], counting,
                     donors=(more, more_maps[:, None], labels[:, None]))
    assert sizes.count(32) == 1 and watch.checks["n"].extra_carriers() == watch.checks["m"].extra_carriers()
    watch.update("m", 2, probes, probe_maps[:, None], probe_labels[:, None], counting,
                 donors=(more, more_maps[:, None], labels[:, None]))
    assert sizes.count(32) == 2  # "m" again: a new event (the model may have changed), without start_event


def test_transplant_check_without_pairs_is_undefined_and_bad_input_is_refused():
    model = MarkReader("colour").eval()
    images, labels, _, maps = _cue_batch("colour")
    same = transplant_check(model, images, maps, torch.zeros(8, dtype=torch.long), control=True)
    assert math.isnan(same.rate) and torch.isnan(same.probe_rates).all() and same.flips() == []
    assert same.strongest() is None and math.isnan(same.control_rate)
    with pytest.raises(ValueError, match="same B, H and W"):
        transplant_check(model, images, maps[:, :16], labels)
    with pytest.raises(ValueError, match="chunk"):
        transplant_check(model, images, maps, labels, chunk=0)


def test_transplant_check_takes_known_probabilities_instead_of_a_forward():
    model = MarkReader("colour").eval()
    images, labels, _, maps = _cue_batch("colour")
    calls = []

    def predict(x):
        calls.append(x.shape == images.shape and torch.equal(x, images))
        return model(x)

    ran = transplant_check(predict, images, maps, labels)
    assert sum(calls) == 1  # the probes' own forward
    given = transplant_check(predict, images, maps, labels, probabilities=probabilities_of(model, images))
    assert sum(calls) == 1  # not again
    assert ran.rate == given.rate and torch.equal(ran.after, given.after) and torch.equal(ran.gains, given.gains)
    with pytest.raises(ValueError, match="probabilities must be"):
        transplant_check(model, images, maps, labels, probabilities=probabilities_of(model, images[:3]))


def test_check_shortcut_audits_a_model_outside_training_and_leaves_it_as_it_was(tiny_vit):
    import lightning_xai as lx

    model = MarkReader("colour")  # no ViT: maps must be given
    images, labels, _, maps = _cue_batch("colour", carriers=8)
    check = lx.check_shortcut(model, images, maps=maps, targets=labels)
    assert check.rate == pytest.approx(1.0) and check.suspicious and check.explanation is None
    assert check.flipped_pairs[0][3] == labels[check.flipped_pairs[0][0]] and check.regions.shape == (8, 32, 32)
    stamps = lx.check_shortcut(model, images, maps=maps, targets=labels, recurrence=True)  # two marks per class
    assert check.transplant.recurs is None and stamps.transplant.recurs.all() and stamps.rate == check.rate
    tiny_vit.train()
    before = {k: v.clone() for k, v in tiny_vit.state_dict().items()}
    audit = lx.check_shortcut(tiny_vit, torch.randn(6, 3, 32, 32), targets=torch.arange(6) % 3)
    assert tiny_vit.training and all(torch.equal(v, tiny_vit.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in tiny_vit.parameters())
    assert audit.explanation.maps.shape == (6, 1, 32, 32) and 0.0 <= audit.rate <= 1.0
    assert audit.agreement.region.shape == (32, 32)


def test_evidence_and_region_pictures_say_what_they_show():
    from lightning_xai.demos import MEAN, STD
    from lightning_xai.render import line_height
    from lightning_xai.shortcut.pictures import evidence_caption, evidence_picture, region_caption, region_picture

    model = MarkReader("colour").eval()
    images, labels, _, maps = _cue_batch("colour", carriers=8)
    result = transplant_check(model, images, maps, labels)
    names = ["h", "v", "d", "c"]
    picture = evidence_picture(images, result, mean=MEAN, std=STD, class_names=names)
    donor, recipient, before, after = result.strongest()
    assert picture.dtype == "uint8" and picture.shape[1] > 3 * 96 and picture.shape[0] > 96 + 3 * line_height()
    assert evidence_caption("reference 4", 2, 1, 3) == "pasting this region of reference 4 into probe 2 turns its " \
        "prediction from '1' into '3'"
    assert evidence_caption(3, 5, 7, 2) == "pasting this region of probe 3 into probe 5 turns its prediction from " \
                                            "'7' into '2'"
    assert f"'{names[before]}' into '{names[after]}'" in evidence_caption(donor, recipient, before, after, names)
    # the pasted tile differs from the recipient's exactly where the region is (plus the outline)
    clean = transplant_check(model, images, maps, labels)
    clean.after[:] = -1  # nothing flipped: no evidence to show
    assert evidence_picture(images, clean) is None
    score = shortcut_score(maps, labels)
    region = region_picture(score, rate=0.25)
    bare = region_picture(score, caption=False)
    assert region.shape[0] > bare.shape[0] and region.shape[1] == bare.shape[1]
    legend = region_caption(score, 0.25)
    assert "mean map of the probes" in legend and "top 5%" in legend and "transplant rate 0.25" in legend


def test_alarm_fires_after_patience_consecutive_epochs_once_per_run():
    alarm = ShortcutAlarm("gradtoken", threshold=0.4, patience=3)
    fired = [alarm.update(e, s) for e, s in enumerate([0.5, 0.6, 0.1, 0.5, 0.45, 0.7, 0.9, 0.9, 0.1, 0.9, 0.9, 0.9])]
    events = [(e, f) for e, f in enumerate(fired) if f is not None]
    assert [e for e, _ in events] == [5] and alarm.fired_at == 5
    event = events[0][1]
    assert event.method == "gradtoken" and event.rates == [0.5, 0.45, 0.7] and event.epoch == 5
    assert "gradtoken" in event.message() and "epoch 5" in event.message()
    assert "for 3 explained epochs" in event.message()


def test_with_references_an_event_needs_one_carrier_per_sixteen_donors():
    """Chance stamps grow with the donors tried: 8 probes need one stamped carrier, 8 probes and 24 references two."""
    from lightning_xai.shortcut import carriers_needed

    assert [carriers_needed(n) for n in (1, 8, 16, 17, 32, 33)] == [1, 1, 1, 2, 2, 3]
    alarm = ShortcutAlarm("gradtoken", patience=1)
    assert alarm.update(0, 0.9, carriers=[], reference_carriers=[5], needed=2) is None  # one chance stamp
    event = alarm.update(1, 0.0, carriers=[2], reference_carriers=[5], needed=2)  # whatever the rate
    assert event is not None and event.carrier_names() == "probes [2] and references [5]"
    assert "probes [2] and references [5] point at" in event.message()


def test_alarm_message_reads_right_for_any_patience():
    one = ShortcutAlarm("gradtoken", threshold=0.2, patience=1).update(4, 0.5, probes=[2])
    assert "for 1 explained epoch;" in one.message() and "epochs" not in one.message().split("probes")[0]
    two = ShortcutAlarm("gradtoken", threshold=0.2, patience=2)
    two.update(3, 0.3)
    assert "for 2 explained epochs;" in two.update(4, 0.4).message()


def test_undefined_epochs_break_the_streak_and_the_threshold_is_inclusive():
    alarm = ShortcutAlarm("c2f", threshold=0.3, patience=2)
    assert alarm.update(0, 0.3) is None and alarm.update(1, math.nan) is None and alarm.update(2, 0.31) is None
    event = alarm.update(3, 0.3, probes=[1, 4])
    assert event is not None and event.probes == [1, 4]


def test_alarm_state_round_trip_resumes_mid_streak():
    alarm = ShortcutAlarm("gradtoken", threshold=0.3, patience=3)
    alarm.update(0, 0.5)
    alarm.update(1, 0.6)
    resumed = ShortcutAlarm("gradtoken", threshold=0.3, patience=3)
    resumed.load_state_dict(alarm.state_dict())
    assert resumed.update(2, 0.7) is not None  # the third epoch of the streak, counted across the resume
    after = ShortcutAlarm("gradtoken", threshold=0.3, patience=3)
    after.load_state_dict(resumed.state_dict())
    assert after.fired and after.update(3, 0.9) is None and after.update(4, 0.9) is None


def test_alarm_arguments_are_checked():
    with pytest.raises(ValueError, match="threshold"):
        ShortcutAlarm("gradtoken", threshold=1.5)
    with pytest.raises(ValueError, match="patience"):
        ShortcutAlarm("gradtoken", patience=0)
    assert 0 < DEFAULT_THRESHOLD < 1 and DEFAULT_PATIENCE >= 1


# ------------------------------------------------------------------------------------------ trained tiny models


@pytest.fixture(scope="session")
def cue_model(trained_root):
    """The test ViT trained in this session on texture data whose train and validation images carry the
    class-coloured cue with probability 0.9; its data module (``test_set`` is cue-free)."""
    import lightning.pytorch as pl
    from conftest import trained_architecture

    from lightning_xai.demos import SyntheticDataModule, ViTClassifier

    pl.seed_everything(0, workers=True)
    data = SyntheticDataModule(family="texture", num_classes=4, image_size=32, num_train=2048, num_val=256,
                               num_test=256, batch_size=64, seed=0, val_return_mask=True, cue_probability=0.9)
    module = ViTClassifier(num_classes=4, lr=2e-3, warmup_epochs=1, **trained_architecture())
    cached = trained_root / "texture_cue.pt"
    if cached.exists():
        module.load_state_dict(torch.load(cached))
    else:
        pl.Trainer(max_epochs=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   default_root_dir=str(trained_root)).fit(module, datamodule=data)
        torch.save(module.state_dict(), cached)
    data.setup("fit")
    return module.eval(), data


def _accuracy(module, dataset, count=256) -> float:
    images, labels, _ = dataset.batch(range(count))
    with torch.no_grad():
        return float((module(images).argmax(-1) == labels).float().mean())


def _probe_statistic(module, data, method="gradtoken", count=32):
    import lightning_xai as lx

    images, labels, masks = data.val_set.batch(range(count))
    result = lx.explain(module, images, method=method)  # targets: the prediction, as the callback's default
    return shortcut_score(result.maps, result.targets), object_share(result.maps, masks), labels, result


def test_the_cue_model_leans_on_the_cue(cue_model):
    """Validation (biased like training) looks fine; the cue-free test split shows the damage."""
    module, data = cue_model
    val, test = _accuracy(module, data.val_set), _accuracy(module, data.test_set)
    assert val > 0.8 and test < val - 0.25, (val, test)


def test_agreement_tells_the_fixed_place_cue_model_from_the_clean_model(cue_model, texture_model):
    from lightning_xai.demos import cue_region

    cue, cue_object, _, _ = _probe_statistic(*cue_model)
    clean, clean_object, _, _ = _probe_statistic(*texture_model)
    assert cue.score >= AGREEMENT_LEVEL > clean.score, (cue.score, clean.score)
    # the agreed region of the cue model is where the mark is (the patch holding it), and the maps leave the object
    mark_cell = torch.zeros(32, 32, dtype=torch.bool)
    mark_cell[:4, :4] = True
    assert cue_region(32).logical_and(mark_cell).sum() == 9 and (cue.region & mark_cell).any()
    assert not (clean.region & mark_cell).any()
    assert cue_object.mean() < clean_object.mean()
    # eight probes (the callback's default) are enough to tell them apart
    few_cue, *_ = _probe_statistic(*cue_model, count=8)
    few_clean, *_ = _probe_statistic(*texture_model, count=8)
    assert few_cue.score >= AGREEMENT_LEVEL > few_clean.score, (few_cue.score, few_clean.score)


# ------------------------------------------------------------------------------- the alarm in a real fit


def _fit_with_monitor(model_and_data, tmp_path, loggers, epochs=2, **monitor_options):
    """Go on training ``model_and_data``'s model (a copy, at a tiny learning rate, on 256 images of its kind of
    data) for ``epochs`` epochs with an ``ExplanationMonitor`` (GradToken, 8 probes); returns the monitor, the
    trainer and the shortcut warnings raised."""
    import warnings

    import lightning.pytorch as pl
    from conftest import trained_architecture

    from lightning_xai.callbacks import ExplanationMonitor
    from lightning_xai.demos import SyntheticDataModule, ViTClassifier

    module, data = model_and_data
    copy = ViTClassifier(num_classes=4, lr=1e-5, warmup_epochs=0, **trained_architecture())
    copy.load_state_dict(module.state_dict())
    small = SyntheticDataModule(family="texture", num_classes=4, image_size=32, num_train=256, num_val=64,
                                batch_size=64, seed=0, cue_probability=data.cue_probability)
    monitor = ExplanationMonitor(methods="gradtoken", num_probes=8, **monitor_options)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=loggers, callbacks=[monitor],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(copy, datamodule=small)
    return monitor, trainer, [w for w in caught if "shortcut alarm" in str(w.message)]


def test_alarm_rate_threshold_evidence_and_note_reach_tensorboard_wandb_and_png(cue_model, tmp_path, monkeypatch):
    import glob
    from pathlib import Path

    import wandb
    from conftest import wandb_history, wandb_records
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    loggers = [TensorBoardLogger(str(tmp_path), name="tb"), CSVLogger(str(tmp_path), name="csv"),
               WandbLogger(project="lightning-xai-test", save_dir=str(tmp_path), offline=True)]
    monitor, _, alarms = _fit_with_monitor(cue_model, tmp_path, loggers, class_names=cue_model[1].classes)
    wandb.finish()
    # the warning: once, naming the method, the epoch, the patience and the probes concerned
    assert len(alarms) == 1 and alarms[0].category is RuntimeWarning
    text = str(alarms[0].message)
    # drawn probes with labels: 24 labelled references are drawn with them, so one event with a stamped carrier
    # is the evidence (patience 1): the cue model's first explained epoch already has one
    assert "'gradtoken'" in text and "epoch 0" in text and "for 1 explained epoch" in text and "probes" in text
    assert "stamp of their class" in text
    assert monitor.state_dict()["shortcut_alarms"]["gradtoken"]["fired_at"] == 0
    threshold = monitor.records.shortcut.threshold
    assert threshold == DEFAULT_THRESHOLD and monitor.records.shortcut.patience == DEFAULT_PATIENCE_WITH_REFERENCES
    pool, pool_labels = monitor.records.shortcut.references
    assert pool.shape == (8 + 24, 3, 32, 32) and pool_labels.shape == (32,)
    assert len(monitor.state_dict()["reference_indices"]) == 24  # indices only: checkpoints stay small
    # GradToken (one backward) also explains the 24 references, as more donors for the carrier check
    assert monitor.records.shortcut.donors["gradtoken"].shape == (24, 3, 32, 32)
    images, maps, classes = monitor.runner.explain_references("gradtoken")
    assert maps.shape == (24, 1, 32, 32) and classes.shape == (24, 1)
    from lightning_xai.explainers import create_explainer

    monitor.runner.explainers["c2f"] = create_explainer("c2f", monitor.runner.module)
    assert monitor.runner.explain_references("c2f") is None  # masked forwards: the probes only, as donors

    events = EventAccumulator(loggers[0].log_dir, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    rates = [e.value for e in events.Scalars("xai/gradtoken/shortcut_rate")]
    assert len(rates) == 2 and min(rates) >= threshold
    assert [e.value for e in events.Scalars("xai/gradtoken/shortcut_threshold")] == pytest.approx([threshold] * 2)
    assert len(events.Scalars("xai/gradtoken/shortcut_agreement")) == 2
    assert len(events.Images("xai/gradtoken/shortcut_region")) == 2
    assert len(events.Images("xai/gradtoken/shortcut_evidence")) == 2
    notes = events.Tensors("xai/gradtoken/shortcut_alarm/text_summary")
    assert len(notes) == 1 and b"Shortcut alarm" in notes[0].tensor_proto.string_val[0]

    root = Path(loggers[1].log_dir) / "xai"
    for kind in ("shortcut_region", "shortcut_evidence"):
        assert sorted(p.name for p in (root / "gradtoken" / kind).glob("*.png")) == ["epoch_0000.png",
                                                                                    "epoch_0001.png"]
    assert "Shortcut alarm" in (root / "alerts.md").read_text()
    metrics = (root / "metrics.csv").read_text()
    assert "xai/gradtoken/shortcut_rate" in metrics and "xai/gradtoken/shortcut_threshold" in metrics

    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    files = Path(runs[0]) / "files"
    for kind in ("shortcut_region", "shortcut_evidence"):
        assert sum(f"xai/gradtoken/{kind}" in p.as_posix() for p in files.rglob("*.png")) == 2
    rows = wandb_history(runs[0])
    assert len([r for r in rows if "xai/gradtoken/shortcut_rate" in r]) == 2
    assert [r["xai/gradtoken/shortcut_threshold"] for r in rows if "xai/gradtoken/shortcut_threshold" in r] == \
        pytest.approx([threshold] * 2)
    notes = [r["xai/gradtoken/shortcut_alarm"] for r in rows if "xai/gradtoken/shortcut_alarm" in r]
    assert len(notes) == 1 and "Shortcut alarm" in notes[0]
    alerts = [r.alert for r in wandb_records(runs[0]) if r.WhichOneof("record_type") == "alert"]
    assert [a.title for a in alerts] == ["xai/gradtoken/shortcut_alarm"] and "Shortcut alarm" in alerts[0].text


def test_stop_on_shortcut_ends_training_and_a_clean_model_stays_silent(cue_model, texture_model, tmp_path):
    _, trainer, alarms = _fit_with_monitor(cue_model, tmp_path / "cue", False, epochs=5, stop_on_shortcut=True,
                                           shortcut_patience=1)
    assert len(alarms) == 1 and "for 1 explained epoch;" in str(alarms[0].message)
    assert trainer.current_epoch == 1, trainer.current_epoch  # patience 1: stopped after epoch 0
    monitor, _, alarms = _fit_with_monitor(texture_model, tmp_path / "clean", False)
    rate = monitor.last_scalars["xai/gradtoken/shortcut_rate"]
    assert alarms == [] and rate < DEFAULT_THRESHOLD, rate


def test_monitor_checks_the_shortcut_options():
    from lightning_xai.callbacks import ExplanationMonitor

    with pytest.raises(ValueError, match="threshold"):
        ExplanationMonitor(shortcut_threshold=2.0)
    with pytest.raises(ValueError, match="patience"):
        ExplanationMonitor(shortcut_patience=0)
    with pytest.raises(ValueError, match="shortcut_references must be an int >= 0"):
        ExplanationMonitor(shortcut_references=-1)
    with pytest.raises(ValueError, match="stop_on_shortcut"):
        ExplanationMonitor(shortcut_alarm=False, stop_on_shortcut=True)
    assert ExplanationMonitor(shortcut_alarm=False).records.shortcut is None


def test_probes_of_too_few_classes_are_warned_about_at_fit_start(tmp_path):
    import warnings

    import lightning.pytorch as pl
    from conftest import trained_architecture

    from lightning_xai.callbacks import ExplanationMonitor
    from lightning_xai.callbacks.shortcut import MIN_PAIRS, probe_coverage_warning
    from lightning_xai.demos import SyntheticDataModule, ViTClassifier

    assert probe_coverage_warning(torch.tensor([0, 1, 2, 3] * 2)) is None  # 48 pairs
    assert probe_coverage_warning(torch.tensor([0] * 6 + [1] * 2)) is None  # 24 pairs: just enough
    text = probe_coverage_warning(torch.tensor([0] * 7 + [1]))  # 14 pairs
    assert "2 class(es)" in text and f"at least {MIN_PAIRS}" in text and "num_probes" in text
    assert probe_coverage_warning(None) is None and probe_coverage_warning(torch.rand(8, 4)) is None
    from lightning_xai.callbacks.shortcut import pool_coverage_warning

    # with references the carriers are pasted into the labelled pool: the pool needs two classes, the probes none
    assert pool_coverage_warning(torch.tensor([0] * 7 + [1] + [2] * 24)) is None
    assert "all of class [3]" in pool_coverage_warning(torch.tensor([3] * 32))

    data = SyntheticDataModule(family="texture", num_classes=4, image_size=32, num_train=64, num_val=64, seed=0)
    data.setup("fit")
    images, labels, _ = data.val_set.batch([0, 4, 8, 12, 16, 20, 24, 1])  # seven of class 0, one of class 1
    monitor = ExplanationMonitor(methods="gradtoken", probe_images=images, probe_labels=labels)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, accelerator="cpu", logger=False,
                         callbacks=[monitor], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(ViTClassifier(num_classes=4, **trained_architecture()), datamodule=data)
    assert [str(w.message) for w in caught if "pairs of probes of different classes" in str(w.message)]


def test_user_given_references_serve_given_and_unlabelled_probes_and_bad_ones_are_refused():
    from lightning_xai.callbacks import ExplanationMonitor
    from lightning_xai.callbacks.probes import ProbeSet

    probes, more = torch.rand(8, 3, 32, 32), torch.rand(12, 3, 32, 32)
    labels, more_labels = torch.arange(8) % 4, torch.arange(12) % 4
    given = ProbeSet(probes, labels, num_references=(more, more_labels))
    pool, pool_labels = given.reference_pool()
    assert pool.shape == (20, 3, 32, 32) and pool_labels.tolist() == [*labels.tolist(), *more_labels.tolist()]
    assert given.state_dict()["reference_indices"] is None  # given, not drawn: the constructor has them again
    given.reset()
    assert given.references is given.given_references
    unlabelled = ProbeSet(probes, num_references=(more, more_labels))  # the references alone
    assert unlabelled.reference_pool()[0].shape == (12, 3, 32, 32)
    assert ProbeSet(probes, labels).reference_pool() is None  # user probes, no references: the rate alone
    for bad, match in (((more,), "count of samples"), ((more[0], more_labels), r"\(R, C, H, W\)"),
                       ((more, more_labels[:3]), "12 class indices"), ((more, more_labels.float()), "class indices")):
        with pytest.raises((ValueError, TypeError), match=match):
            ExplanationMonitor(probe_images=probes, shortcut_references=bad)


def test_fixed_targets_with_the_alarm_on_warn_that_it_cannot_fire():
    import warnings

    from lightning_xai.callbacks import ExplanationMonitor

    with pytest.warns(UserWarning, match=r"targets=\[1, 2\] explains every probe for the same class"):
        ExplanationMonitor(targets=[1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for options in ({"targets": [1, 2], "shortcut_alarm": False}, {"targets": "pred"}, {"targets": "label"}):
            ExplanationMonitor(**options)


def test_with_references_an_event_counts_only_with_a_stamped_carrier():
    """The centre reader's rate is far above the threshold at every event, but no object's centre is a stamp among
    labelled references: with them the alarm stays silent; without them it fires after the default patience."""
    from lightning_xai.callbacks.shortcut import ShortcutWatch

    model = CentreStripeReader().eval()
    images, classes, maps = _centred_stripes(8, 0)
    more, labels, _ = _centred_stripes(24, 100)
    with_references, without = ShortcutWatch(), ShortcutWatch()
    with_references.references = (torch.cat([images, more]), torch.cat([classes, labels]))
    assert with_references.patience == DEFAULT_PATIENCE_WITH_REFERENCES and without.patience == DEFAULT_PATIENCE
    for epoch in range(3):
        rates = with_references.update("m", epoch, images, maps[:, None], classes[:, None], model)
        without.update("m", epoch, images, maps[:, None], classes[:, None], model)
        assert rates["shortcut_rate"] >= 0.8 and "m" not in with_references.alarms
    assert without.state_dict()["m"]["fired_at"] == DEFAULT_PATIENCE - 1
    assert with_references.state_dict()["m"]["fired_at"] is None
    # a stamp: the same pixels at the centre in the references of each class
    stamped = images.clone()
    stamped[4:] = stamped[:4] + 0.01 * torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    marked = ShortcutWatch()
    marked.references = (torch.cat([stamped, stamped + 0.01]), torch.cat([classes, classes]))
    marked.update("m", 0, stamped, maps[:, None], classes[:, None], model)
    assert marked.alarms["m"].carriers and "stamp of their class" in marked.alarms["m"].message()
    # a resumed run keeps the patience it ran with, though its references are drawn after the state is loaded
    resumed = ShortcutWatch()
    resumed.load_state_dict(with_references.state_dict())
    assert resumed.state_dict()["m"]["patience"] == DEFAULT_PATIENCE_WITH_REFERENCES


def test_watch_logs_rate_threshold_and_agreement_and_keeps_the_alarm_across_a_checkpoint():
    from lightning_xai.callbacks.shortcut import ShortcutWatch

    model = MarkReader("colour").eval()
    images, labels, _, maps = _cue_batch("colour", carriers=8)
    maps, classes = maps[:, None], labels[:, None]  # (P, K, H, W), (P, K) as the runner gives them
    watch = ShortcutWatch(threshold=0.3, patience=3)
    first = watch.update("gradtoken", 0, images, maps, classes, model)
    assert first["shortcut_rate"] == pytest.approx(1.0) and first["shortcut_threshold"] == 0.3
    assert "shortcut_agreement" in first and not watch.alarms
    watch.update("gradtoken", 1, images, maps, classes, model)
    resumed = ShortcutWatch(threshold=0.3, patience=3)
    resumed.load_state_dict(watch.state_dict())
    resumed.update("gradtoken", 2, images, maps, classes, model)
    assert resumed.alarms["gradtoken"].epoch == 2 and resumed.alarms["gradtoken"].probes == list(range(8))
    pictures, notes = resumed.outputs("gradtoken", "ep 2", images, class_name=str, stopping=True)
    assert set(pictures) == {"xai/gradtoken/shortcut_region", "xai/gradtoken/shortcut_evidence"}
    assert notes[0][0] == "xai/gradtoken/shortcut_alarm" and "Training was stopped" in notes[0][1]
    resumed.update("gradtoken", 3, images, maps, classes, model)
    assert not resumed.alarms  # once per run
    # one class only: no rate (undefined) but the threshold line, and the streak breaks
    alone = resumed.update("gradtoken", 4, images, maps, torch.zeros(8, 1).long(), model)
    assert "shortcut_rate" not in alone and alone["shortcut_threshold"] == 0.3
    with pytest.raises(ValueError, match="threshold"):
        ShortcutWatch(threshold=-0.1)
    with pytest.raises(ValueError, match="fraction"):
        ShortcutWatch(fraction=0.0)


def test_benchmark_judges_alarms_lags_and_false_alarms_as_stated():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_shortcut.py"
    spec = importlib.util.spec_from_file_location("bench_shortcut", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def rows(rates, damage, other):
        triples = zip(rates, damage, other, strict=True)
        return [dict(epoch=e, rate=r, damage=d, acc_other=o) for e, (r, d, o) in enumerate(triples)]

    assert bench.alarm_epoch(rows([math.nan, 0.5, 0.3, 0.45, 0.41, 0.9], [0] * 6, [1] * 6), "rate", 0.4, 2) == 4
    assert bench.alarm_epoch(rows([math.nan, 0.5, 0.3, 0.45, 0.41, 0.9], [0] * 6, [1] * 6), "rate", 0.5, 2) is None
    on_time = rows([0.0, 0.1, 0.5, 0.6], [0.0, 0.2, 0.5, 0.6], [0.9, 0.6, 0.3, 0.2])  # damage at 1, alarm at 2
    late = rows([0.0, 0.1, 0.1, 0.5], [0.0, 0.2, 0.5, 0.6], [0.9, 0.6, 0.3, 0.2])  # alarm at 3: lag 2
    ignored = rows([0.0] * 4, [0.0] * 4, [0.9] * 4)  # a cue run whose model does not follow the cue
    noisy = rows([0.0, 0.5, 0.0, 0.0], [0.0] * 4, [0.9] * 4)  # a clean run over the threshold once
    results = [dict(kind="colour90", seed=0, cue=True, rows={"m": on_time}),
               dict(kind="position90", seed=0, cue=True, rows={"m": late}),
               dict(kind="colour50", seed=1, cue=True, rows={"m": ignored}),
               dict(kind="clean", seed=2, cue=False, rows={"m": noisy})]
    verdict = bench.judge(results, "m", "rate", 0.25, 1)
    assert (verdict["hits"], verdict["followers"], verdict["late"], verdict["false"], verdict["lags"]) == \
        (1, 2, ["position90/0"], ["clean/2"], [1, 2]) and not verdict["holds"]
    assert bench.judge(results[:1], "m", "rate", 0.25, 1)["holds"]


def test_callback_alarm_replay_judges_each_replay_as_stated():
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location("eval_callback_alarm", folder / "eval_callback_alarm.py")
        replay = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(replay)
    finally:
        sys.path.remove(str(folder))

    def result(fired, damage, other, cue=True):
        triples = enumerate(zip(fired, damage, other, strict=True))
        rows = [dict(epoch=e, fired=f, damage=d, acc_other=o) for e, (f, d, o) in triples]
        return dict(cue=cue, rows=rows)

    damage, follows = [0.0, 0.05, 0.2, 0.4], [0.9, 0.8, 0.4, 0.3]  # the damage passes 0.10 at epoch 2
    assert replay.verdict(result([0, 0, 0, 1], damage, follows)) == ("on time", 1)
    assert replay.verdict(result([0, 1, 0, 0], damage, follows)) == ("on time", -1)  # before the damage shows
    assert replay.verdict(result([0, 0, 0, 0, 1], [*damage, 0.5], [*follows, 0.2])) == ("late", 2)
    assert replay.verdict(result([0] * 4, damage, follows)) == ("missed", None)
    assert replay.verdict(result([0] * 4, damage, [0.9, 0.8, 0.7, 0.6])) == ("not following", None)
    assert replay.verdict(result([0, 0, 1, 0], [0.0] * 4, [0.9] * 4, cue=False)) == ("false alarm", None)
    assert replay.verdict(result([0] * 4, [0.0] * 4, [0.9] * 4, cue=False)) == ("silent", None)


def test_shortcut_example_runs_end_to_end(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "shortcut.py"
    spec = importlib.util.spec_from_file_location("shortcut_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    timeline = tmp_path / "runs" / "cue_timeline.png"  # by default beside the logs (--timeline moves it)
    example.main(["--epochs", "1", "--num-train", "128", "--out", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert "clean run: validation accuracy" in out and "cue run: validation accuracy" in out
    assert timeline.exists() and len(list((tmp_path / "runs").rglob("events.out.tfevents.*"))) == 2
    # absolute paths, and a TensorBoard command that works from any folder
    assert f"timeline: {timeline.resolve()}" in out and f"--logdir {(tmp_path / 'runs').resolve()}" in out


def test_the_control_runs_only_on_pairs_that_followed_and_gives_the_same_rate():
    """The moved-region control can only rule out pairs that followed their donor at its place: by default it runs
    on those alone (about half the forwards on a model without a shortcut), and the rate is the one the control
    on every pair gives."""
    model = MarkReader("position").eval()
    images, labels, _, maps = _cue_batch("position", carriers=4)
    seen: list[int] = []

    def counting(batch):
        seen.append(len(batch))
        return model(batch)

    lean = transplant_check(counting, images, maps, labels)
    lean_images, seen[:] = sum(seen), []
    full = transplant_check(counting, images, maps, labels, control_all=True)
    assert lean.rate == full.rate and torch.equal(lean.flipped, full.flipped)
    followed = int((lean.after == lean.classes[lean.donors]).sum())
    assert 0 < followed < len(lean.donors)
    assert lean_images == len(images) + len(lean.donors) + followed < sum(seen)
    assert bool((lean.moved[lean.after != lean.classes[lean.donors]] == -1).all())


def test_a_mark_that_fills_a_fifth_of_the_region_is_a_stamp_however_the_rest_differs():
    """The stamp test counts the region's pixels that a class-mate repeats, so a 3 x 3 mark inside a 45-pixel region
    is a stamp although the other 36 pixels differ in every image; a mean distance over the region lets them dilute
    the mark (its nearest class-mate is then about as far as the nearest image of another label: the miss on
    position50/1, ``docs/methods.md``)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(24) % 4
    images = torch.rand(24, 3, 16, 20, generator=generator)  # backgrounds differ everywhere
    marked = torch.arange(24) < 16  # 4 marked images per class, the rest without a mark
    for i in torch.nonzero(marked).flatten().tolist():
        images[i, :, 2:5, 1 + 3 * int(labels[i]):4 + 3 * int(labels[i])] = 1.0  # class k's mark at place k
    probes = torch.arange(8)  # 2 marked probes per class
    regions = torch.zeros(8, 16, 20, dtype=torch.bool)
    for i in probes.tolist():
        left = 1 + 3 * int(labels[i])
        regions[i, 0:5, left:left + 9] = True  # 5 x 9 with the mark at its left: 9 of its 45 pixels
    stamps = stamp_regions(images[:8], regions, labels[:8], images, labels)
    assert stamps.all(), stamps
    # unmarked probes of the same places: no stamp
    plain = images[16:24]
    assert not stamp_regions(plain, regions, labels[16:24], images, labels).any()
    # what the mean distance says: the nearest class-mate is not twice as near as the nearest image of another label
    from lightning_xai.shortcut.stamps import nearer_to_class

    distances = region_distances(images[:8], regions, images)
    itself = torch.zeros(8, 24, dtype=torch.bool)
    itself[probes, probes] = True
    old = nearer_to_class(distances, labels[:8], labels, itself, ratio=0.5)
    assert not old.any(), old
