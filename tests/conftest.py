"""Shared fixtures: tiny random timm ViTs for geometry and state tests, and small ViTs trained once per
session on generated data (weights cached in the session's temporary directory)."""

from __future__ import annotations

import os

import pytest
import timm
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def make_vit(
    img_size=(32, 32), patch_size=8, num_classes=5, depth=3, embed_dim=48, num_heads=3, seed=0, **kwargs
) -> torch.nn.Module:
    """A tiny random timm VisionTransformer (no download) in eval mode."""
    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=img_size,
        patch_size=patch_size,
        num_classes=num_classes,
        depth=depth,
        embed_dim=embed_dim,
        num_heads=num_heads,
        **kwargs,
    )
    return model.eval()


@pytest.fixture
def tiny_vit() -> torch.nn.Module:
    return make_vit()
