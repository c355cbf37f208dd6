"""Maps of a ViT trained in this session on generated images with known object masks."""

from __future__ import annotations

import pytest
import torch

import lightning_xai as lx
from lightning_xai.demos import TwoObjectImages
from lightning_xai.metrics import class_discrimination, localization

N_EVAL = 48


def accuracy(module, data) -> float:
    images, labels, _ = data.val_set.batch(range(N_EVAL * 2))
    with torch.no_grad():
        return float((module(images).argmax(-1) == labels).float().mean())


def localisation(module, data, method, **options):
    images, labels, masks = data.val_set.batch(range(N_EVAL))
    result = lx.explain(module, images, method=method, targets=labels, **options)
    scores = localization(result.maps[:, 0], masks)
    return {k: float(v.mean()) for k, v in scores.items()}, float(masks.float().mean())


def test_the_test_model_learned_its_task(texture_model):
    assert accuracy(*texture_model) > 0.85


@pytest.mark.parametrize("method", ["gradtoken", "gae"])
def test_gradient_methods_localise_better_than_chance_and_raw_attention(texture_model, method):
    scores, chance = localisation(*texture_model, method)
    baseline, _ = localisation(*texture_model, "raw_attention")
    assert scores["energy_pointing_game"] > chance + 0.15, (scores, chance)
    assert scores["energy_pointing_game"] > baseline["energy_pointing_game"] + 0.05, (scores, baseline)
    assert scores["iou"] > baseline["iou"], (scores, baseline)
    assert scores["pointing_game"] > 0.7, scores


def test_c2f_localises_better_than_chance_and_raw_attention(texture_model):
    scores, chance = localisation(*texture_model, "c2f")
    baseline, _ = localisation(*texture_model, "raw_attention")
    assert scores["energy_pointing_game"] > chance + 0.15, (scores, chance)
    assert scores["energy_pointing_game"] > baseline["energy_pointing_game"], (scores, baseline)
    assert scores["iou"] > baseline["iou"], (scores, baseline)


def _two_object_batch(module, data, count=48):
    """Two-object images on which the model ranks the two present classes top-2."""
    pairs = TwoObjectImages(num_samples=count * 4, image_size=32, family=data.family, num_classes=4, seed=11)
    images, labels, masks = pairs.batch(range(count * 4))
    with torch.no_grad():
        top2 = module(images).topk(2, -1).indices.sort(-1).values
    keep = (top2 == labels.sort(-1).values).all(-1)
    assert int(keep.sum()) >= 8, "too few two-object images where the model ranks both classes top-2"
    return images[keep][:count], labels[keep][:count], masks[keep][:count]


def test_gradtoken_maps_for_two_classes_point_at_their_own_objects(texture_model):
    module, data = texture_model
    images, labels, masks = _two_object_batch(module, data)
    result = lx.explain(module, images, method="gradtoken", targets=labels)
    own = class_discrimination(result.maps, masks)  # (B, 2): share of each map's energy on its own object
    assert float(own.mean()) > 0.65, float(own.mean())
    assert float((own > 0.5).float().mean()) > 0.75
    for method in ("raw_attention", "rollout"):  # class-agnostic by construction: the same map for both
        agnostic = lx.explain(module, images, method=method, targets=labels)
        torch.testing.assert_close(agnostic.maps[:, 0], agnostic.maps[:, 1])
        torch.testing.assert_close(class_discrimination(agnostic.maps, masks).mean(), torch.tensor(0.5))
