"""The fused path (issue 17): GradToken, GAE, rollout and raw attention with the model's own fused attention
kernel, recomputing the attention rows from q, k, v and the gradient at each block's attention output, give
the maps of the recorded-attention path on every family and variant; a family that keeps the recorded path
says so in its code; the fused kernel really stays on and every hook is removed."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import make_vit
from family_models import PixelValues, hf_config, hf_deit_from_timm, hf_vit_from_timm, timm_vit, torchvision_from_timm

import lightning_xai as lx
from lightning_xai.adapters import find_vit, geometry
from lightning_xai.adapters.base import Family
from lightning_xai.explainers import fused
from lightning_xai.explainers.fused import recorded_path, uses_fused_path

METHODS = ["raw_attention", "rollout", "gae", "gradtoken"]


def _hf(cls_name: str, config: str, **options):
    transformers = pytest.importorskip("transformers", reason="the Hugging Face family needs the hf extra")
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(hf_config(config, **options)).eval()
    with torch.no_grad():  # BEiT's relative position tables start at zero
        for name, param in model.named_parameters():
            if "relative_position_bias_table" in name:
                param.copy_(0.3 * torch.randn_like(param))
    return PixelValues(model)


def _hf_pair(convert, model_name="vit_tiny_patch16_224"):
    pytest.importorskip("transformers", reason="the Hugging Face family needs the hf extra")
    return PixelValues(convert(timm_vit(model_name=model_name)))


def _timm_small(name, **kwargs):
    """A tiny timm model; BEiT's relative position tables and q/v biases random (timm starts them at zero)."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                              num_classes=5, **kwargs).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "relative_position_bias_table" in param_name or param_name.endswith(("q_bias", "v_bias")):
                param.copy_(0.3 * torch.randn_like(param))
    return model


#: variant -> (model builder, input size (H, W), whether the family explains it on the fused path)
VARIANTS = {
    "timm_class_token": (lambda: make_vit(depth=2), (32, 32), True),
    "timm_registers": (lambda: make_vit(depth=2, reg_tokens=2), (32, 32), True),
    "timm_deit_distilled": (lambda: _timm_small("deit_tiny_distilled_patch16_224"), (32, 32), True),
    "timm_avg_with_class_token": (lambda: make_vit(depth=2, global_pool="avg"), (32, 32), True),
    "timm_avg_registers_no_class_token": (
        lambda: make_vit(depth=2, global_pool="avg", class_token=False, reg_tokens=2, fc_norm=False), (32, 32), True),
    "timm_avg_including_prefix": (lambda: make_vit(depth=2, global_pool="avg", pool_include_prefix=True), (32, 32),
                                  True),
    "timm_qk_norm_scale_norm": (lambda: make_vit(depth=2, qk_norm=True, scale_attn_norm=True), (32, 32), True),
    "timm_non_square": (lambda: make_vit(depth=2, img_size=(32, 48)), (32, 48), True),
    "timm_dynamic_size": (lambda: make_vit(depth=2, dynamic_img_size=True), (40, 24), True),
    "torchvision": (lambda: torchvision_from_timm(timm_vit()), (32, 32), True),
    "hf_vit": (lambda: _hf_pair(hf_vit_from_timm), (32, 32), True),
    "hf_deit_distilled": (lambda: _hf_pair(hf_deit_from_timm, "deit_tiny_distilled_patch16_224"), (32, 32), True),
    "hf_dinov2": (lambda: _hf("Dinov2ForImageClassification", "Dinov2Config", mlp_ratio=2), (32, 32), True),
    "hf_dinov2_registers": (lambda: _hf("Dinov2WithRegistersForImageClassification", "Dinov2WithRegistersConfig",
                                        mlp_ratio=2, num_register_tokens=2), (32, 32), True),
    "timm_beit_relative_position_bias": (lambda: _timm_small("beit_base_patch16_224"), (32, 32), True),
    "timm_beit_shared_bias_no_qkv_bias": (
        lambda: _timm_small("beit_base_patch16_224", use_shared_rel_pos_bias=True, use_rel_pos_bias=False,
                                 qkv_bias=False), (32, 32), True),
    "timm_eva02_rotary": (lambda: _timm_small("eva02_tiny_patch14_224"), (32, 32), True),
    "timm_eva_separate_projections_qk_norm_rotate_half": (
        lambda: _timm_small("eva02_tiny_patch14_224", qkv_fused=False, qk_norm=True, rope_rotate_half=True), (32, 32),
        True),
    "hf_beit_relative_position_bias": (lambda: _hf("BeitForImageClassification", "BeitConfig", use_mean_pooling=True,
                                                   use_relative_position_bias=True), (32, 32), True),
    "hf_beit_shared_bias": (lambda: _hf("BeitForImageClassification", "BeitConfig",
                                        use_shared_relative_position_bias=True), (32, 32), True),
}


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_path_maps_equal_recorded_path_maps(variant):
    build, size, expected_fused = VARIANTS[variant]
    model = build()
    assert uses_fused_path(find_vit(model)) is expected_fused, (
        f"{variant}: expected the {'fused' if expected_fused else 'recorded-attention'} path; a family that keeps "
        "the recorded path must say so in its attach_qkv"
    )
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    for targets in (None, torch.tensor([[0, 3], [2, 1]])):  # K = 1 (predicted class) and K = 2
        for method in METHODS:
            result = lx.explain(model, images, method=method, targets=targets)
            with recorded_path():
                expected = lx.explain(model, images, method=method, targets=targets)
            assert torch.equal(result.targets, expected.targets)
            assert float(expected.raw.abs().max()) > 0
            assert _relative_difference(result.raw, expected.raw) < 1e-5, (variant, method, targets)


