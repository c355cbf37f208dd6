"""C2F-Explainer: the attention fusion against a direct implementation of METHODS.md (both fusions), float32
mask distances against float64 ones (same merged masks), the no-positive-mask warning, and option checks."""

from __future__ import annotations

import inspect
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_vit

import lightning_xai as lx
from lightning_xai.adapters import capture, find_vit, geometry
from lightning_xai.explainers import NoPositiveMaskWarning, get_explainer
from lightning_xai.explainers.masks import channel_masks, cluster_labels, cosine_distances, informative

TARGETS = torch.tensor([[0, 3], [2, 1], [4, 4]])
GRID, SIZE, PREFIX = 4, 32, 3  # the model below: 32 px, patch 8, class token + 2 register tokens


@pytest.fixture(scope="module")
def model():
    return make_vit(reg_tokens=2, depth=3)


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))


# -- attention fusion, written out directly from METHODS.md ------------------------------------------------
def _minmax(values: list[float]) -> list[float]:
    low, high = min(values), max(values)
    return [(v - low) / (high - low) for v in values]


def _cosine(u: list[float], v: list[float]) -> float:
    dot = sum(a * b for a, b in zip(u, v, strict=True))
    return dot / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))


def direct_fine_map(model, image: torch.Tensor, coarse: torch.Tensor, fusion: str) -> torch.Tensor:
    """``S_fine`` and ``S_coarse ⊙ upsample(I)`` for one image ``(3, 32, 32)`` and its coarse map ``(32, 32)``,
    in float64, with loops over patches (steps 4-7 of METHODS.md's C2F section)."""
    with torch.no_grad(), capture(model, ("attn",)) as record:
        model(image[None])
    tokens = record.attn[0].shape[-1]
    relation = torch.eye(tokens, dtype=torch.float64)
    for layer in record.attn:  # R = Π_l rownorm(mean_h A^l + I), rollout order
        a = layer[0].double().mean(0) + torch.eye(tokens, dtype=torch.float64)
        relation = (a / a.sum(1, keepdim=True)) @ relation
    q = relation[PREFIX:, PREFIX:].tolist()  # row i: patch i's cross-layer relation profile
    n = GRID * GRID
    cell = SIZE // GRID
    c = [float(coarse[(i // GRID) * cell : (i // GRID + 1) * cell, (i % GRID) * cell : (i % GRID + 1) * cell]
               .double().mean()) for i in range(n)]  # coarse map pooled to the patch grid
    f = [sum(c[j] * q[j][i] for j in range(n)) / sum(c) for i in range(n)]
    b = [sum((1 - c[j]) * q[j][i] for j in range(n)) / sum(1 - cj for cj in c) for i in range(n)]
    importance = _minmax([max(0.0, _cosine(q[i], f) - _cosine(q[i], b)) for i in range(n)])
    if fusion == "relation":
        importance = [fi * ii for fi, ii in zip(_minmax(f), importance, strict=True)]
    grid = torch.tensor(importance, dtype=torch.float64).reshape(1, 1, GRID, GRID)
    up = F.interpolate(grid, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0]
    product = coarse.double() * up
    return (product - product.min()) / (product.max() - product.min()), product


@pytest.mark.parametrize("fusion", ["relation", "contrast"])
def test_fine_map_equals_direct_attention_fusion(model, images, fusion):
    result = lx.explain(model, images, method="c2f", targets=TARGETS, fusion=fusion)
    assert result.options["fusion"] == fusion
    for b in range(3):
        for k in range(2):
            fine, product = direct_fine_map(model, images[b], result.coarse[b, k], fusion)
            torch.testing.assert_close(result.fine[b, k].double(), fine, rtol=1e-4, atol=2e-5)
            torch.testing.assert_close(result.maps[b, k], result.fine[b, k])
            # raw = S_coarse ⊙ upsample(I) times one positive number per map (the unnormalised coarse peak)
            inside = product > 1e-3 * product.max()
            ratio = result.raw[b, k].double()[inside] / product[inside]
            assert float(ratio.min()) > 0
            torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio.mean())), rtol=1e-3, atol=0)


def test_relation_fusion_is_the_default_and_differs_from_contrast(model, images):
    assert get_explainer("c2f").check_options({})["fusion"] == "relation"
    default = lx.explain(model, images, method="c2f", targets=TARGETS)
    relation = lx.explain(model, images, method="c2f", targets=TARGETS, fusion="relation")
    contrast = lx.explain(model, images, method="c2f", targets=TARGETS, fusion="contrast")
    assert torch.equal(default.maps, relation.maps)
    torch.testing.assert_close(contrast.coarse, relation.coarse)  # the fusion is the fine stage only
    assert (contrast.maps - relation.maps).abs().amax() > 0.05


