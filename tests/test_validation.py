"""Bad input gets a clear error naming the problem."""

from __future__ import annotations

import pytest
import torch
from conftest import make_vit

import lightning_xai as lx


@pytest.fixture(scope="module")
def model():
    return make_vit()


@pytest.mark.parametrize(
    ("images", "error", "message"),
    [
        (torch.randn(3, 32, 32), ValueError, r"\(B, C, H, W\).*unsqueeze"),
        (torch.randn(2, 1, 32, 32), ValueError, "1 channels but the ViT takes 3"),
        (torch.randn(0, 3, 32, 32), ValueError, "empty batch"),
        (torch.full((1, 3, 32, 32), float("nan")), ValueError, "NaN or inf"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError, "floating-point"),
        (torch.randn(1, 3, 40, 40), ValueError, "built for 32x32.*dynamic_img_size=True"),
        ([[1.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_images(model, images, error, message):
    with pytest.raises(error, match=message):
        lx.explain(model, images)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_all_finite_answers_as_isfinite_all(dtype):
    """The finiteness check reads the minimum and maximum; it agrees with ``isfinite(x).all()`` wherever a NaN or
    an infinity sits, on strided and empty tensors, and a dtype without ``aminmax`` gets ``isfinite``'s answer."""
    from lightning_xai.validation import all_finite

    base = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    cases = [base, base.transpose(-1, -2), base[:, :, ::2], torch.empty(2, 3, 0, 8, dtype=dtype)]
    for bad in (float("nan"), float("inf"), float("-inf")):
        for where in ((0, 0, 0, 0), (1, 2, 7, 7), (1, 0, 3, 5)):
            case = base.clone()
            case[where] = bad
            cases += [case, case.transpose(-1, -2)]
    cases.append(torch.tensor([float("-inf"), float("inf")], dtype=dtype))
    cases.append(torch.full((1, 1, 2, 2), float("nan"), dtype=dtype))
    for case in cases:
        assert all_finite(case) == bool(torch.isfinite(case).all())
    if dtype is torch.float32 and hasattr(torch, "float8_e4m3fn"):
        eight = base.to(torch.float8_e4m3fn)
        try:
            expected = bool(torch.isfinite(eight).all())
        except RuntimeError as err:
            with pytest.raises(type(err)):
                all_finite(eight)
        else:
            assert all_finite(eight) == expected


def test_size_not_divisible_by_patch_on_dynamic_model():
    dynamic = make_vit(dynamic_img_size=True)
    with pytest.raises(ValueError, match="not divisible by the patch size 8x8"):
        lx.explain(dynamic, torch.randn(1, 3, 36, 32))


@pytest.mark.parametrize(
    ("targets", "error", "message"),
    [
        (5, ValueError, r"out of range.*5 classes"),
        (torch.tensor([0, -1]), ValueError, "out of range"),
        (torch.tensor([0, 1, 2]), ValueError, r"shape \(B,\) or \(B, K\) with B = 2"),
        (torch.tensor([0.5, 1.0]), TypeError, "integer class indices"),
        ("cat", TypeError, "class indices|sequence"),
    ],
)
def test_bad_targets(model, targets, error, message):
    with pytest.raises(error, match=message):
        lx.explain(model, torch.randn(2, 3, 32, 32), targets=targets)


def test_unknown_method_and_option(model):
    with pytest.raises(ValueError, match=r"unknown method 'gradcam'.*gradtoken"):
        lx.explain(model, torch.randn(1, 3, 32, 32), method="gradcam")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['layer'\].*'layers'"):
        lx.explain(model, torch.randn(1, 3, 32, 32), method="gradtoken", layer=2)
    with pytest.raises(ValueError, match="objective must be one of"):
        lx.explain(model, torch.randn(1, 3, 32, 32), method="gae", objective="prob")
    with pytest.raises(ValueError, match="granularity must be one of"):
        lx.explain(model, torch.randn(1, 3, 32, 32), method="c2f", granularity="pixels")
    with pytest.raises(ValueError, match="draws needs one entry per stage"):
        lx.explain(model, torch.randn(1, 3, 32, 32), method="c2f", draws=(1, 1))
    with pytest.raises(ValueError, match="layers=9"):
        lx.explain(model, torch.randn(1, 3, 32, 32), method="gradtoken", layers=9)


def test_registry_aliases(model):
    assert lx.get_explainer("Grad-Rollout").name == "gae"
    assert lx.get_explainer("ViT-CX").name == "vitcx"
    assert {"raw_attention", "rollout", "gae", "gradtoken", "vitcx", "c2f"} <= set(lx.available_methods())