def test_fused_path_keeps_the_fused_kernel_and_forms_no_attention_matrix_in_the_graph():
    """The recorded path switches timm's fused_attn off, so its attention dropout sees the T x T probabilities;
    on the fused path the dropout is never called and fused_attn stays on throughout."""
    model = make_vit(depth=2)
    calls, fused_during = [], []
    for block in model.blocks:
        block.attn.attn_drop.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape))
        block.attn.register_forward_pre_hook(lambda m, _a: fused_during.append(m.fused_attn))
    for method in METHODS:
        lx.explain(model, torch.randn(2, 3, 32, 32), method=method, targets=[[0, 1], [2, 3]])
    assert calls == [] and fused_during and all(fused_during)
    with recorded_path():
        lx.explain(model, torch.randn(2, 3, 32, 32), method="gradtoken")
    assert calls  # the comparison path really is the old one


def test_hooks_and_patched_forwards_are_removed_also_on_errors():
    vit = make_vit(depth=2)
    tv = torchvision_from_timm(timm_vit())

    def broken(_):
        raise RuntimeError("boom")

    for model in (vit, tv):
        with pytest.raises(RuntimeError, match="boom"):
            lx.explain(model, torch.randn(1, 3, 32, 32), method="gradtoken", output_transform=broken)
    for block in vit.blocks:
        attn = block.attn
        modules = (attn, attn.qkv, attn.q_norm, attn.k_norm, attn.norm)
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules)
    assert all("forward" not in vars(block.self_attention) for block in tv.encoder.layers)


def test_chunked_readout_rows_equal_one_chunk(monkeypatch):
    """Average pooling reads every patch row: recomputed in chunks of a few rows, the maps are the same."""
    model = make_vit(depth=2, global_pool="avg")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    whole = lx.explain(model, images, method="gradtoken", targets=[[0, 1], [2, 3]])
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 2 * 3 * 17 * 2 * 3)  # B * H * T * K * 3: chunks of 3 rows
    chunked = lx.explain(model, images, method="gradtoken", targets=[[0, 1], [2, 3]])
    assert _relative_difference(chunked.raw, whole.raw) < 1e-6


def test_gradient_checkpointing_and_unknown_families_keep_the_recorded_path():
    model = make_vit(depth=2)
    model.set_grad_checkpointing(True)
    assert not uses_fused_path(model)  # declared in TimmFamily.attach_qkv: the recomputation would record twice
    model.set_grad_checkpointing(False)
    assert uses_fused_path(model)
    assert Family().attach_qkv(model, model.blocks[0], None, None) is False  # a family opts in in its own code


def test_readout_rows_as_a_slice_or_as_an_index_give_the_same_contribution():
    """Consecutive readout rows are read through a slice (a view); any other row set through an index: the
    contribution is the same either way."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 9, 4, generator=gen) for _ in range(3))
    grad = torch.randn(2, 2, 3, 9, 4, generator=gen)
    weights = torch.full((8,), 1 / 8)
    as_slice = fused.readout_contribution_fused(q, k, v, grad, 0.5, [(slice(1, 9), weights)], 1)
    as_index = fused.readout_contribution_fused(q, k, v, grad, 0.5, [(torch.arange(1, 9), weights)], 1)
    assert as_slice.shape == (2, 2, 8) and float(as_slice.abs().max()) > 0
    assert torch.allclose(as_slice, as_index, rtol=1e-6, atol=0)
    geom = geometry(make_vit(depth=1, global_pool="avg"), (32, 32))
    ((rows, row_weights),) = fused.readout_chunks(geom, 1, "cpu")
    assert rows == slice(1, 17) and torch.allclose(row_weights, torch.full((16,), 1 / 16))
