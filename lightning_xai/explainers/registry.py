"""Registry of explainers by name, as timm registers models: ``create_explainer("gradtoken", model)``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


def unregister(name: str) -> None:
    """Remove the explainer registered under ``name`` (e.g. a method registered by a test or a plug-in)."""
    if name not in _REGISTRY:
        raise ValueError(f"no explainer registered under {name!r}; registered: {available_methods()}")
    del _REGISTRY[name]


def methods_without_readout() -> list[str]:
    """Methods that do not read the readout rows, so work whatever the head's pooling (attention pooling too)."""
    return [name for name, cls in sorted(_REGISTRY.items()) if not cls.needs_readout]


def get_explainer(name: str) -> type[Explainer]:
    """The explainer class registered under ``name`` (case-insensitive; ``-`` and ``_`` alike)."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a registry name (str), got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available methods: {available_methods()}")
    return _REGISTRY[key]


def resolve_methods(methods: Any) -> dict[str, dict[str, Any]]:
    """Parse a ``methods`` argument into ``{registry name: checked options}``, without a model.

    Args:
        methods: a registry name, a non-empty list of names, or ``{name: {option: value}}``.

    Raises:
        ValueError: an unknown method, an unknown option or a bad option value (see
            :meth:`Explainer.check_options`), or a ``methods`` of the wrong form.
    """
    if isinstance(methods, str):
        methods = [methods]
    if isinstance(methods, Mapping) and methods:
        items = [(name, options or {}) for name, options in methods.items()]
    elif isinstance(methods, Sequence) and methods and all(isinstance(name, str) for name in methods):
        items = [(name, {}) for name in methods]
    else:
        raise ValueError(
            f"methods must be a method name, a non-empty list of names or a {{name: {{option: value}}}} dict, "
            f"got {methods!r}; available methods: {available_methods()}"
        )
    resolved: dict[str, dict[str, Any]] = {}
    for name, options in items:
        cls = get_explainer(name)
        if not isinstance(options, Mapping):
            raise ValueError(f"the options of method {name!r} must be a dict {{option: value}}, got {options!r}")
        if cls.name in resolved:
            raise ValueError(f"method {cls.name!r} is given twice in methods={methods!r}")
        resolved[cls.name] = cls.check_options(options)
    return resolved


def create_explainer(name: str, model: nn.Module, **options: Any) -> Explainer:
    """Build the explainer ``name`` for ``model`` with its ``options`` (checked by the method's
    :meth:`~Explainer.check_options`) plus the common ``vit``, ``output_transform`` and ``forward``."""
    cls = get_explainer(name)
    common = {key: options.pop(key) for key in cls.COMMON_OPTIONS if key in options}
    return cls(model, **cls.check_options(options), **common)
