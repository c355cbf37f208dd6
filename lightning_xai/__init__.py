"""lightning-xai: explain Vision Transformers while they train.

>>> import lightning_xai
>>> result = lightning_xai.explain(model, images, method="gradtoken")   # doctest: +SKIP
"""

from lightning_xai.explainers import (
    Explainer,
    Explanation,
    available_methods,
    create_explainer,
    get_explainer,
    register,
    unregister,
)
from lightning_xai.functional import explain
from lightning_xai.shortcut import check_shortcut

__version__ = "0.1.0"

__all__ = [
    "Explainer",
    "Explanation",
    "available_methods",
    "check_shortcut",
    "create_explainer",
    "explain",
    "get_explainer",
    "register",
    "unregister",
]
