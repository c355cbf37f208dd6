"""The base class every explainer subclasses, the result it returns, and the pass they all share.

An explainer subclass implements one method, :meth:`Explainer.compute`, that receives a prepared input
(validated, detached, on the model's device and dtype, inside ``enable_grad`` with the model in eval mode)
and returns raw maps. The base class does everything around it: input checks, model-state
preservation, target resolution, upsampling to the input resolution and normalisation.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_xai.adapters import Capture, Geometry, OutputTransform, ViTLocator, capture, family_of, readout
from lightning_xai.explainers.registry import methods_without_readout
from lightning_xai.handle import ForwardFn, ModelHandle
from lightning_xai.validation import check_images, resolve_targets


@dataclass
class Explanation:
    """What an explainer returns for a batch of ``B`` images and ``K`` targets per image.

    Attributes:
        method: registry name of the method.
        maps: ``(B, K, H, W)`` float32, per-map min-max normalised to ``[0, 1]``.
        raw: ``(B, K, H, W)`` float32, the same maps before normalisation (strength comparable across
            epochs and images).
        targets: ``(B, K)`` int64 class indices explained.
        probs: ``(B, K)`` float32 probability of each target on the clean image (softmax; sigmoid for binary
            and multi-label tasks).
        options: the method's options as used.
        patch_maps: ``(B, K, h, w)`` raw patch-level maps for patch-level methods, else ``None``.
        coarse: C2F only: ``(B, K, H, W)`` normalised coarse (S3WM) map.
        fine: C2F only: ``(B, K, H, W)`` normalised fine (AF) map, equal to ``maps``.
        evaluations: perturbation methods only: ``(B,)`` model evaluations spent per image.
    """

    method: str
    maps: Tensor
    raw: Tensor
    targets: Tensor
    probs: Tensor
    options: dict[str, Any] = field(default_factory=dict)
    patch_maps: Tensor | None = None
    coarse: Tensor | None = None
    fine: Tensor | None = None
    evaluations: Tensor | None = None

    @property
    def evaluations_per_image(self) -> float | None:
        """Mean number of model evaluations per image, or ``None`` for methods that do one pass."""
        return None if self.evaluations is None else float(self.evaluations.float().mean())


@dataclass
class RawMaps:
    """What :meth:`Explainer.compute` returns.

    Attributes:
        maps: ``(B, K, h, w)`` (patch level) or ``(B, K, H, W)`` (pixel level), any dtype.
        targets: ``(B, K)`` int64.
        probs: ``(B, K)``.
        extras: extra :class:`Explanation` fields (``coarse``, ``fine``, ``evaluations``).
    """

    maps: Tensor
    targets: Tensor
    probs: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)


def minmax(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Min-max normalise each map over its last two dims: ``(..., H, W) -> (..., H, W)`` in ``[0, 1]``.

    A constant map becomes all zeros.
    """
    flat = maps.flatten(-2)
    low = flat.amin(-1, keepdim=True)
    span = flat.amax(-1, keepdim=True) - low
    out = torch.where(span > eps, (flat - low) / span.clamp_min(eps), torch.zeros_like(flat))
    return out.view_as(maps)


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling (``align_corners=False``) of ``(B, K, h, w)`` to ``(B, K, H, W)``."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


@contextlib.contextmanager
def explanation_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode with gradients enabled (also inside ``inference_mode``); restore on exit.

    Every submodule's ``training`` flag is restored individually, so a model with a frozen, eval-mode
    backbone inside a training-mode wrapper comes back exactly as it was. ``requires_grad`` flags and
    ``param.grad`` are never written by explainers (gradients are taken with ``torch.autograd.grad`` with
    respect to captured activations only).
    """
    modules = list(model.modules())
    modes = [m.training for m in modules]
    try:
        _eval(model, modules)
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for module, training in zip(modules, modes, strict=True):
            if module.training is not training:
                module.training = training


def _eval(model: nn.Module, modules: list[nn.Module]) -> None:
    """``model.eval()``, given ``modules = list(model.modules())``. Where neither ``model.eval`` nor any module's
    ``train`` is overridden, that call sets ``training = False`` on each of them (``Module.train`` recurses into the
    children), which is done here directly on those still training: ~0.1 ms on ViT-Tiny against ~0.6 ms for the
    recursion. Otherwise ``model.eval()`` is called, so that an override runs as it would."""
    if _overrides_mode(model, modules):
        model.eval()
        return
    for module in modules:
        if module.training is not False:
            module.training = False


def _overrides_mode(model: nn.Module, modules: list[nn.Module]) -> bool:
    """Whether ``model.eval`` or the ``train`` of any of ``modules`` is not ``nn.Module``'s own."""
    if type(model).eval is not nn.Module.eval or "eval" in vars(model):
        return True
    plain: set[type] = set()  # classes seen that keep Module.train
    for module in modules:
        cls = type(module)
        if cls not in plain:
            if cls.train is not nn.Module.train:
                return True
            plain.add(cls)
        if "train" in vars(module):
            return True
    return False


#: per explainer class, its option names and what they were read from (see :meth:`Explainer.option_names`)
_OPTION_NAMES: weakref.WeakKeyDictionary[type, tuple[tuple, tuple[str, ...]]] = weakref.WeakKeyDictionary()


class Explainer:
    """One base class for all methods; subclasses set ``name`` and implement :meth:`compute`.

    Args:
        model: the module whose output logits are explained: a ViT of a supported family (timm, torchvision,
            Hugging Face) or any module (a LightningModule) that contains one; a ``torch.compile``d module is
            explained through its original module.
        vit: where the ViT is inside ``model`` when automatic search is not enough: the module, an
            attribute path (``"model.backbone"``) or a callable ``model -> vit``.
        output_transform: turns ``model(images)`` into logits ``(B, num_classes)`` when the forward returns a
            tuple, a dict or an object; default takes tensors as they are, the first element of a
            tuple/list and the ``"logits"`` entry of a dict.
        forward: ``forward(model, images) -> output`` for a module whose forward does not take an image
            tensor (e.g. ``lambda m, x: m(pixel_values=x)``); default ``model(images)``.
        task: what the logits mean: ``"auto"`` (one logit: binary, otherwise multiclass), ``"multiclass"``,
            ``"binary"`` (one logit ``z``: class 1 scores ``z``, class 0 ``-z``) or ``"multilabel"`` (sigmoid per
            class); see :mod:`lightning_xai.tasks`.
    """

    name: ClassVar[str] = ""
    #: whether the method reads the attention rows of the tokens the head reads (METHODS.md, "The readout
    #: rows"); such a method cannot explain a pooling that no attention row expresses (attention pooling)
    needs_readout: ClassVar[bool] = False
    #: whether one explanation costs one forward and at most one backward of the batch (gradient and attention
    #: methods, not the masked-forward ones): the callback's shortcut alarm then also explains its labelled references
    #: with it, as more donors for the stamped-carrier check
    single_pass: ClassVar[bool] = False
    #: keyword arguments every explainer takes besides its method-specific options
    COMMON_OPTIONS: ClassVar[tuple[str, ...]] = ("vit", "output_transform", "forward", "task")

    def __init__(
        self,
        model: nn.Module,
        *,
        vit: ViTLocator = None,
        output_transform: OutputTransform = None,
        forward: ForwardFn = None,
        task: str = "auto",
    ):
        self.handle = ModelHandle(model, vit=vit, output_transform=output_transform, forward=forward, task=task)
        self.model = self.handle.model
        self.vit = self.handle.vit
        self.output_transform = output_transform
        self.readout = readout(self.vit)
        if self.needs_readout and not self.readout.expressible:
            family = family_of(self.vit).name
            raise ValueError(
                f"{self.name} reads the attention rows of the tokens the head reads, but this {family} "
                f"({type(self.vit).__name__}) pools with {self.readout.pooling}, which no attention row expresses. "
                f"Methods that work for it: {methods_without_readout()}; or build the model with a class-token or "
                "average pooling head (timm: global_pool='token' or 'avg')."
            )

    # -- options --------------------------------------------------------------------------------------
    @classmethod
    def option_names(cls) -> list[str]:
        """The method-specific keyword options its constructor accepts.

        Read from the constructors' signatures once per class (every explanation records its options, and
        ``inspect.signature`` costs ~0.5 ms), and read again when a constructor in the class's MRO or its
        ``COMMON_OPTIONS`` is not the one they were read from."""
        key = (cls.COMMON_OPTIONS, *(vars(klass).get("__init__") for klass in cls.__mro__))
        cached = _OPTION_NAMES.get(cls)
        if cached is None or cached[0] != key:
            cached = _OPTION_NAMES[cls] = (key, cls._read_option_names())
        return list(cached[1])

    @classmethod
    def _read_option_names(cls) -> tuple[str, ...]:
        """:meth:`option_names` read from the signatures of the constructors in the MRO."""
        base = {"self", "model", *cls.COMMON_OPTIONS}
        names: list[str] = []
        for klass in cls.__mro__:  # subclasses first, then the options they pass on through **kwargs
            if klass is Explainer or "__init__" not in vars(klass):
                continue
            for p, v in inspect.signature(klass.__init__).parameters.items():
                if p not in base and p not in names and v.kind is inspect.Parameter.KEYWORD_ONLY:
                    names.append(p)
        return tuple(names)

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Check the method-specific ``options`` without a model and return them normalised.

        Subclasses override this to check their own values (calling ``super().check_options`` first) and
        call it from ``__init__``; only checks that need the model (a block index against the depth) stay in
        ``__init__``. The callbacks call it when they are built, so a bad value fails before training starts.

        Raises:
            ValueError: an unknown option name, or a value the method does not accept; the message names the
                option and what it accepts.
        """
        unknown = sorted(set(options) - set(cls.option_names()))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for method {cls.name!r}; its options are {cls.option_names()} "
                f"plus {list(cls.COMMON_OPTIONS)}"
            )
        return dict(options)

    def options(self) -> dict[str, Any]:
        """The method's options as set on this instance (stored in every :class:`Explanation`)."""
        return {name: getattr(self, name) for name in self.option_names()}

    # -- the shared pass ------------------------------------------------------------------------------
    def __call__(self, images: Tensor, targets: Any = None) -> Explanation:
        """Explain ``images`` ``(B, C, H, W)`` for ``targets``.

        Args:
            images: a batch of input images in the model's input space (already normalised).
            targets: ``None`` (predicted class), an int, a ``(B,)`` tensor/sequence, or ``(B, K)`` for
                ``K`` targets per image.

        Returns:
            an :class:`Explanation` with ``maps`` ``(B, K, H, W)``.
        """
        check_images(images, self.vit if self.model is self.vit else None)
        with explanation_mode(self.model), self.handle.explaining():
            x = self.handle.prepare(images)
            geom = self.handle.geometry(x)  # what the ViT receives, mapped onto the images
            if isinstance(targets, Tensor):  # may be an inference tensor (trainer.validate); autograd saves it
                targets = targets.detach().clone()
            out = self.compute(x, targets, geom)
        return self._finish(out, geom)

    def _finish(self, out: RawMaps, geom: Geometry) -> Explanation:
        raw = out.maps.detach().float()
        patch = raw if tuple(raw.shape[-2:]) == geom.grid else None
        raw = upsample(raw, geom.image_size)
        extras = {k: v.detach().float() for k, v in out.extras.items()}
        return Explanation(
            method=self.name,
            maps=minmax(raw),
            raw=raw,
            targets=out.targets.detach(),
            probs=out.probs.detach().float(),
            options=self.options(),
            patch_maps=patch,
            **extras,
        )

    def compute(self, x: Tensor, targets: Any, geom: Geometry) -> RawMaps:
        """Subclasses: raw maps for the prepared input ``x`` ``(B, C, H, W)``."""
        raise NotImplementedError

    # -- helpers for subclasses -----------------------------------------------------------------------
    def logits(self, x: Tensor) -> Tensor:
        """The whole model's class scores ``(B, num_classes)`` in float32 (see :meth:`ModelHandle.logits`)."""
        return self.handle.logits(x)

    def forward_captured(
        self, x: Tensor, what: tuple[str, ...], targets: Any, blocks: list[int] | None = None
    ) -> tuple[Tensor, Capture, Tensor, Tensor]:
        """One forward recording ``what``; returns ``(logits (B, C), capture, targets (B, K), probs (B, K))``."""
        with capture(self.vit, what, blocks) as record:
            logits = self.logits(x)
        resolved = resolve_targets(targets, logits)
        probs = self.handle.probabilities(logits).gather(1, resolved)
        return logits, record, resolved, probs

    def attention_gradients(
        self, x: Tensor, targets: Any, objective: str = "logit", blocks: list[int] | None = None
    ) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
        """Attention probabilities and the gradients of the target score with respect to them.

        One forward; one backward for ``K = 1``, or one batched vector-Jacobian product for ``K > 1``.

        Returns:
            ``(attn, grads, targets, probs)``: ``attn[l]`` ``(B, H, T, T)``; ``grads[l]`` ``(B, K, H, T, T)``
            (``grads[l][:, k]`` is ``d sum_b score[b, targets[b, k]] / dA^l``); targets ``(B, K)``;
            probs ``(B, K)``.
        """
        x = x.requires_grad_(True)
        logits, record, resolved, probs = self.forward_captured(x, ("attn",), targets, blocks)
        grads = self.target_gradients(logits, resolved, record.attn, objective)
        attn = [a.detach().float() for a in record.attn]
        return attn, [g.float() for g in grads], resolved, probs.detach()

    def target_gradients(
        self, logits: Tensor, targets: Tensor, inputs: list[Tensor], objective: str = "logit"
    ) -> list[Tensor]:
        """Gradients of each target's score with respect to ``inputs`` (tensors of the graph of ``logits``).

        One backward for ``K = 1``, one batched vector-Jacobian product for ``K > 1``.

        Args:
            logits: ``(B, C)``.
            targets: ``(B, K)`` class indices.
            inputs: tensors ``(B, ...)`` the logits depend on.
            objective: ``"logit"`` or ``"log_softmax"``: the score differentiated (the log-probability of the
                handle's task: ``log_softmax``, or ``logsigmoid`` for binary and multi-label heads).

        Returns:
            one ``(B, K, ...)`` tensor per input: ``[:, k]`` is ``d sum_b score[b, targets[b, k]] / d input``.
        """
        score = logits if objective == "logit" else self.handle.log_probabilities(logits)
        onehot = F.one_hot(targets, score.shape[-1]).to(score.dtype).permute(1, 0, 2)  # (K, B, C)
        if onehot.shape[0] == 1:
            grads = torch.autograd.grad(score, inputs, grad_outputs=onehot[0])
            return [g.unsqueeze(1) for g in grads]
        return _batched_vjp(score, inputs, onehot)


def _batched_vjp(score: Tensor, inputs: list[Tensor], onehot: Tensor) -> list[Tensor]:
    """Gradients of ``K`` target scores at once: ``onehot`` ``(K, B, C)`` -> list of ``(B, K, ...)``."""
    try:
        grads = torch.autograd.grad(
            score, inputs, grad_outputs=onehot, is_grads_batched=True, retain_graph=True
        )
    except RuntimeError:  # an op without a batching rule: fall back to one backward per target
        grads = [
            torch.stack(parts)
            for parts in zip(
                *(torch.autograd.grad(score, inputs, grad_outputs=o, retain_graph=True) for o in onehot),
                strict=True,
            )
        ]
    return [g.transpose(0, 1) for g in grads]
