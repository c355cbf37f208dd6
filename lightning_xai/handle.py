"""How the library runs a user's model: the module, the ViT inside it, how to call it and how to read logits.

Explainers and the callbacks both go through one :class:`ModelHandle`, so a model whose forward takes a dict,
returns ``(features, logits)``, runs in another dtype, or changes its input before the ViT (a channel adapter,
a resize, a conv stem) is handled the same way everywhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai import tasks
from lightning_xai.adapters import (
    Geometry,
    OutputTransform,
    ViTLocator,
    find_vit,
    geometry,
    in_channels,
    observe_input,
    observed_geometry,
    unwrap_compiled,
    without_checkpointing,
)
from lightning_xai.validation import to_logits

#: ``forward(model, images) -> output``: how to call a module whose forward does not take an image tensor,
#: e.g. ``lambda module, x: module(pixel_values=x)``.
ForwardFn = Callable[[nn.Module, Tensor], Any] | None


class ModelHandle:
    """A user's model as the library runs it.

    A ``torch.compile``d model is run through its original module (``_orig_mod``), and compiled submodules
    (also modules compiled in place, and a LightningModule whose forward Lightning compiled for
    ``trainer.fit(torch.compile(model))``) run their original forwards in :meth:`output` (see
    :meth:`uncompiled`): the explainers' hooks must see every forward, and compiled graphs do not run module
    hooks registered after compilation. Training keeps the compiled modules.

    Args:
        model: the module whose output logits are explained (a ViT, or a LightningModule holding one).
        vit: where the ViT is inside ``model`` (see :func:`lightning_xai.adapters.find_vit`).
        output_transform: turns the forward's output into logits ``(B, num_classes)``.
        forward: ``forward(model, images) -> output``; default ``model(images)``.
        task: what the logits mean (:mod:`lightning_xai.tasks`): ``"auto"`` (one logit: binary, otherwise
            multiclass; resolved at the first forward), ``"multiclass"``, ``"binary"`` or ``"multilabel"``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        vit: ViTLocator = None,
        output_transform: OutputTransform = None,
        forward: ForwardFn = None,
        task: str = "auto",
    ) -> None:
        if forward is not None and not callable(forward):
            raise TypeError(f"forward must be a callable (module, images) -> output, got {type(forward).__name__}")
        if output_transform is not None and not callable(output_transform):
            raise TypeError(
                f"output_transform must be a callable output -> logits, got {type(output_transform).__name__}"
            )
        self.model = unwrap_compiled(model)
        self.vit = find_vit(self.model, vit)
        if any(p.is_meta for p in self.vit.parameters()):
            raise ValueError("the ViT's parameters are on the meta device (never materialised): load or initialise "
                             "its weights (e.g. in configure_model, or with model.to_empty(device=...) and a "
                             "state dict) before explaining")
        self.output_transform = output_transform
        self.forward = forward
        self._geometries: dict[tuple[int, ...], Geometry] = {}
        self._uncompiled = False  # inside uncompiled()
        self.task = tasks.check_task(task)

    def _compiled_parts(self) -> tuple[list, list, list]:
        """The model's compiled parts: ``OptimizedModule`` children ``(parent, name, child)``, modules compiled in
        place ``(module, compiled call)`` and Lightning's in-place compiled forwards ``(module, forward)``.

        Found afresh at every call, in one walk of the module tree: the user may compile a submodule in place or
        swap one for its compiled version between calls, which nothing cheaper than the walk would notice."""
        modules = list(self.model.modules())
        swapped = [(parent, name, child) for parent in modules for name, child in parent.named_children()
                   if type(child).__name__ == "OptimizedModule"]
        in_place = [(m, m._compiled_call_impl) for m in modules if getattr(m, "_compiled_call_impl", None) is not None]
        # trainer.fit(torch.compile(module)): Lightning unwraps the module and compiles its forward in place
        # (an instance attribute), keeping the original in module._compiler_ctx; "forward" in vars(m) is asked
        # first, as it is cheap and almost never true, where a missing _compiler_ctx costs an AttributeError
        lightning = [(m, vars(m)["forward"]) for m in modules
                     if "forward" in vars(m) and isinstance(getattr(m, "_compiler_ctx", None), dict)]
        return swapped, in_place, lightning

    @property
    def compiled(self) -> bool:
        """Whether any part of the model runs ``torch.compile``d code in training."""
        return any(self._compiled_parts())

    @contextlib.contextmanager
    def uncompiled(self) -> Iterator[None]:
        """Within the context, every ``torch.compile``d submodule of the model is replaced by its original
        module; the compiled ones are put back on exit (also on errors). Nested in another ``uncompiled`` of this
        handle (the forwards of an explanation, inside :meth:`explaining`) it does nothing: the outer one has
        already swapped every compiled part out."""
        if self._uncompiled:
            yield
            return
        swapped, in_place, lightning = self._compiled_parts()
        self._uncompiled = True
        try:
            for parent, name, child in swapped:
                setattr(parent, name, unwrap_compiled(child))
            for module, _ in in_place:
                module._compiled_call_impl = None
            for module, _ in lightning:
                module.forward = module._compiler_ctx["original_forward"]
            yield
        finally:
            self._uncompiled = False
            for parent, name, child in swapped:
                setattr(parent, name, child)
            for module, compiled in in_place:
                module._compiled_call_impl = compiled
            for module, compiled in lightning:
                module.forward = compiled

    @contextlib.contextmanager
    def explaining(self) -> Iterator[None]:
        """The model as the explainers run it: original (uncompiled) modules, the ViT's gradient checkpointing
        off (see :func:`~lightning_xai.adapters.without_checkpointing`); all restored on exit."""
        with self.uncompiled(), without_checkpointing(self.vit):
            yield

    def geometry(self, images: Tensor) -> Geometry:
        """The ViT's token geometry for ``images`` ``(B, C, H, W)`` (prepared), mapped onto the images.

        One forward of the first image (inside :meth:`explaining` and without gradients; call it with the model
        in eval mode) records what the ViT receives: the module may change its input first (repeat a grayscale
        channel, a 1x1 conv adapter, a resize, a conv stem; a timm hybrid's stem). The patch grid comes from that,
        and maps are upsampled to ``(H, W)``. Cached per image shape.

        Raises:
            the module's own error when it rejects the images, with a hint (see :func:`forward_error`).
        """
        key = tuple(images.shape[1:])
        if key not in self._geometries:
            with self.explaining(), observe_input(self.vit) as seen, torch.no_grad():
                try:
                    self.output(images[:1])
                except Exception as err:
                    if self.model is self.vit and self.forward is None:
                        geometry(self.vit, key[-2:])  # the images went straight in: the family's own message
                    raise forward_error(err, self.model, self.forward, self.vit, tuple(images.shape)) from err
            if len(seen.get("tokens", ())) != 3:
                raise ValueError(
                    f"the forward of {type(self.model).__name__} did not run the blocks of the ViT "
                    f"({type(self.vit).__name__}), so there are no tokens to explain: pass vit= the ViT the forward "
                    "runs"
                )
            # a forward that calls vit.forward_features(x) skips the ViT's own hooks: then it took the images
            size = seen["input"][-2:] if len(seen.get("input", ())) == 4 else key[-2:]
            self._geometries[key] = observed_geometry(self.vit, size, seen["tokens"][1], key[-2:])
        return self._geometries[key]

    @property
    def parameter(self) -> Tensor:
        """A parameter of the ViT: its device and dtype are the ones inputs are cast to."""
        return next(self.vit.parameters())

    def prepare(self, images: Tensor) -> Tensor:
        """A detached copy of ``images`` ``(B, C, H, W)`` on the ViT's device, in its dtype."""
        param = self.parameter
        return images.detach().clone().to(device=param.device, dtype=param.dtype)

    def output(self, images: Tensor) -> Any:
        """The model's raw forward output for ``images`` (already prepared), through the original (not compiled)
        modules: the explainers' hooks must fire, and the probes' shapes and modes must not re-trace the user's
        compiled graph (a recompilation per event with inductor)."""
        with self.uncompiled():
            return self.model(images) if self.forward is None else self.forward(self.model, images)

    def logits(self, images: Tensor) -> Tensor:
        """The class scores ``(B, num_classes)`` in float32 of the model's output for prepared ``images``: its
        logits, or ``[-z, z]`` for a one-logit binary head (see :func:`lightning_xai.tasks.scores`)."""
        logits = to_logits(self.output(images), self.output_transform).float()
        if self.task == "auto":
            self.task = tasks.resolve_task("auto", logits.shape[-1])
        return tasks.scores(logits, self.task)

    def probabilities(self, scores: Tensor) -> Tensor:
        """Probabilities ``(B, num_classes)`` of class ``scores`` from :meth:`logits` (softmax for multiclass,
        sigmoid for binary and multilabel)."""
        return tasks.probabilities(scores, self.task)

    def log_probabilities(self, scores: Tensor) -> Tensor:
        """``log`` of :meth:`probabilities` (``log_softmax`` or ``logsigmoid``)."""
        return tasks.log_probabilities(scores, self.task)

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """Float32 logits ``(B, num_classes)`` without a graph; ``images`` are prepared here."""
        return self.logits(self.prepare(images))


