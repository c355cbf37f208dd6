"""Explainers for Vision Transformers, one small class per method on one base class, by registry name."""

from lightning_xai.explainers.attention import AttentionRollout, RawAttention
from lightning_xai.explainers.base import Explainer, Explanation
from lightning_xai.explainers.gradient import GradientRollout, GradToken
from lightning_xai.explainers.perturbation import C2FExplainer, NoPositiveMaskWarning, ViTCX
from lightning_xai.explainers.registry import available_methods, create_explainer, get_explainer, register

__all__ = [
    "AttentionRollout",
    "C2FExplainer",
    "Explainer",
    "Explanation",
    "GradToken",
    "GradientRollout",
    "NoPositiveMaskWarning",
    "RawAttention",
    "ViTCX",
    "available_methods",
    "create_explainer",
    "get_explainer",
    "register",
]
