"""Generated data: deterministic, masks that match the drawn object, splits that differ, a working DataModule."""

from __future__ import annotations

import pytest
import torch

from lightning_xai.demos import (
    CUE_COLOURS,
    MEAN,
    SHAPE_CLASSES,
    STD,
    TEXTURE_CLASSES,
    SyntheticDataModule,
    SyntheticObjects,
    TwoObjectImages,
    class_names,
    cue_region,
)


@pytest.mark.parametrize("family", ["shape", "texture"])
def test_images_are_a_function_of_seed_split_and_index(family):
    a = SyntheticObjects(16, 32, family, seed=3).batch([0, 5, 9])
    b = SyntheticObjects(16, 32, family, seed=3).batch([0, 5, 9])
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    other_seed = SyntheticObjects(16, 32, family, seed=4).batch([0])[0]
    other_split = SyntheticObjects(16, 32, family, seed=3, split="val").batch([0])[0]
    assert not torch.equal(a[0][:1], other_seed) and not torch.equal(a[0][:1], other_split)


@pytest.mark.parametrize("family", ["shape", "texture"])
def test_shapes_ranges_labels_and_masks(family):
    data = SyntheticObjects(24, (32, 48), family, num_classes=4, seed=0)
    images, labels, masks = data.batch(24)
    assert images.shape == (24, 3, 32, 48) and images.dtype == torch.float32
    assert masks.shape == (24, 32, 48) and masks.dtype == torch.bool
    pixels = images * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    assert torch.equal(torch.bincount(labels, minlength=4), torch.full((4,), 6))
    area = masks.flatten(1).float().mean(1)
    assert (area > 0.015).all() and (area < 0.5).all(), area
    # the object differs from its surroundings: mean colour inside vs a ring just outside the mask
    dilated = torch.nn.functional.max_pool2d(masks[:, None].float(), 5, 1, 2)[:, 0].bool()
    ring = dilated & ~masks
    inside = (images * masks[:, None]).sum((2, 3)) / masks.sum((1, 2))[:, None]
    outside = (images * ring[:, None]).sum((2, 3)) / ring.sum((1, 2))[:, None]
    assert ((inside - outside).abs().sum(1) > 0.2).float().mean() > 0.8


def test_texture_classes_are_not_told_apart_by_their_outline():
    """Mask area statistics are the same for every texture class: the silhouette carries no class."""
    data = SyntheticObjects(240, 32, "texture", seed=1)
    _, labels, masks = data.batch(240)
    area = masks.flatten(1).float().mean(1)
    per_class = torch.stack([area[labels == c].mean() for c in range(6)])
    assert (per_class.max() - per_class.min()) < 0.35 * per_class.mean(), per_class


def test_getitem_with_and_without_masks_and_augmentation():
    plain = SyntheticObjects(8, 32, return_mask=True)
    image, label, mask = plain[2]
    assert image.shape == (3, 32, 32) and int(label) == 2 and mask.shape == (32, 32)
    assert len(SyntheticObjects(8, 32)[2]) == 2
    torch.manual_seed(0)
    augmented = SyntheticObjects(8, 32, return_mask=True, augment=True)
    moved = [augmented[2] for _ in range(6)]
    assert any(not torch.equal(m[0], image) for m in moved)
    for x, _, m in moved:  # image and mask move together
        assert m.sum() == mask.sum()
        assert torch.allclose(x.sum(), image.sum(), atol=1e-3)


def test_two_object_images():
    data = TwoObjectImages(12, 32, "shape", num_classes=4, seed=2)
    images, labels, masks = data.batch(12)
    assert images.shape == (12, 3, 32, 32) and labels.shape == (12, 2) and masks.shape == (12, 2, 32, 32)
    assert (labels[:, 0] != labels[:, 1]).all() and labels.max() < 4
    assert not (masks[:, 0] & masks[:, 1]).any(), "objects overlap"
    assert (masks.flatten(2).sum(-1) > 20).all()


def test_class_names_and_errors():
    assert class_names("shape") == SHAPE_CLASSES and class_names("texture", 3) == TEXTURE_CLASSES[:3]
    with pytest.raises(ValueError, match="family"):
        SyntheticObjects(4, family="colour")
    with pytest.raises(ValueError, match="num_classes"):
        class_names("shape", 9)
    with pytest.raises(ValueError, match="image_size"):
        SyntheticObjects(4, image_size=8)
    with pytest.raises(IndexError, match="out of range"):
        SyntheticObjects(4).batch([7])


def test_datamodule_splits_and_seeded_shuffle():
    data = SyntheticDataModule(family="texture", num_classes=3, num_train=40, num_val=12, batch_size=8,
                               val_return_mask=True)
    data.setup("fit")
    assert len(data.train_set) == 40 and len(data.val_set) == 12 and data.classes == TEXTURE_CLASSES[:3]
    x, y, m = next(iter(data.val_dataloader()))
    assert x.shape == (8, 3, 32, 32) and m.shape == (8, 32, 32)
    state = torch.get_rng_state()
    first = [y for _, y in data.train_dataloader()]
    second = [y for _, y in SyntheticDataModule(family="texture", num_classes=3, num_train=40,
                                                batch_size=8).train_dataloader()]
    assert torch.equal(torch.cat(first), torch.cat(second))
    assert torch.equal(torch.get_rng_state(), state), "the shuffle must not draw from the global RNG"


def test_spurious_cue_marks_the_class_at_a_fixed_place_and_changes_nothing_else():
    clean = SyntheticObjects(64, 32, "texture", num_classes=4, seed=5, split="val")
    biased = SyntheticObjects(64, 32, "texture", num_classes=4, seed=5, split="val", cue_probability=0.9)
    (x0, y0, m0), (x1, y1, m1) = clean.batch(64), biased.batch(64)
    region = cue_region(32)
    assert region.sum() == 9 and region[1:4, 1:4].all(), "a 3 x 3 mark one pixel in from the top-left corner"
    marked = torch.tensor([biased.has_cue(i) for i in range(64)])
    assert 0.75 < marked.float().mean() < 1.0, marked.float().mean()
    assert torch.equal(y0, y1)
    changed = (x0 != x1).any(1)  # (B, H, W)
    assert not changed[:, ~region].any(), "only the mark's pixels may change"
    assert not changed[~marked].any() and changed[marked][:, region].float().mean() > 0.9
    # the mark's colour is the class's colour (up to the pixel noise), the same in every image of a class
    pixels = x1 * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    colour = pixels[:, :, region].mean(-1)  # (B, 3)
    expected = torch.tensor(CUE_COLOURS)[y1]
    assert ((colour - expected).abs().max(1).values < 0.05)[marked].all()
    assert not (m1 & region).any() and torch.equal(m1, m0 & ~region), "the mask is the visible object"
    # deterministic per (seed, split, index), and a different seed marks other images
    again = SyntheticObjects(64, 32, "texture", num_classes=4, seed=5, split="val", cue_probability=0.9)
    assert [again.has_cue(i) for i in range(64)] == marked.tolist()
    other = SyntheticObjects(64, 32, "texture", num_classes=4, seed=6, split="val", cue_probability=0.5)
    half = SyntheticObjects(64, 32, "texture", num_classes=4, seed=5, split="val", cue_probability=0.5)
    assert [other.has_cue(i) for i in range(64)] != [half.has_cue(i) for i in range(64)]


def test_centred_placement_puts_every_object_at_the_centre():
    images_random, _, random_masks = SyntheticObjects(48, 32, "texture", seed=2).batch(48)
    _, _, masks = SyntheticObjects(48, 32, "texture", seed=2, placement="centre").batch(48)
    grid = torch.arange(32) + 0.5

    def centres(m):
        area = m.flatten(1).sum(1).float()
        return torch.stack([(m.sum(2) * grid).sum(1) / area, (m.sum(1) * grid).sum(1) / area], 1)

    assert ((centres(masks) - 16).abs() <= 2 + 1.5).all(), "centre +- 1/16 of the side (+ the blob's asymmetry)"
    assert (centres(random_masks) - 16).abs().max() > 5
    assert torch.equal(masks.flatten(1).sum(1) > 0, torch.ones(48, dtype=torch.bool))


def test_datamodule_biased_train_and_val_and_a_cue_free_test_split():
    data = SyntheticDataModule(family="texture", num_classes=4, num_train=40, num_val=24, num_test=16,
                               cue_probability=0.9, placement="centre", val_return_mask=True)
    data.setup("fit")
    assert data.train_set.cue_probability == data.val_set.cue_probability == 0.9
    assert data.test_set.cue_probability == 0.0 and data.test_set.split == "test" and len(data.test_set) == 16
    assert {s.placement for s in (data.train_set, data.val_set, data.test_set)} == {"centre"}
    x, y, m = next(iter(data.test_dataloader()))
    assert x.shape == (16, 3, 32, 32) and m.shape == (16, 32, 32)
    with pytest.raises(ValueError, match="cue_probability"):
        SyntheticObjects(4, cue_probability=1.5)
    with pytest.raises(ValueError, match="placement"):
        SyntheticDataModule(placement="corner")
