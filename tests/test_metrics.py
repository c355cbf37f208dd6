"""Tests for lightning_xai.metrics."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import average_precision_score

from lightning_xai.metrics import (
    baseline_images,
    class_discrimination,
    deletion_insertion,
    localization,
    perturbation_test,
)

KEYS = {"iou", "pixel_accuracy", "average_precision", "pointing_game", "energy_pointing_game"}


def _square_mask(b: int = 2, h: int = 8, w: int = 8) -> torch.Tensor:
    mask = torch.zeros(b, h, w, dtype=torch.bool)
    mask[:, 2:5, 3:7] = True  # 12 of 64 pixels
    return mask


def _region_model(x: torch.Tensor) -> torch.Tensor:
    """Target (class 0) logit grows with the sum of the top-left 4x4 region."""
    return torch.stack([x[:, :, :4, :4].sum((1, 2, 3)), torch.zeros(len(x), dtype=x.dtype)], 1) * 5


def _region_maps(b: int, h: int = 8, w: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(map ranking the 4x4 region first, map ranking it last)."""
    good = torch.zeros(b, h, w)
    good[:, :4, :4] = 1.0
    good = good + torch.rand(b, h, w) * 0.1
    return good, -good


# ---------------------------------------------------------------------------------------------------------------------
# localization
# ---------------------------------------------------------------------------------------------------------------------


def test_localization_map_equal_to_mask_is_perfect() -> None:
    mask = _square_mask()
    out = localization(mask.float(), mask)
    assert set(out) == KEYS
    for key, value in out.items():
        assert value.dtype == torch.float32
        assert value.shape == (2,)
        torch.testing.assert_close(value, torch.ones(2), msg=key)


def test_localization_inverted_map() -> None:
    mask = _square_mask()
    out = localization((~mask).float(), mask)
    torch.testing.assert_close(out["iou"], torch.zeros(2))
    torch.testing.assert_close(out["energy_pointing_game"], torch.zeros(2))
    torch.testing.assert_close(out["pixel_accuracy"], torch.zeros(2))
    torch.testing.assert_close(out["pointing_game"], torch.zeros(2))
    # All 12 positives ranked last among 64 pixels: AP = mean_k k / (52 + k).
    expected = sum(k / (52 + k) for k in range(1, 13)) / 12
    torch.testing.assert_close(out["average_precision"], torch.full((2,), expected))


def test_localization_uniform_and_zero_maps_give_mask_fraction() -> None:
    mask = _square_mask()
    uniform = localization(torch.full((2, 8, 8), 0.3), mask)
    zero = localization(torch.zeros(2, 8, 8), mask)
    torch.testing.assert_close(uniform["energy_pointing_game"], torch.full((2,), 12 / 64))
    torch.testing.assert_close(zero["energy_pointing_game"], torch.full((2,), 12 / 64))
    # Nothing is strictly above the mean: empty foreground, IoU = 0, accuracy = background share.
    torch.testing.assert_close(uniform["iou"], torch.zeros(2))
    torch.testing.assert_close(uniform["pixel_accuracy"], torch.full((2,), 52 / 64))


def test_localization_empty_mask_and_pointing_game() -> None:
    maps = torch.zeros(2, 4, 4)
    maps[0, 1, 2] = 5.0  # argmax in the mask
    maps[1, 3, 3] = 5.0  # argmax outside
    mask = torch.zeros(2, 4, 4)
    mask[:, 1, 2] = 1.0
    out = localization(maps, mask)
    torch.testing.assert_close(out["pointing_game"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(out["energy_pointing_game"], torch.tensor([1.0, 0.0]))
    empty = localization(maps, torch.zeros(2, 4, 4, dtype=torch.bool))
    torch.testing.assert_close(empty["average_precision"], torch.zeros(2))
    torch.testing.assert_close(empty["iou"], torch.zeros(2))


def test_localization_negative_values_ignored_in_energy() -> None:
    maps = torch.tensor([[[2.0, -10.0], [1.0, 0.0]]])
    mask = torch.tensor([[[True, True], [False, False]]])
    out = localization(maps, mask)
    torch.testing.assert_close(out["energy_pointing_game"], torch.tensor([2.0 / 3.0]))


def test_average_precision_matches_sklearn() -> None:
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(6, 9, 11, generator=gen, dtype=torch.float64).float()
    assert maps.flatten(1).unique(dim=None).numel() == maps.numel()  # no ties
    masks = torch.rand(6, 9, 11, generator=gen) < 0.3
    ap = localization(maps, masks)["average_precision"]
    for i in range(6):
        expected = average_precision_score(masks[i].flatten().numpy(), maps[i].flatten().numpy())
        assert ap[i].item() == pytest.approx(expected, abs=1e-5)


def test_average_precision_ties_are_stable() -> None:
    # Constant map: stable sort ranks pixels in row-major order.
    mask = torch.tensor([[[False, True], [False, True]]])
    ap = localization(torch.ones(1, 2, 2), mask)["average_precision"]
    torch.testing.assert_close(ap, torch.tensor([(1 / 2 + 2 / 4) / 2]))


def test_localization_leading_dims_and_broadcast() -> None:
    gen = torch.Generator().manual_seed(1)
    maps = torch.randn(3, 4, 6, 6, generator=gen)
    masks = torch.rand(3, 1, 6, 6, generator=gen) > 0.5
    out = localization(maps, masks)
    flat = localization(maps.reshape(12, 6, 6), masks.expand(3, 4, 6, 6).reshape(12, 6, 6))
    for key in KEYS:
        assert out[key].shape == (3, 4)
        torch.testing.assert_close(out[key].reshape(12), flat[key])
    single = localization(maps[0, 0], masks[0, 0])
    assert single["iou"].shape == ()


def test_localization_validation() -> None:
    with pytest.raises(ValueError, match=r"\(2, 5, 5\).*\(2, 4, 4\)"):
        localization(torch.rand(2, 4, 4), torch.ones(2, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least 2"):
        localization(torch.rand(4), torch.ones(4, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------------------------
# class_discrimination
# ---------------------------------------------------------------------------------------------------------------------


def test_class_discrimination() -> None:
    masks = torch.zeros(2, 2, 6, 6, dtype=torch.bool)
    masks[:, 0, :3, :3] = True
    masks[:, 1, 3:, 3:] = True
    maps = torch.zeros(2, 2, 6, 6)
    maps[0, 0] = masks[0, 0].float()  # map 0 on object 0 only -> 1
    maps[0, 1] = masks[0, 0].float()  # map 1 on the wrong object -> 0
    maps[1, 0] = masks[1, 0].float() * 3 + masks[1, 1].float()  # 27 vs 9 -> 0.75
    maps[1, 1] = -torch.ones(6, 6)  # no positive energy -> 0.5
    out = class_discrimination(maps, masks)
    assert out.shape == (2, 2) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0], [0.75, 0.5]]))
    torch.testing.assert_close(class_discrimination(torch.zeros(2, 2, 6, 6), masks), torch.full((2, 2), 0.5))


def test_class_discrimination_validation() -> None:
    with pytest.raises(ValueError):
        class_discrimination(torch.rand(2, 3, 4, 4), torch.ones(2, 3, 4, 4))
    with pytest.raises(ValueError):
        class_discrimination(torch.rand(2, 2, 4, 4), torch.ones(2, 2, 5, 4))


# ---------------------------------------------------------------------------------------------------------------------
# baselines
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [4, 16])
def test_blur_of_constant_image_is_constant(side: int) -> None:
    images = torch.full((2, 3, side, side + 1), 0.7)
    out = baseline_images(images, "blur")
    assert out.shape == images.shape
    torch.testing.assert_close(out, images)


def test_blur_smooths_and_preserves_mean_roughly() -> None:
    images = torch.zeros(1, 1, 21, 21)
    images[0, 0, 10, 10] = 1.0
    out = baseline_images(images)
    assert out[0, 0, 10, 10] < 0.05
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5)  # interior impulse: kernel sums to 1
    torch.testing.assert_close(out, out.transpose(-1, -2))


def test_zero_and_mean_baselines() -> None:
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    assert torch.equal(baseline_images(images, "zero"), torch.zeros_like(images))
    mean = baseline_images(images, "mean")
    assert mean.shape == images.shape
    torch.testing.assert_close(mean[1, 2], torch.full((4, 4), images[1, 2].mean().item()))
    with pytest.raises(ValueError, match="blur"):
        baseline_images(images, "noise")


# ---------------------------------------------------------------------------------------------------------------------
# deletion / insertion
# ---------------------------------------------------------------------------------------------------------------------


def test_deletion_insertion_prefers_map_on_region() -> None:
    torch.manual_seed(0)
    images = torch.rand(3, 2, 8, 8) * 0.5
    good, bad = _region_maps(3)
    targets = torch.zeros(3, dtype=torch.long)
    res_good = deletion_insertion(_region_model, images, good, targets, n_steps=16, baseline="zero")
    res_bad = deletion_insertion(_region_model, images, bad, targets, n_steps=16, baseline="zero")
    assert res_good["deletion"].shape == (3, 17)
    assert res_good["insertion"].shape == (3, 17)
    assert res_good["deletion_auc"].shape == (3,)
    assert bool((res_good["deletion_auc"] < res_bad["deletion_auc"] - 0.05).all())
    assert bool((res_good["insertion_auc"] > res_bad["insertion_auc"] + 0.05).all())
    torch.testing.assert_close(res_good["deletion_auc"], res_good["deletion"].mean(1))
    torch.testing.assert_close(res_good["insertion_auc"], res_good["insertion"].mean(1))