# -- float32 mask distances --------------------------------------------------------------------------------
def float64_cosine_distances(masks: torch.Tensor) -> np.ndarray:
    """The previous, float64 CPU computation, as the reference."""
    flat = F.normalize(masks.flatten(1).double().cpu(), dim=1)
    return (1.0 - flat @ flat.T).clamp_min(0).fill_diagonal_(0).numpy()


def _norm1_features(model, images):
    vit = find_vit(model)
    with torch.no_grad(), capture(vit, ("norm1",)) as record:
        model(images)
    return record.norm1[-1], geometry(vit, tuple(images.shape[-2:]))


def _assert_same_merges(features, geom):
    """Same labels (so the same merged masks, in the same order) at ViT-CX's threshold and C2F's levels."""
    for feats in features:
        masks = informative(channel_masks(feats, geom))
        single, double = cosine_distances(masks), float64_cosine_distances(masks)
        assert single.dtype == np.float32 and np.array_equal(single, single.T) and not np.diag(single).any()
        assert np.abs(single - double).max() < 1e-5
        for threshold in (0.1, 0.25, 0.5):
            assert np.array_equal(cluster_labels(single, threshold), cluster_labels(double, threshold))


def test_float32_distances_merge_as_float64_on_a_trained_model(texture_model):
    module, data = texture_model
    images, _, _ = data.val_set.batch(range(64))
    _assert_same_merges(*_norm1_features(module, images))


def test_float32_distances_merge_as_float64_on_a_random_vit():
    model = make_vit(img_size=(64, 48), patch_size=8, depth=2, embed_dim=96, reg_tokens=1)
    images = torch.randn(8, 3, 64, 48, generator=torch.Generator().manual_seed(5))
    _assert_same_merges(*_norm1_features(model, images))


# -- the no-positive-mask warning -------------------------------------------------------------------------
def test_no_positive_mask_warns_once_per_explainer_at_the_callers_line(model, images):
    # alpha = 1 calls a mask positive only if masking raises the target's probability: the fallback is used
    explainer = lx.create_explainer("c2f", model, thresholds=[(1.0, 1.0)], draws=[1])
    with pytest.warns(NoPositiveMaskWarning, match="`thresholds`") as record:
        line = inspect.currentframe().f_lineno + 1
        explainer(images)
    assert issubclass(NoPositiveMaskWarning, UserWarning)
    assert len(record) == 1 and record[0].filename == __file__ and record[0].lineno == line
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call on the same explainer stays silent
        explainer(images)
    with pytest.warns(NoPositiveMaskWarning) as record:  # through the functional API: a new explainer
        line = inspect.currentframe().f_lineno + 1
        lx.explain(model, images, method="c2f", thresholds=[(1.0, 1.0)], draws=[1])
    assert record[0].filename == __file__ and record[0].lineno == line


# -- option checks -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"fusion": "both"}, "fusion"),
        ({"granularity": "pixels"}, "granularity"),
        ({"thresholds": [(0.2, 0.8)]}, "thresholds"),
        ({"thresholds": [0.5]}, "thresholds"),
        ({"thresholds": []}, "thresholds"),
        ({"draws": [1, 1]}, "draws"),
        ({"draws": 2}, "draws"),
        ({"draws": [1, 0, 2]}, "draws"),
        ({"granularity": "clusters", "levels": [0.1, 0.25, 0.5]}, "levels"),
        ({"granularity": "clusters", "levels": [0.5, 0.25]}, "levels"),
        ({"levels": [3.0, 0.25, 0.1]}, "levels"),
        ({"cluster_threshold": 0}, "cluster_threshold"),
        ({"cluster_threshold": True}, "cluster_threshold"),
        ({"noise_sigma": float("nan")}, "noise_sigma"),
        ({"batch_size": 0}, "batch_size"),
        ({"seed": 1.5}, "seed"),
        ({"fussion": "relation"}, "fussion"),
    ],
)
def test_bad_option_values_are_rejected_without_a_model(options, named):
    with pytest.raises(ValueError, match=named):
        get_explainer("c2f").check_options(options)


def test_check_options_normalises_and_the_constructor_uses_it(model):
    checked = get_explainer("c2f").check_options({"thresholds": [[1, 0], [0.5, 0.5]], "draws": [2, 1]})
    assert checked["thresholds"] == ((1.0, 0.0), (0.5, 0.5)) and checked["draws"] == (2, 1)
    assert checked["fusion"] == "relation" and checked["cluster_threshold"] == 0.1
    assert get_explainer("vitcx").check_options({"noise_sigma": 1}) == dict(
        cluster_threshold=0.1, noise_sigma=1.0, batch_size=64, seed=0
    )
    explainer = lx.create_explainer("c2f", model, thresholds=[[1, 0], [0.5, 0.5]], draws=[2, 1])
    assert explainer.options() == checked
    with pytest.raises(ValueError, match="fusion"):
        get_explainer("c2f")(model, fusion="both")
    with pytest.raises(ValueError, match="noise_sigma"):
        lx.create_explainer("vitcx", model, noise_sigma=-1)
