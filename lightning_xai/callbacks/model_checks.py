"""Checks of the user's module and Trainer that need the built model: which ViT the forward runs, whether it runs
with gradients, whether the strategy shards the model, whether a validation loop runs at all. Each raises
before the first epoch with a message naming the cause and the fix."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn

from lightning_xai.adapters import capture, find_vit
from lightning_xai.callbacks.rng import preserved_rng
from lightning_xai.explainers import Explainer
from lightning_xai.explainers.base import explanation_mode


def candidate_vits(module: nn.Module) -> dict[str, nn.Module]:
    """Every supported ViT inside ``module`` that no other one contains (a ViT's own parts, or the backbone of a
    Hugging Face classifier, are not candidates beside it), by qualified name (``""`` for the module itself);
    ``torch.compile``d ones unwrapped."""
    found: dict[str, nn.Module] = {}
    for name, sub in module.named_modules():
        try:
            vit = find_vit(sub, sub)
        except TypeError:
            continue
        if not any(vit is seen or any(vit is m for m in seen.modules()) for seen in found.values()):
            found[name.removesuffix("._orig_mod")] = vit
    return found


def choose_vit(module: nn.Module, candidates: Mapping[str, nn.Module], logits_of: Callable[[], Tensor]) -> nn.Module:
    """The one of several ViTs (an EMA or teacher copy beside the trained one) whose output the forward uses.

    Runs ``logits_of()`` (one forward, inputs requiring grad) with a forward hook on every candidate and keeps
    those that ran *and* whose output is in the graph of the logits. Says which one was chosen (rank-zero info).

    Raises:
        ValueError: none or several qualify; the message lists the candidates and asks for ``vit=``.
    """
    _, used = _trace(module, candidates, logits_of)
    listed = ", ".join(repr(name) for name in candidates)
    if len(used) != 1:
        why = "none of them feeds" if not used else f"{len(used)} of them ({', '.join(map(repr, used))}) feed"
        raise ValueError(
            f"found {len(candidates)} Vision Transformers in {type(module).__name__} ({listed}) and {why} the "
            f"forward's output: pass vit='<name>' to say which one to explain"
        )
    others = ", ".join(repr(n) for n in candidates if n != used[0])
    rank_zero_info(f"lightning-xai: explaining {used[0]!r}, the ViT your forward runs (also found {others}; "
                   "pass vit=... to choose another)")
    return candidates[used[0]]


def check_named_vit(module: nn.Module, vit: Any, found: nn.Module, logits_of: Callable[[], Tensor]) -> None:
    """Raise when the ViT the user named with ``vit=`` is not one the forward runs, or its output does not reach
    the logits (a teacher or EMA copy): the same test as the automatic choice (:func:`choose_vit`). A ViT run
    without gradients passes here (:func:`check_gradients` says what that means for the methods)."""
    ran, used = _trace(module, {"named": found}, logits_of)
    if used or (ran and not ran["named"]):
        return
    others = [name for name, vit in candidate_vits(module).items() if vit is not found]
    where = f" (other ViTs in it: {', '.join(map(repr, others))})" if others else ""
    why = ("the forward never runs it" if not ran else
           "the forward runs it but its output does not reach the logits")
    raise ValueError(
        f"vit={vit!r} names a {type(found).__name__} in {type(module).__name__}, but {why} (a teacher or EMA "
        f"copy?), so nothing could be explained: pass vit= the ViT whose output the forward uses{where}"
    )


def _trace(module: nn.Module, candidates: Mapping[str, nn.Module],
           logits_of: Callable[[], Tensor]) -> tuple[dict[str, bool], list[str]]:
    """Run ``logits_of()`` (one forward, inputs requiring grad) with a forward hook on every candidate.

    Returns:
        ``(ran, used)``: ``ran`` maps each candidate that ran to whether its output requires grad; ``used`` lists
        those whose output is in the graph of the logits.
    """
    outputs: dict[str, Tensor] = {}
    hooks = [
        vit.register_forward_hook(lambda _m, _a, out, name=name: outputs.setdefault(name, _first_tensor(out)))
        for name, vit in candidates.items()
    ]
    try:
        with preserved_rng(), explanation_mode(module):
            logits = logits_of()
            ran = {name: out is not None and out.requires_grad for name, out in outputs.items()}
            graded = [name for name, grad in ran.items() if grad]
            grads = torch.autograd.grad(logits.sum(), [outputs[n] for n in graded], allow_unused=True) if graded else []
    finally:
        for hook in hooks:
            hook.remove()
    return ran, [name for name, grad in zip(graded, grads, strict=True) if grad is not None]


def _first_tensor(output: Any) -> Tensor | None:
    """The first tensor in a ViT's output: the tensor itself, or the first of a tuple or of a Hugging Face
    output (``last_hidden_state``)."""
    if isinstance(output, Tensor):
        return output
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, tuple | list) else ()
    return next((v for v in values if isinstance(v, Tensor)), None)


def check_gradients(module: nn.Module, vit: nn.Module, explainers: Mapping[str, Explainer], images: Tensor,
                    logits_of: Callable[[Tensor], Tensor]) -> None:
    """Raise when the forward runs the ViT without gradients (``torch.no_grad()`` around a frozen backbone) and
    some of ``explainers`` need them; ``images`` are one prepared probe ``(1, C, H, W)``."""
    with preserved_rng(), explanation_mode(module), capture(vit, ("attn",), [-1]) as record:
        logits_of(images.detach().clone().requires_grad_(True))
    if not record.attn or record.attn[0].requires_grad:
        return
    failing = []
    for name, explainer in explainers.items():
        try:
            with preserved_rng():
                explainer(images)
        except Exception:  # noqa: BLE001 - a method that cannot work without gradients
            failing.append(name)
    if failing:
        working = [name for name in explainers if name not in failing]
        raise ValueError(
            f"your forward runs the ViT without gradients (its attention has no grad_fn: a backbone under "
            f"torch.no_grad() for linear probing?), so {failing} cannot explain it. Remove them from methods "
            f"(working here: {working or 'none of the chosen'}; raw_attention and rollout never need gradients), or "
            "run the backbone with gradients enabled (freeze it with requires_grad_(False) instead of no_grad), or "
            "pass forward=lambda module, images: ... that does"
        )


def check_not_sharded(trainer: pl.Trainer) -> None:
    """Refuse the sharding strategies the callbacks cannot gather the whole model under: ModelParallelStrategy
    (FSDP2 / tensor parallel) and DeepSpeed ZeRO stage 3. Lightning's ``FSDPStrategy`` is explained: every rank
    gathers the whole parameters for the explanation pass (:mod:`.sharded`)."""
    strategy = trainer.strategy
    names = {cls.__name__ for cls in type(strategy).__mro__}
    sharded = "ModelParallelStrategy" in names or (
        "DeepSpeedStrategy" in names and bool(getattr(strategy, "zero_stage_3", False))
    )
    if sharded:
        raise ValueError(
            f"ExplanationMonitor cannot explain under {type(strategy).__name__}: the strategy shards the "
            "parameters across ranks and lightning-xai cannot gather them for it. Train with strategy='fsdp' "
            "(Lightning's FSDPStrategy: the explanation pass gathers the whole parameters) or strategy='ddp' "
            "(or DeepSpeed stage 1/2) while explaining, or explain a saved checkpoint after training with "
            "lightning_xai.explain(model, images)"
        )


def check_validation_runs(trainer: pl.Trainer, module: pl.LightningModule) -> None:
    """Raise when ``fit`` will run no validation loop, so that ``stage="validation"`` would explain nothing."""
    source = getattr(getattr(trainer.fit_loop.epoch_loop, "val_loop", None), "_data_source", None)
    has_loader = source.is_defined() if source is not None else True
    missing = [
        reason
        for reason, absent in (
            ("no val dataloader", not has_loader),
            ("no validation_step", not is_overridden("validation_step", module)),
            ("limit_val_batches=0", trainer.limit_val_batches == 0),
        )
        if absent
    ]
    if missing:
        raise ValueError(
            f"stage='validation' but this fit runs no validation loop ({', '.join(missing)}), so nothing would be "
            "explained: pass stage='train' to explain at the end of each training epoch, or add a validation loop"
        )