@pytest.mark.parametrize("baseline", ["blur", "zero", "mean"])
def test_deletion_endpoints(baseline: str) -> None:
    torch.manual_seed(1)
    images = torch.rand(2, 3, 8, 8) * 0.3
    maps = torch.rand(2, 1, 8, 8)
    targets = torch.tensor([0, 1])
    res = deletion_insertion(_region_model, images, maps, targets, n_steps=5, baseline=baseline)

    def prob(x: torch.Tensor) -> torch.Tensor:
        return _region_model(x).softmax(-1).gather(1, targets[:, None]).squeeze(1)

    base = baseline_images(images, baseline)
    torch.testing.assert_close(res["deletion"][:, 0], prob(images))
    torch.testing.assert_close(res["deletion"][:, -1], prob(base))
    torch.testing.assert_close(res["insertion"][:, 0], prob(base))
    torch.testing.assert_close(res["insertion"][:, -1], prob(images))


def test_deletion_intermediate_step_exact() -> None:
    # 4x4 image, 2 steps: step 1 removes round(0.5 * 16) = 8 pixels (top half by this map).
    images = torch.ones(1, 1, 4, 4)
    maps = torch.zeros(1, 4, 4)
    maps[0, :2] = 1.0

    def model(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[:, 0, :2].sum((1, 2)), x[:, 0, 2:].sum((1, 2))], 1)

    res = deletion_insertion(model, images, maps, torch.tensor([0]), n_steps=2, baseline="zero")
    expected = torch.tensor([0.5, 1 / (1 + torch.e**8), 0.5])
    torch.testing.assert_close(res["deletion"][0], expected)
    torch.testing.assert_close(res["insertion"][0], torch.tensor([0.5, 1 / (1 + torch.e**-8), 0.5]))


def test_deletion_insertion_chunking_is_invariant_and_resizes_maps() -> None:
    torch.manual_seed(2)
    images = torch.rand(4, 3, 8, 8)
    maps = torch.rand(4, 4, 4)  # lower resolution: bilinear upsampling
    targets = torch.tensor([0, 1, 0, 1])
    small = deletion_insertion(_region_model, images, maps, targets, n_steps=7, batch_size=3)
    large = deletion_insertion(_region_model, images, maps, targets, n_steps=7, batch_size=1000)
    for key in small:
        torch.testing.assert_close(small[key], large[key], rtol=0, atol=0)


def test_deletion_insertion_validation() -> None:
    images = torch.rand(2, 1, 8, 8)
    maps = torch.rand(2, 8, 8)
    targets = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="n_steps"):
        deletion_insertion(_region_model, images, maps, targets, n_steps=0)
    with pytest.raises(ValueError, match="maps"):
        deletion_insertion(_region_model, images, torch.rand(3, 8, 8), targets)
    with pytest.raises(ValueError, match="targets"):
        deletion_insertion(_region_model, images, maps, torch.tensor([0, 2]), n_steps=2)
    with pytest.raises(ValueError, match="targets"):
        deletion_insertion(_region_model, images, maps, torch.tensor([0, -1]), n_steps=2)
    with pytest.raises(ValueError, match="baseline"):
        deletion_insertion(_region_model, images, maps, targets, baseline="gray")


# ---------------------------------------------------------------------------------------------------------------------
# perturbation test
# ---------------------------------------------------------------------------------------------------------------------


def test_perturbation_positive_drops_faster_than_negative() -> None:
    torch.manual_seed(3)
    b = 6
    images = torch.rand(b, 1, 8, 8) * 0.5 + 0.25

    def model(x: torch.Tensor) -> torch.Tensor:
        # Class 0 wins while the region still holds enough mass; threshold ~ a third of the region.
        return torch.stack([x[:, :, :4, :4].sum((1, 2, 3)), torch.full((len(x),), 2.0)], 1)

    good, _ = _region_maps(b)
    targets = torch.zeros(b, dtype=torch.long)
    pos = perturbation_test(model, images, good, targets, mode="positive")
    neg = perturbation_test(model, images, good, targets, mode="negative")
    assert pos["fractions"].shape == (9,)
    torch.testing.assert_close(pos["fractions"], torch.arange(1, 10) / 10)
    assert pos["accuracy"].shape == (9,) and pos["probability"].shape == (b, 9)
    assert pos["accuracy_auc"].shape == () and pos["probability_auc"].shape == (b,)
    # Positive: region (25%) gone by fraction 0.3 -> accuracy 0; negative: region untouched until 0.75.
    torch.testing.assert_close(pos["accuracy"][2:], torch.zeros(7))
    torch.testing.assert_close(neg["accuracy"][:7], torch.ones(7))
    assert pos["accuracy_auc"] < neg["accuracy_auc"]
    assert bool((pos["probability_auc"] < neg["probability_auc"]).all())
    torch.testing.assert_close(pos["accuracy_auc"], pos["accuracy"].mean())
    torch.testing.assert_close(pos["probability_auc"], pos["probability"].mean(1))


def test_perturbation_validation() -> None:
    images = torch.rand(2, 1, 8, 8)
    maps = torch.rand(2, 8, 8)
    targets = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="mode"):
        perturbation_test(_region_model, images, maps, targets, mode="sideways")
    with pytest.raises(ValueError, match="fractions"):
        perturbation_test(_region_model, images, maps, targets, fractions=(0.5, 1.5))
    with pytest.raises(ValueError, match="baseline"):
        perturbation_test(_region_model, images, maps, targets, baseline="gray")
