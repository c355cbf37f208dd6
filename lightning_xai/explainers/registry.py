"""Registry of explainers by name, as timm registers models: ``create_explainer("gradtoken", model)``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from torch import nn

if TYPE_CHECKING:
    from lightning_xai.explainers.base import Explainer

_REGISTRY: dict[str, type[Explainer]] = {}
_ALIASES = {"attention": "raw_attention", "grad_rollout": "gae", "vit_cx": "vitcx", "c2f_explainer": "c2f"}

E = TypeVar("E", bound="type[Explainer]")


def register(cls: E) -> E:
    """Class decorator: make an :class:`Explainer` subclass available under ``cls.name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"explainer name {cls.name!r} is empty or already registered")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Registry names of all explainers."""
    return sorted(_REGISTRY)


def methods_without_class_token() -> list[str]:
    """Methods that work on average-pooled ViTs without a class token."""
    return [name for name, cls in sorted(_REGISTRY.items()) if not cls.requires_class_token]


def get_explainer(name: str) -> type[Explainer]:
    """The explainer class registered under ``name`` (case-insensitive; ``-`` and ``_`` alike)."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a registry name (str), got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available methods: {available_methods()}")
    return _REGISTRY[key]


def create_explainer(name: str, model: nn.Module, **options: Any) -> Explainer:
    """Build the explainer ``name`` for ``model`` with its ``options`` (checked against the method's)."""
    cls = get_explainer(name)
    common = {"vit", "output_transform"}
    unknown = sorted(set(options) - set(cls.option_names()) - common)
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for method {cls.name!r}; its options are {cls.option_names()} "
            f"plus {sorted(common)}"
        )
    return cls(model, **options)
