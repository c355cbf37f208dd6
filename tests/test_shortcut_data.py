"""The demo data's further cue kinds (a mark whose place encodes the class, a class-patterned patch) and clean
kinds (busy backgrounds), which the shortcut benchmark trains on."""

from __future__ import annotations

import pytest
import torch

from lightning_xai.demos import (
    CUE_KINDS,
    MEAN,
    STD,
    SyntheticDataModule,
    SyntheticObjects,
    add_cue,
    cue_region,
)


def _pixels(images: torch.Tensor) -> torch.Tensor:
    return images * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def test_position_cue_puts_class_k_at_place_k_along_the_top_edge():
    regions = torch.stack([cue_region(32, "position", k) for k in range(6)])
    assert (regions.sum((1, 2)) == 9).all() and not (regions[:, 4:] | regions[:, :1]).any()  # 3 x 3, top rows
    assert (regions.sum(0) <= 1).all(), "the places do not overlap"
    left = [int(r.nonzero()[:, 1].min()) for r in regions]
    assert left == sorted(left) and left[0] == 1 and left[-1] + 3 <= 31
    assert torch.equal(cue_region(32, "colour", 3), cue_region(32)), "the colour mark's place is every class's"


@pytest.mark.parametrize("kind", CUE_KINDS)
def test_every_cue_kind_changes_only_its_marks_pixels_and_gives_the_class_away(kind):
    clean = SyntheticObjects(32, 32, "texture", num_classes=4, seed=5, split="val")
    biased = SyntheticObjects(32, 32, "texture", num_classes=4, seed=5, split="val", cue_probability=0.9,
                              cue_kind=kind)
    (x0, y0, m0), (x1, y1, m1) = clean.batch(32), biased.batch(32)
    marked = torch.tensor([biased.has_cue(i) for i in range(32)])
    regions = torch.stack([cue_region(32, kind, int(y)) for y in y1])  # (B, H, W)
    changed = (x0 != x1).any(1)
    assert torch.equal(y0, y1) and not (changed & ~regions).any() and not changed[~marked].any()
    assert torch.equal(m1, m0 & ~regions), "the mask is the visible object"
    # the mark of class c looks the same in every image of class c (up to pixel noise) and differs between classes
    marks = _pixels(x1)  # (B, 3, H, W)
    looks = {int(c): marks[i][:, regions[i]] for i in range(32) if marked[i] for c in [y1[i]]}
    for i in range(32):
        if marked[i]:
            assert (marks[i][:, regions[i]] - looks[int(y1[i])]).abs().max() < 0.1
    if kind != "position":  # one place: the looks must differ; the position mark differs by place instead
        firsts = torch.stack([looks[c] for c in sorted(looks)])
        assert all((firsts[a] - firsts[b]).abs().max() > 0.5 for a in range(len(firsts))
                   for b in range(a + 1, len(firsts)))


def test_add_cue_paints_the_given_classes_mark_as_the_dataset_draws_it():
    for kind in CUE_KINDS:
        biased = SyntheticObjects(8, 32, "texture", num_classes=4, seed=1, cue_probability=1.0, cue_kind=kind)
        plain = SyntheticObjects(8, 32, "texture", num_classes=4, seed=1)
        (x1, y1, _), (x0, _, _) = biased.batch(8), plain.batch(8)
        painted = add_cue(x0, y1, kind)
        for i in range(8):
            region = cue_region(32, kind, int(y1[i]))
            assert (painted[i][:, region] - x1[i][:, region]).abs().max() < 0.2  # the dataset adds pixel noise
            assert torch.equal(painted[i][:, ~region], x0[i][:, ~region])
        other = add_cue(x0, (y1 + 1) % 4, kind)  # another class's mark: a conflicting cue
        assert not torch.equal(other, painted)


def test_busy_background_adds_clutter_and_leaves_label_and_mask_alone():
    plain = SyntheticObjects(16, 32, "texture", num_classes=4, seed=2)
    busy = SyntheticObjects(16, 32, "texture", num_classes=4, seed=2, background="busy")
    (x0, y0, m0), (x1, y1, m1) = plain.batch(16), busy.batch(16)
    assert torch.equal(y0, y1) and torch.equal(m0, m1)
    changed = (x0 != x1).any(1)  # (the object's colours may differ: they are chosen against the background)
    assert changed[~m0].float().mean() > 0.1, "clutter covers a good part of the background"
    data = SyntheticDataModule(family="texture", num_classes=4, num_train=8, num_val=8, num_test=8,
                               background="busy", cue_probability=0.5, cue_kind="texture")
    data.setup("fit")
    assert {s.background for s in (data.train_set, data.val_set, data.test_set)} == {"busy"}
    assert data.train_set.cue_kind == data.val_set.cue_kind == "texture" and data.test_set.cue_probability == 0.0


def test_unknown_cue_kind_or_background_is_refused():
    with pytest.raises(ValueError, match="cue_kind"):
        SyntheticObjects(4, cue_kind="logo")
    with pytest.raises(ValueError, match="background"):
        SyntheticDataModule(background="forest")
    with pytest.raises(ValueError, match="cue_kind"):
        cue_region(32, "logo")
