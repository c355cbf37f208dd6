"""An explanation leaves the model exactly as found, in every grad mode and dtype."""

from __future__ import annotations

import pytest
import torch
from conftest import make_vit

import lightning_xai as lx

METHODS = ["raw_attention", "rollout", "gae", "gradtoken", "vitcx", "c2f"]


def _snapshot(model):
    return {
        "modes": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "params": [p.detach().clone() for p in model.parameters()],
        "fused": [b.attn.fused_attn for b in model.blocks],
    }


def _assert_same(before, after):
    assert before["modes"] == after["modes"]
    assert before["requires_grad"] == after["requires_grad"]
    assert before["fused"] == after["fused"]
    for a, b in zip(before["grads"], after["grads"], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    for a, b in zip(before["params"], after["params"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", METHODS)
def test_state_is_untouched(method):
    model = make_vit(drop_rate=0.1, attn_drop_rate=0.1).train()
    model.blocks[0].eval()  # mixed modes must come back individually
    model.patch_embed.requires_grad_(False)  # frozen part stays frozen
    for i, p in enumerate(model.parameters()):
        if i % 2 == 0 and p.requires_grad:
            p.grad = torch.full_like(p, 0.25 + i)  # a known gradient the explainer must not touch
    images = torch.randn(2, 3, 32, 32)
    before = _snapshot(model)
    rng = torch.get_rng_state()
    lx.explain(model, images, method=method, targets=[1, 2])
    _assert_same(before, _snapshot(model))
    assert torch.equal(rng, torch.get_rng_state()), "explaining consumed the global RNG"


def test_maps_are_computed_in_eval_mode_even_for_a_training_model():
    model = make_vit(drop_rate=0.3, attn_drop_rate=0.3)
    images = torch.randn(2, 3, 32, 32)
    eval_maps = lx.explain(model.eval(), images, method="gradtoken").maps
    train_maps = lx.explain(model.train(), images, method="gradtoken").maps
    torch.testing.assert_close(eval_maps, train_maps)


@pytest.mark.parametrize("method", ["gradtoken", "gae", "c2f"])
def test_works_under_no_grad_and_inference_mode(method):
    model = make_vit()
    images = torch.randn(2, 3, 32, 32)
    reference = lx.explain(model, images, method=method).maps
    with torch.no_grad():
        torch.testing.assert_close(lx.explain(model, images, method=method).maps, reference)
    with torch.inference_mode():
        inference_images = images.clone()
        torch.testing.assert_close(lx.explain(model, inference_images, method=method).maps, reference)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_gives_float32_maps(dtype):
    model = make_vit()
    reference = lx.explain(model, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    model = model.to(dtype)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for method in ("gradtoken", "gae", "rollout"):
        result = lx.explain(model, images, method=method)
        assert result.maps.dtype == result.raw.dtype == result.probs.dtype == torch.float32
        assert torch.isfinite(result.raw).all()
    low = lx.explain(model, images, method="gradtoken")
    corr = torch.corrcoef(torch.stack([low.raw.flatten(), reference.raw.flatten()]))[0, 1]
    assert corr > 0.9, f"half-precision map far from float32 map (corr {corr:.3f})"


def test_autocast_gives_float32_maps():
    model = make_vit()
    images = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = lx.explain(model, images, method="gradtoken")
    assert result.maps.dtype == torch.float32 and torch.isfinite(result.maps).all()


class _CountsTrain(torch.nn.Module):
    """A module whose ``train`` override must run when the model is put in eval mode (as Hugging Face's does)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[bool] = []

    def train(self, mode: bool = True):
        self.calls.append(mode)
        return super().train(mode)


@pytest.mark.parametrize("override", [False, True])
def test_explanation_mode_sets_eval_as_model_eval_does_and_restores_each_flag(override):
    """``explanation_mode`` sets the flags directly unless ``train`` is overridden somewhere, where it calls
    ``model.eval()``: inside, every module is in eval mode (a module shared by two parents too) and an override
    was called as ``eval()`` calls it; on exit every flag is back, mixed modes included."""
    from lightning_xai.explainers.base import explanation_mode

    model = make_vit(depth=2).train()
    shared = torch.nn.Linear(2, 2)
    model.blocks[1].eval()
    model.blocks[0].add_module("shared", shared)
    model.blocks[1].add_module("shared_again", shared)  # a training module inside an eval-mode block
    counter = _CountsTrain()  # in training mode, as built
    if override:
        model.blocks[0].add_module("counter", counter)
    before = [m.training for m in model.modules()]
    with explanation_mode(model):
        assert not any(m.training for m in model.modules())
        assert torch.is_grad_enabled()
    assert [m.training for m in model.modules()] == before and shared.training
    assert counter.calls == ([False] if override else [])