def forward_error(err: Exception, module: nn.Module, forward: ForwardFn, vit: nn.Module | None = None,
                  shape: tuple[int, ...] | None = None, what: str = "images") -> Exception:
    """The error of a forward that rejected the images: the module's own error message, short, after a hint of
    what to check. A ``ValueError`` when the images would not fit the ViT as given (its channels, its size: the
    likely cause, named in the hint), else the module's own error type where it can be built from a message. A
    message that quotes a whole module (Python's ``f(**x)`` error quotes the callable's repr) is cut to its first
    and last lines."""
    how = "forward(module, images)" if forward is not None else f"{type(module).__name__}.forward(images)"
    if forward is not None:
        hint = "check forward="
    else:
        hint = ("pass images as the module takes them in training; if its forward does not take an image tensor, "
                "pass forward=lambda module, images: module(...)")
    reasons = []
    if vit is not None and shape is not None and len(shape) == 4:  # what fails if the images reach the ViT as given
        channels = in_channels(vit)
        if channels is not None and shape[1] != channels:
            reasons.append(f"they have {shape[1]} channels but its patch embedding takes {channels}")
        try:
            geometry(vit, shape[-2:])
        except ValueError as size_error:
            reasons.append(str(size_error).rstrip("."))
        if reasons:
            hint += f" (if the images reach the ViT unchanged: {'; '.join(reasons)})"
    lines = [line for line in str(err).splitlines() if line.strip()]
    text = lines[0] if len(lines) <= 1 else f"{lines[0].strip()} ... {lines[-1].strip()}"
    text = text if len(text) <= 300 else f"{text[:150]} ... {text[-150:]}"
    given = f" (shape {shape})" if shape is not None else ""
    message = f"calling {how} on the {what} failed{given}: {hint}. The error was {type(err).__name__}: {text}"
    if reasons:
        return ValueError(message)
    try:
        return type(err)(message)
    except Exception:  # noqa: BLE001 - an exception type with another constructor
        return RuntimeError(message)
