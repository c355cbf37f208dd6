"""Tiny models of every supported family built offline, and weight conversion from timm to torchvision and
Hugging Face, so the same weights can be explained through every adapter."""

from __future__ import annotations

import timm
import torch
from torch import nn

WIDTH, HEADS, DEPTH, MLP, CLASSES, SIZE, PATCH = 32, 2, 2, 64, 4, 32, 8


def timm_vit(seed: int = 0, **kwargs) -> nn.Module:
    """A tiny timm ViT with the torchvision/HF-compatible layout (LayerNorm eps 1e-6, exact GELU)."""
    torch.manual_seed(seed)
    name = kwargs.pop("model_name", "vit_tiny_patch16_224")
    model = timm.create_model(
        name, pretrained=False, img_size=SIZE, patch_size=PATCH, depth=DEPTH, embed_dim=WIDTH, num_heads=HEADS,
        mlp_ratio=MLP / WIDTH, num_classes=CLASSES, **kwargs,
    )
    with torch.no_grad():  # random, non-trivial norms and embeddings so every parameter matters
        for name_, param in model.named_parameters():
            if "norm" in name_ and name_.endswith("weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            elif name_.endswith("bias") or "token" in name_ or "pos_embed" in name_:
                param.copy_(0.1 * torch.randn_like(param))
    return model.eval()


def torchvision_from_timm(source: nn.Module) -> nn.Module:
    """torchvision ``VisionTransformer`` holding ``source``'s weights (qkv stays fused: MHA's in_proj)."""
    import torchvision

    model = torchvision.models.VisionTransformer(
        image_size=SIZE, patch_size=PATCH, num_layers=DEPTH, num_heads=HEADS, hidden_dim=WIDTH, mlp_dim=MLP,
        num_classes=CLASSES,
    )
    s = source.state_dict()
    state = {
        "class_token": s["cls_token"], "conv_proj.weight": s["patch_embed.proj.weight"],
        "conv_proj.bias": s["patch_embed.proj.bias"], "encoder.pos_embedding": s["pos_embed"],
        "encoder.ln.weight": s["norm.weight"], "encoder.ln.bias": s["norm.bias"],
        "heads.head.weight": s["head.weight"], "heads.head.bias": s["head.bias"],
    }
    for i in range(DEPTH):
        tv, tm = f"encoder.layers.encoder_layer_{i}", f"blocks.{i}"
        state[f"{tv}.self_attention.in_proj_weight"] = s[f"{tm}.attn.qkv.weight"]  # both (3D, D): q, k, v stacked
        state[f"{tv}.self_attention.in_proj_bias"] = s[f"{tm}.attn.qkv.bias"]
        for tv_name, tm_name in (("ln_1", "norm1"), ("ln_2", "norm2"), ("self_attention.out_proj", "attn.proj"),
                                 ("mlp.0", "mlp.fc1"), ("mlp.3", "mlp.fc2")):
            for p in ("weight", "bias"):
                state[f"{tv}.{tv_name}.{p}"] = s[f"{tm}.{tm_name}.{p}"]
    model.load_state_dict(state)
    return model.eval()


def hf_config(cls_name: str = "ViTConfig", **kwargs):
    import transformers

    return getattr(transformers, cls_name)(
        image_size=SIZE, patch_size=PATCH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, hidden_size=WIDTH,
        intermediate_size=MLP, num_labels=CLASSES, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True,
        **kwargs,
    )


def _hf_blocks(state: dict, s: dict, prefix: str) -> None:
    """timm blocks into Hugging Face ViT/DeiT layers, with transformers 5's parameter names (``layers.i``,
    ``attention.q_proj``, ``mlp.fc1``; transformers 4 named them ``encoder.layer.i.attention.attention.query``...)."""
    for i in range(DEPTH):
        q, k, v = s[f"blocks.{i}.attn.qkv.weight"].chunk(3)
        qb, kb, vb = s[f"blocks.{i}.attn.qkv.bias"].chunk(3)
        layer = f"{prefix}.layers.{i}"
        state.update({
            f"{layer}.attention.q_proj.weight": q, f"{layer}.attention.q_proj.bias": qb,
            f"{layer}.attention.k_proj.weight": k, f"{layer}.attention.k_proj.bias": kb,
            f"{layer}.attention.v_proj.weight": v, f"{layer}.attention.v_proj.bias": vb,
        })
        for hf, tm in (("attention.o_proj", "attn.proj"), ("layernorm_before", "norm1"),
                       ("layernorm_after", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            for p in ("weight", "bias"):
                state[f"{layer}.{hf}.{p}"] = s[f"blocks.{i}.{tm}.{p}"]


def hf_vit_from_timm(source: nn.Module) -> nn.Module:
    """Hugging Face ``ViTForImageClassification`` holding ``source``'s weights (qkv split into q/k/v)."""
    import transformers

    model = transformers.ViTForImageClassification(hf_config())
    s = source.state_dict()
    state = {
        "vit.embeddings.cls_token": s["cls_token"], "vit.embeddings.position_embeddings": s["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": s["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": s["patch_embed.proj.bias"],
        "vit.layernorm.weight": s["norm.weight"], "vit.layernorm.bias": s["norm.bias"],
        "classifier.weight": s["head.weight"], "classifier.bias": s["head.bias"],
    }
    _hf_blocks(state, s, "vit")
    model.load_state_dict(state)
    return model.eval()


def hf_deit_from_timm(source: nn.Module) -> nn.Module:
    """Hugging Face ``DeiTForImageClassificationWithTeacher`` holding a timm distilled DeiT's weights."""
    import transformers

    model = transformers.DeiTForImageClassificationWithTeacher(hf_config("DeiTConfig"))
    s = source.state_dict()
    state = {
        "deit.embeddings.cls_token": s["cls_token"], "deit.embeddings.distillation_token": s["dist_token"],
        "deit.embeddings.position_embeddings": s["pos_embed"],
        "deit.embeddings.patch_embeddings.projection.weight": s["patch_embed.proj.weight"],
        "deit.embeddings.patch_embeddings.projection.bias": s["patch_embed.proj.bias"],
        "deit.layernorm.weight": s["norm.weight"], "deit.layernorm.bias": s["norm.bias"],
        "cls_classifier.weight": s["head.weight"], "cls_classifier.bias": s["head.bias"],
        "distillation_classifier.weight": s["head_dist.weight"], "distillation_classifier.bias": s["head_dist.bias"],
    }
    _hf_blocks(state, s, "deit")
    model.load_state_dict(state)
    return model.eval()


class PixelValues(nn.Module):
    """A Hugging Face classifier called as users' LightningModules do: ``model(pixel_values=x).logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits
