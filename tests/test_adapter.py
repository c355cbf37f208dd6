"""The ViT adapter on real timm configurations: geometry, capture, fused-attention and hook hygiene."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import timm
import torch
from conftest import make_vit
from torch import nn

import lightning_xai as lx
from lightning_xai.adapters import capture, find_vit, geometry

ALL_METHODS = ["raw_attention", "rollout", "gae", "gradtoken", "vitcx", "c2f"]

CONFIGS = {
    "class_token": dict(kw={}, size=(32, 32), grid=(4, 4), prefix=1),
    "patch16": dict(kw=dict(img_size=64, patch_size=16), size=(64, 64), grid=(4, 4), prefix=1),
    "registers": dict(kw=dict(reg_tokens=4), size=(32, 32), grid=(4, 4), prefix=5),
    "non_square": dict(kw=dict(img_size=(48, 64)), size=(48, 64), grid=(6, 8), prefix=1),
    "dynamic": dict(kw=dict(dynamic_img_size=True), size=(40, 56), grid=(5, 7), prefix=1),
}


def _model(name: str) -> nn.Module:
    return make_vit(**CONFIGS[name]["kw"])


def _distilled() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=5,
        depth=2, embed_dim=48, num_heads=3,
    ).eval()


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_on_every_configuration(name, method):
    model, cfg = _model(name), CONFIGS[name]
    images = torch.randn(2, 3, *cfg["size"])
    result = lx.explain(model, images, method=method, targets=torch.tensor([[0, 1], [2, 3]]))
    assert result.maps.shape == (2, 2, *cfg["size"])
    assert result.maps.dtype == torch.float32
    assert float(result.maps.min()) >= 0 and float(result.maps.max()) <= 1
    assert torch.isfinite(result.raw).all()
    if method in ("vitcx", "c2f"):
        assert result.patch_maps is None and result.evaluations.shape == (2,)
    else:
        assert result.patch_maps.shape == (2, 2, *cfg["grid"])
    assert geometry(model, cfg["size"]).num_prefix == cfg["prefix"]


def test_distilled_deit_has_two_prefix_tokens_and_explains():
    model = _distilled()
    assert geometry(model, (32, 32)).num_prefix == 2
    with capture(model, ("attn",)) as record:
        model(torch.randn(1, 3, 32, 32))
    assert record.attn[0].shape == (1, 3, 2 + 16, 2 + 16)
    for method in ALL_METHODS:
        assert lx.explain(model, torch.randn(2, 3, 32, 32), method=method).maps.shape == (2, 1, 32, 32)


def test_dynamic_size_grid_follows_the_input():
    model = _model("dynamic")
    assert geometry(model, (32, 32)).grid == (4, 4)
    assert geometry(model, (40, 56)).grid == (5, 7)


def test_average_pooled_model_without_class_token():
    model = make_vit(global_pool="avg", class_token=False, fc_norm=False)
    images = torch.randn(2, 3, 32, 32)
    assert geometry(model, (32, 32)).readout.groups == ("patches",)
    for method in ALL_METHODS:  # GradToken reads the patch rows (METHODS.md), no class token needed
        result = lx.explain(model, images, method=method)
        assert result.maps.shape == (2, 1, 32, 32) and torch.isfinite(result.raw).all()


def test_capture_records_inputs_norm1_and_probabilities():
    model = make_vit()
    x = torch.randn(2, 3, 32, 32)
    with capture(model) as record:
        out = model(x)
    assert len(record.tokens) == len(record.norm1) == len(record.attn) == 3
    assert record.tokens[0].shape == (2, 17, 48) and record.norm1[2].shape == (2, 17, 48)
    torch.testing.assert_close(record.attn[1].sum(-1), torch.ones(2, 3, 17))
    torch.testing.assert_close(record.norm1[0], model.blocks[0].norm1(record.tokens[0]))
    torch.testing.assert_close(out, model(x))  # the unfused path gives the same logits
    grads = torch.autograd.grad(out[:, 0].sum(), record.attn)
    assert all(g.shape == a.shape for g, a in zip(grads, record.attn, strict=True))


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_fused_flags_and_hooks_restored_also_on_error():
    model = make_vit()
    for block in model.blocks:
        block.attn.fused_attn = True
    hooks = _hook_count(model)
    lx.explain(model, torch.randn(1, 3, 32, 32), method="gae")
    assert all(block.attn.fused_attn for block in model.blocks)

    def broken(_):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        lx.explain(model, torch.randn(1, 3, 32, 32), method="gradtoken", output_transform=broken)
    assert all(block.attn.fused_attn for block in model.blocks)
    assert _hook_count(model) == hooks


class Wrapped(pl.LightningModule):
    def __init__(self, as_dict: bool = False):
        super().__init__()
        self.backbone = make_vit(num_classes=5)
        self.as_dict = as_dict

    def forward(self, x):
        logits = self.backbone(x) * 2.0  # the module's own output transform, beyond the ViT's head
        return {"logits": logits, "aux": logits.mean()} if self.as_dict else (logits, None)


def test_lightning_module_is_explained_through_its_own_forward():
    module = Wrapped().eval()
    assert find_vit(module) is module.backbone
    assert find_vit(module, "backbone") is module.backbone
    assert find_vit(module, lambda m: m.backbone) is module.backbone
    images = torch.randn(2, 3, 32, 32)
    result = lx.explain(module, images, method="gradtoken")
    expected = module(images)[0].softmax(-1)  # probabilities of the whole module, not of the ViT's head
    torch.testing.assert_close(result.probs[:, 0], expected.max(-1).values)
    as_dict = Wrapped(as_dict=True).eval()
    as_dict.load_state_dict(module.state_dict())
    torch.testing.assert_close(lx.explain(as_dict, images, method="gradtoken").maps, result.maps)
    custom = lx.explain(as_dict, images, method="gradtoken", output_transform=lambda out: out["logits"])
    torch.testing.assert_close(custom.maps, result.maps)


def test_modules_that_are_not_vits_get_a_helpful_error():
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(TypeError, match=r"no supported Vision Transformer found in Sequential.*Conv2d.*vit="):
        lx.explain(cnn, torch.randn(1, 3, 32, 32))
    with pytest.raises(TypeError, match="has no attribute path 'encoder'"):
        find_vit(Wrapped(), "encoder")
    with pytest.raises(TypeError, match="not a supported Vision Transformer"):
        find_vit(Wrapped(), lambda m: m.backbone.head)


class _ClassFlag(nn.Module):
    grad_checkpointing = True  # a class attribute, never set on the instance


class _PropertyFlag(nn.Module):
    @property
    def gradient_checkpointing(self) -> bool:
        return True

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.__dict__["_set"] = value


class _Forwarding(nn.Module):
    """A wrapper that answers unknown attributes from the module it wraps (as PEFT's wrappers do)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def test_checkpointing_flags_are_found_as_getattr_finds_them():
    """``without_checkpointing`` reads the flags without ``getattr``'s AttributeErrors; what it finds is what
    ``getattr(module, name, None) is True`` finds, on instance, class and property flags and behind a
    ``__getattr__`` that forwards, and every flag is restored."""
    from lightning_xai.adapters import _checkpointing_flags, without_checkpointing

    vit = make_vit(depth=2)
    vit.set_grad_checkpointing(True)
    vit.blocks[0].add_module("extra", nn.ModuleList([_ClassFlag(), _PropertyFlag(), _Forwarding(_ClassFlag())]))
    vit.blocks[1].gradient_checkpointing = False
    names = ("grad_checkpointing", "gradient_checkpointing")
    expected = [(m, n) for m in vit.modules() for n in names if getattr(m, n, None) is True]
    found = _checkpointing_flags(vit)
    assert [(id(m), n) for m, n in found] == [(id(m), n) for m, n in expected]
    assert {type(m).__name__ for m, _ in found} == {"VisionTransformer", "_ClassFlag", "_PropertyFlag", "_Forwarding"}
    with without_checkpointing(vit):
        assert not vit.grad_checkpointing
    assert vit.grad_checkpointing and vit.blocks[1].gradient_checkpointing is False
